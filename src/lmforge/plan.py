"""`lmforge-plan`: per-rank memory, step time, hours and cost of a run before any device is
allocated (the model is built on the meta device), for the configured setting and its
alternatives; and the check that refuses to start a run predicted not to fit."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import (ConfigError, ModelConfig, TrainConfig, compose, one_line,
                            resolve_grad_accum, run_dir)
from lmforge.metrics import (DEVICE_MEMORY_GB, MEMORY_BW_GB_S, PEAK_TFLOPS, TORCH_DTYPES,
                             flops_per_token, gpu_kind, head_fraction, measure_cpu_peak_tflops)
from lmforge.models.layers import ff_dim, kv_heads

GB = 2**30
# Compute MFU measured with lmforge by bench/plan_accuracy.py: the calibration model (GPT
# 6L/d384, seq 256, micro batch 8, one process of one thread, ZeRO-0), its step in CPU time
# less the optimizer's modelled time, against one core's measured matmul peak, on a 2-core
# AMD EPYC (Zen4, AVX512_BF16) shared with other jobs. GPUs: not measured by us.
MEASURED_MFU = {"cpu": {"fp32": 0.81, "bf16": 0.45}}
ASSUMED_MFU = 0.40  # a typical dense-transformer MFU with DeepSpeed on recent GPUs
# Collective (bus) bandwidth per device in GB/s when plan.bandwidth_gb_s is unset: NVLink or
# PCIe within a node (roughly nccl-tests' all-reduce bus bandwidth), one 400 Gb/s NIC per GPU
# between nodes; cpu: gloo between the processes of one machine (bench/plan_accuracy.py).
NODE_BW_GB_S = {"H200": 360.0, "H100 SXM": 360.0, "H100 NVL": 300.0, "H100": 360.0,
                "H100 PCIe": 25.0, "A100": 230.0, "L40S": 25.0, "A10G": 12.0, "V100": 130.0,
                "cpu": 1.3}
INTER_NODE_BW_GB_S = 45.0
CPU_MEMORY_BW_GB_S = 20.0  # assumed; a stream add measured 28 GB/s on the 2-core EPYC
OFFLOAD_GB_S = 25.0  # PCIe to host memory and the host's share for DeepSpeed's CPU Adam
# Device memory that is not the model's: GPU: CUDA context, NCCL and allocator slack; CPU:
# the process itself (0.43 GB for a dry run of GPT-2-124M) and the freed tensors glibc keeps
# (up to 0.75 GB measured by bench/plan_accuracy.py).
OVERHEAD_GB = {"gpu": 1.5, "cpu": 1.5}
# DeepSpeed 0.19's defaults for the zero_optimization keys the memory model reads.
DS_DEFAULTS = {"reduce_bucket_size": 5e8, "stage3_max_reuse_distance": 1e9,
               "stage3_param_persistence_threshold": 1e5}
ALLREDUCE_BUCKET = 5e8  # elements DeepSpeed's ZeRO-0 all-reduce flattens at once
ADAM_BYTES = {"fp32": 28, "bf16": 40, "fp16": 40}  # read+written per parameter by one step


@dataclass(frozen=True)
class Hardware:
    kind: str  # a metrics.PEAK_TFLOPS key, or "cpu"
    gpus_per_node: int
    nodes: int
    memory_gb: float  # per device (cpu: per process)
    peak_tflops: float  # per device, the run's dtype (cpu: this process's share)
    mfu: float
    mfu_source: str
    bandwidth_gb_s: float
    memory_bw_gb_s: float
    price_per_gpu_hour: float

    @property
    def world(self) -> int:
        return self.gpus_per_node * self.nodes

    @property
    def on_cpu(self) -> bool:
        return self.kind == "cpu"

    @property
    def overhead_gb(self) -> float:
        return OVERHEAD_GB["cpu" if self.on_cpu else "gpu"]

    def fits(self, mem: dict[str, float]) -> bool:
        """On a CPU, host memory (offload) is the device's too."""
        need = mem["peak"] + (mem["host"] if self.on_cpu else 0)
        return need / GB + self.overhead_gb <= self.memory_gb


@dataclass(frozen=True)
class Setting:
    """How a run is laid out: ZeRO stage, offload, checkpointing, micro batch x accumulation."""
    stage: int
    offload_optimizer: bool = False
    offload_params: bool = False
    checkpointing: bool = False
    micro_batch: int = 1
    grad_accum: int = 1

    @property
    def name(self) -> str:
        return (f"zero{self.stage}" + ("+offload" if self.offload_optimizer else "")
                + ("+ckpt" if self.checkpointing else ""))


@dataclass(frozen=True)
class Shape:
    """What the plan needs of the model: sizes from a meta-device build, and the data shape."""
    model: ModelConfig
    numels: tuple[int, ...]  # unique parameters, in forward order
    seq_len: int
    dtype: str
    head_share: float  # share of tokens the output head runs on (BERT: the masked ones)
    ds: dict[str, float]  # the zero_optimization keys above, as this run sets them

    @property
    def n_params(self) -> int:
        return sum(self.numels)

    def zero3_live(self) -> int:
        """Parameters ZeRO-3 holds gathered at the end of the forward: it releases a parameter
        only if its next use (in the backward) is more than stage3_max_reuse_distance
        parameters away, about twice the parameters used after it in the forward."""
        live, after = 0, 0
        for numel in reversed(self.numels):
            live += numel if 2 * after < self.ds["stage3_max_reuse_distance"] else 0
            after += numel
        return live or max(self.numels)

    def zero3_persistent(self) -> int:
        """Small parameters ZeRO-3 keeps whole on every rank."""
        return sum(x for x in self.numels if x <= self.ds["stage3_param_persistence_threshold"])


def activation_bytes(m: ModelConfig, seq: int, batch: int, dtype: str, head_share: float,
                     checkpointing: bool) -> tuple[float, float]:
    """(saved, peak) bytes of one micro batch: what autograd saves for the backward (as
    saved_tensors_hooks count distinct storages), and the most alive during the backward."""
    s, D, F, H = (4 if dtype == "fp32" else 2), m.d_model, ff_dim(m), m.n_heads
    kvd = kv_heads(m) * (D // H)
    tokens, picked = batch * seq, batch * seq * head_share
    # A norm saves its input and output (+ fp32 stats); RMSNorm (ours, as HF's) also its
    # normalised fp32 input, and in bf16 it saves the fp32 copy instead of the input.
    norm = 2 * s * D + 8 if m.norm == "layernorm" else 4 * D + 2 * s * D + 4
    swiglu = m.activation == "swiglu"
    mlp = s * ((2 * F if swiglu else F) + F + (F if swiglu else 0))  # fc out, act out (x up)
    # qkv output (q, k, v are views of it), roped q and k, SDPA output and log-sum-exp.
    attn = s * (D + 2 * kvd) + (s * (D + kvd) if m.pos_emb == "rope" else 0) + s * D + 4 * H
    drop = 2 * D if m.dropout > 0 else 0  # dropout masks (bool)
    layer = 2 * norm + attn + mlp + drop  # per token; post-LN (BERT) counts the same
    ids = 8 + (8 if m.arch == "bert" else 0)
    # RoPE's cos/sin (their whole fp32 tables, or bf16 copies), saved inside the blocks.
    tables = (2 * m.max_seq_len * (D // H) * 4 if s == 4 else 2 * seq * (D // H) * s) \
        if m.pos_emb == "rope" and not checkpointing else 0
    if m.arch == "gpt":  # final norm; the loss saves fp32 log-probabilities and the labels
        head, edge = tokens * (norm + 4 * m.vocab_size + 8), 0.0
    else:  # the MLM head (dense, GELU, norm) runs on the picked tokens only; the embedding
        # norm is saved, the encoder's output is not (the head indexes it)
        head = tokens + picked * (2 * s * D + norm + 4 * m.vocab_size + 8)
        edge = tokens * (norm - s * D)
    fixed = tokens * ids + seq * 8 + tables + head + edge
    saved = fixed + tokens * (m.n_layers * s * D if checkpointing else m.n_layers * layer)
    # Backward of the loss: the gradients of the log-probabilities and of the logits (fp32)
    # beside the saved log-probabilities; of a block: its MLP gradients; with checkpointing
    # that block's activations are recomputed first.
    loss_grads = 2 * 4 * m.vocab_size * (tokens if m.arch == "gpt" else picked)
    block = tokens * (s * ((2 * F if swiglu else F) + F) + (layer if checkpointing else 0))
    return saved, saved + max(loss_grads, block)


def memory(shape: Shape, st: Setting, world: int, touched_only: bool) -> dict[str, float]:
    """Bytes per rank by what holds them, and the peak. `touched_only`: a CPU's resident
    memory counts only the pages written, so DeepSpeed's preallocated buckets count only up
    to the model's size there; a GPU allocates them whole."""
    n, w, z = shape.n_params, world, st.stage
    s = 4 if shape.dtype == "fp32" else 2
    part = n / w if z >= 1 else n  # the optimizer's share of the parameters

    def bucket(elements: float) -> float:
        return s * (min(elements, n) if touched_only else elements)

    # ZeRO-3 keeps small parameters whole on every rank (besides their partition).
    persist = s * shape.zero3_persistent() if z == 3 and w > 1 else 0.0
    params = s * n if z < 3 else s * (0 if st.offload_params else n / w) + persist
    # fp32 masters: DeepSpeed's mixed-precision optimizers keep them, and ZeRO 1-3 clone
    # them even in fp32; only plain fp32 (ZeRO-0) updates the parameters themselves.
    master = 0 if shape.dtype == "fp32" and z == 0 else 4 * part
    optimizer, grads = master + 8 * part, (s * n if z < 2 else s * n / w)
    host = 0.0
    if st.offload_optimizer:  # masters, moments and fp32 gradient partitions in host memory
        host, optimizer = optimizer + 4 * part, 0.0
        grads = grads if z < 2 else 0.0
    host += s * n / w if st.offload_params else 0.0
    saved, act_peak = activation_bytes(shape.model, shape.seq_len, st.micro_batch, shape.dtype,
                                       shape.head_share, st.checkpointing)
    ipg = bucket(shape.ds["reduce_bucket_size"]) if z >= 1 else 0.0  # gradient bucket
    # Gathered parameters; on one rank ZeRO-3 "gathers" by viewing the partition.
    live = max(s * shape.zero3_live() - persist, 0.0) if z == 3 and w > 1 else 0.0
    flat = bucket(ALLREDUCE_BUCKET) if z == 0 and w > 1 else 0.0  # ZeRO-0 flattens to reduce
    if z == 0:  # FP16_UnfusedOptimizer casts every gradient to fp32 at the step
        step = 0.0 if s == 4 else 4.0 * n
    else:  # the gradient partition is flattened (and cast to fp32) for the step
        step = 0.0 if st.offload_optimizer else s * part + (4 * part if s != 4 else 0)
    reduce = ipg if z == 3 else 0.0  # ZeRO-3's reduce-scatter concatenates the bucket
    # ZeRO-3 allocates its gradient partition and bucket once; ZeRO-1/2 take their bucket
    # for each backward (ZeRO-1 reduces with it after), ZeRO-2 its partition from the first
    # gradient to the step. Accumulated gradients are held across micro batches.
    persistent = params + optimizer + (grads + ipg if z == 3 else 0)
    accumulated = grads if z < 3 and st.grad_accum > 1 else 0.0
    backward = act_peak + live + accumulated + (ipg if z in (1, 2) and not touched_only else 0)
    after = (grads if z < 3 else 0) + max(flat, step, reduce) + (ipg if z == 1 else 0)
    return {"params": params, "grads": grads, "optimizer": optimizer, "activations": act_peak,
            "activations_saved": saved, "buffers": ipg + live + max(flat, step, reduce),
            "peak": persistent + max(backward, after), "host": host}


def step_time(shape: Shape, st: Setting, hw: Hardware) -> dict[str, float]:
    """Seconds of one optimizer step per rank: compute at the MFU, the ZeRO collectives over
    the bandwidth (not overlapped), the Adam update over memory bandwidth."""
    n, w, z, ga = shape.n_params, hw.world, st.stage, st.grad_accum
    s = 4 if shape.dtype == "fp32" else 2
    tokens = st.micro_batch * shape.seq_len * ga
    fpt = flops_per_token(shape.model, shape.seq_len, recompute=st.checkpointing,
                          head_share=shape.head_share)
    compute = tokens * fpt / (hw.peak_tflops * 1e12 * hw.mfu)
    ring = (w - 1) / w * n * s  # bytes one all-gather or reduce-scatter of the model moves
    if z <= 1:  # all-reduce (or reduce-scatter + all-gather) once per step
        volume = 2 * ring
    elif z == 2:  # gradients reduce-scattered per micro batch, parameters gathered once
        volume = ring * (ga + 1)
    else:  # per micro batch: gather (twice for the released ones) and reduce-scatter
        volume = ga * ring * (2 + (n - shape.zero3_live()) / n)
    comm = volume / (hw.bandwidth_gb_s * 1e9)
    local = n / w if z >= 1 else n
    optimizer = local * ADAM_BYTES[shape.dtype] / (hw.memory_bw_gb_s * 1e9)
    if st.offload_optimizer and not hw.on_cpu:  # gradients out, parameters back, host Adam
        optimizer = local * (4 + s + ADAM_BYTES[shape.dtype]) / (OFFLOAD_GB_S * 1e9)
    return {"compute_s": compute, "comm_s": comm, "optimizer_s": optimizer,
            "step_s": compute + comm + optimizer}


def evaluate(shape: Shape, st: Setting, hw: Hardware, target_tokens: float) -> dict[str, Any]:
    """One row of the plan: memory, fit, speed, hours and cost to the target."""
    mem = memory(shape, st, hw.world, hw.on_cpu)
    t = step_time(shape, st, hw)
    tokens_per_s = st.micro_batch * st.grad_accum * hw.world * shape.seq_len / t["step_s"]
    fpt = flops_per_token(shape.model, shape.seq_len, head_share=shape.head_share)
    hours = target_tokens / tokens_per_s / 3600
    keys = ("params", "grads", "optimizer", "activations", "buffers", "peak")
    return {"setting": st.name, "micro_batch_size": st.micro_batch,
            "grad_accum_steps": st.grad_accum,
            "per_rank_gb": {k: round(mem[k] / GB, 3) for k in keys},
            "host_gb_per_rank": round(mem["host"] / GB, 3),
            "fits": hw.fits(mem),
            "step_time_s": t["step_s"], "tokens_per_s": tokens_per_s,
            "mfu": tokens_per_s / hw.world * fpt / (hw.peak_tflops * 1e12),
            "hours": hours, "cost": hours * hw.world * hw.price_per_gpu_hour,
            "time_s": {k: v for k, v in t.items() if k != "step_s"},
            "max_micro_batch_size": max_micro_batch(shape, st, hw)}


def fits(shape: Shape, st: Setting, hw: Hardware) -> bool:
    return hw.fits(memory(shape, st, hw.world, hw.on_cpu))


def max_micro_batch(shape: Shape, st: Setting, hw: Hardware, limit: int = 1 << 16) -> int:
    """The largest micro batch that fits (0: not even 1); memory grows with it."""
    lo, hi = 0, limit
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(shape, dataclasses.replace(st, micro_batch=mid), hw):
            lo = mid
        else:
            hi = mid - 1
    return lo


def alternatives(st: Setting) -> list[Setting]:
    """ZeRO 0-3 with and without checkpointing, and ZeRO-2/3 with offload, at st's batch."""
    out = []
    for ckpt in (False, True):
        for stage, off in [(0, False), (1, False), (2, False), (3, False), (2, True), (3, True)]:
            out.append(dataclasses.replace(st, stage=stage, offload_optimizer=off,
                                           offload_params=off and stage == 3, checkpointing=ckpt))
    return out


def cheapest_fit(shape: Shape, st: Setting, hw: Hardware) -> Setting | None:
    """The fitting alternative with the most tokens/s, also with smaller micro batches that
    keep the batch per step (accumulating more); None if nothing fits."""
    per_step = st.micro_batch * st.grad_accum
    best, best_speed = None, 0.0
    for alt in alternatives(st):
        for mb in sorted((m for m in range(1, st.micro_batch + 1) if per_step % m == 0),
                         reverse=True):
            cand = dataclasses.replace(alt, micro_batch=mb, grad_accum=per_step // mb)
            if fits(shape, cand, hw):
                speed = 1 / step_time(shape, cand, hw)["step_s"]
                if speed > best_speed * (1 + 1e-9):
                    best, best_speed = cand, speed
                break  # the largest micro batch that fits is the fastest for this setting
    return best


def overrides(st: Setting, base: Setting, global_batch: bool) -> list[str]:
    """The overrides that turn the `base` setting into `st`."""
    out = [f"parallel.{key}={str(getattr(st, attr)).lower()}" for key, attr in [
        ("zero_stage", "stage"), ("offload_optimizer", "offload_optimizer"),
        ("offload_params", "offload_params"), ("activation_checkpointing", "checkpointing")]
        if getattr(st, attr) != getattr(base, attr)]
    if st.micro_batch != base.micro_batch:
        out.append(f"trainer.micro_batch_size={st.micro_batch}")
        if not global_batch:  # trainer.global_batch_size already keeps the batch per step
            out.append(f"trainer.grad_accum_steps={st.grad_accum}")
    return out


def hardware(kind: str, dtype: str, gpus_per_node: int, nodes: int, plan: Any,
             memory_gb: float | None = None, threads: int | None = None) -> Hardware:
    """The device model for a kind ("cpu": this machine, shared by gpus_per_node processes
    of `threads` threads each; torchrun gives each of several processes one)."""
    if kind == "cpu":
        threads = threads or (torch.get_num_threads() if gpus_per_node == 1 else 1)
        peak = measure_cpu_peak_tflops(TORCH_DTYPES[dtype], threads=threads)
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GB
        memory, mem_bw = ram / gpus_per_node, CPU_MEMORY_BW_GB_S / gpus_per_node
    else:
        # An unknown GPU (the trainer's check on a new kind) is ranked as an H100.
        table = PEAK_TFLOPS.get(kind, PEAK_TFLOPS["H100"])
        peak, memory = table[dtype], DEVICE_MEMORY_GB.get(kind, 80.0)
        mem_bw = MEMORY_BW_GB_S.get(kind, MEMORY_BW_GB_S["H100"])
        if peak <= 0:
            raise ConfigError(f"a {kind} has no {dtype} support; choose another precision")
    measured = MEASURED_MFU.get(kind, {}).get(dtype)
    mfu, source = ((plan.mfu, "plan.mfu") if plan.mfu else (measured, "measured") if measured
                   else (ASSUMED_MFU, "assumed"))
    bw = plan.bandwidth_gb_s or (NODE_BW_GB_S.get(kind, 25.0) if nodes == 1
                                 else INTER_NODE_BW_GB_S)
    return Hardware(kind, gpus_per_node, nodes, plan.device_memory_gb or memory_gb or memory,
                    peak, mfu, source, bw, mem_bw, plan.price_per_gpu_hour)


def planned_hardware(cfg: TrainConfig) -> Hardware:
    """What plan.* describes."""
    p = cfg.plan
    kind = "cpu" if p.gpu.lower() == "cpu" else gpu_kind(p.gpu)
    if kind is None:
        raise ConfigError(f"plan.gpu={p.gpu!r} is not a known kind; choose cpu or one of "
                          f"{list(PEAK_TFLOPS)} (with _ for spaces, e.g. H100_SXM)")
    return hardware(kind, cfg.precision.dtype, p.gpus_per_node, p.nodes, p)


def local_hardware(cfg: TrainConfig, device: torch.device, world: int) -> Hardware:
    """The device this process trains on, with the ranks the launcher started."""
    per_node = min(int(os.environ.get("LOCAL_WORLD_SIZE", world)), world)
    nodes = max(world // per_node, 1)
    if device.type != "cuda":
        return hardware("cpu", cfg.precision.dtype, per_node, nodes, cfg.plan,
                        threads=torch.get_num_threads())
    name = torch.cuda.get_device_name(device)
    memory = torch.cuda.get_device_properties(device).total_memory / GB
    return hardware(gpu_kind(name) or name, cfg.precision.dtype, per_node, nodes, cfg.plan,
                    memory)


def planned_vocab(cfg: TrainConfig) -> int:
    """model.vocab_size as the trainer will set it, without training a tokenizer."""
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    shards = cfg.data.shard_sources()
    path = cfg.tokenizer.path or (str(Path(shards[0][0]) / "tokenizer.json") if shards else None)
    if path:
        from lmforge.data.tokenizer import load_tokenizer

        return load_tokenizer(path).get_vocab_size()
    return cfg.tokenizer.vocab_size  # what the trained tokenizer has at most


def shape_of(cfg: TrainConfig, zero: dict[str, Any]) -> Shape:
    """Parameter sizes from a meta-device build of the model (no memory, any size)."""
    from lmforge.models import build_model

    with torch.device("meta"):
        model = build_model(cfg.model)
    ds = {k: float(zero.get(k, zero.get(k.removeprefix("stage3_"), v)))
          for k, v in DS_DEFAULTS.items()}
    share = head_fraction(cfg.model, cfg.data.seq_len, cfg.data.mlm_probability)
    return Shape(cfg.model, tuple(p.numel() for p in model.parameters()), cfg.data.seq_len,
                 cfg.precision.dtype, share, ds)


def configured(cfg: TrainConfig, world: int) -> Setting:
    p, t = cfg.parallel, cfg.trainer
    return Setting(p.zero_stage, p.offload_optimizer, p.offload_params,
                   p.activation_checkpointing, t.micro_batch_size, resolve_grad_accum(t, world))


def make_plan(cfg: TrainConfig, hw: Hardware | None = None) -> dict[str, Any]:
    """plan.json: the configured setting's row, its alternatives, and what they assume."""
    from lmforge.engine import ds_config

    hw = hw or planned_hardware(cfg)
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model,
                                                             vocab_size=planned_vocab(cfg)))
    st = configured(cfg, hw.world)
    shape = shape_of(cfg, ds_config(cfg.parallel, cfg.precision, cfg.optim, st.micro_batch,
                                    st.grad_accum, hw.world, not hw.on_cpu)["zero_optimization"])
    target = cfg.plan.target_tokens or 20 * shape.n_params
    acts = {ck: activation_bytes(shape.model, shape.seq_len, st.micro_batch, shape.dtype,
                                 shape.head_share, ck)[1] / GB for ck in (False, True)}
    best = cheapest_fit(shape, st, hw)
    return {**evaluate(shape, st, hw, target), "target_tokens": target,
            "n_params": shape.n_params, "world_size": hw.world, "seq_len": shape.seq_len,
            "dtype": shape.dtype, "model": cfg.model.arch, "vocab_size": cfg.model.vocab_size,
            "activations_gb_per_micro_batch": {"no_checkpointing": round(acts[False], 3),
                                               "checkpointing": round(acts[True], 3)},
            "cheapest_fit": best and {"setting": best.name, "overrides": overrides(
                best, st, cfg.trainer.global_batch_size is not None)},
            "hardware": dataclasses.asdict(hw), "overhead_gb": hw.overhead_gb,
            "alternatives": {a.name: evaluate(shape, a, hw, target) for a in alternatives(st)}}


def _num(x: float) -> str:
    for unit, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(x) >= div:
            return f"{x / div:.3g}{unit}"
    return f"{x:.3g}"


def format_table(plan: dict[str, Any]) -> str:
    """The printed plan: a header of assumptions and one row per setting."""
    hw, a = plan["hardware"], plan["activations_gb_per_micro_batch"]
    lines = [
        f"{plan['model']} {plan['n_params']:,} parameters, seq {plan['seq_len']}, "
        f"{plan['dtype']}, {hw['gpus_per_node']} x {hw['kind']} x {hw['nodes']} node(s), "
        f"{hw['memory_gb']:.1f} GB each ({plan['overhead_gb']} GB kept for the runtime)",
        f"micro batch {plan['micro_batch_size']} x accumulation {plan['grad_accum_steps']}; "
        f"activations per micro batch {a['no_checkpointing']:.2f} GB, with checkpointing "
        f"{a['checkpointing']:.2f} GB",
        f"peak {hw['peak_tflops']:.4g} TFLOP/s per device at MFU {hw['mfu']:.2f} "
        f"({hw['mfu_source']}), collectives at {hw['bandwidth_gb_s']:g} GB/s, "
        f"${hw['price_per_gpu_hour']:g} per GPU-hour, target {_num(plan['target_tokens'])} tokens",
        "",
        f"{'setting':<18}{'params':>7}{'grads':>7}{'optim':>7}{'acts':>7}{'buffers':>8}"
        f"{'peak':>7}{'fits':>5}{'step s':>9}{'tok/s':>8}{'MFU':>6}{'hours':>8}{'cost $':>9}"
        f"{'max mb':>7}",
    ]
    rows = dict(plan["alternatives"])
    if plan["setting"] not in rows:  # e.g. ZeRO-1 with offload: its own row, first
        rows = {plan["setting"]: plan, **rows}
    for name, r in rows.items():
        g = r["per_rank_gb"]
        label = name + (" *" if name == plan["setting"] else "")
        lines.append(
            f"{label:<18}{g['params']:>7.2f}{g['grads']:>7.2f}{g['optimizer']:>7.2f}"
            f"{g['activations']:>7.2f}{g['buffers']:>8.2f}{g['peak']:>7.2f}"
            f"{'yes' if r['fits'] else 'NO':>5}{r['step_time_s']:>9.3g}"
            f"{_num(r['tokens_per_s']):>8}{r['mfu']:>6.2f}{r['hours']:>8.3g}"
            f"{_num(r['cost']):>9}{r['max_micro_batch_size']:>7}")
    best = plan["cheapest_fit"]
    lines += ["", "* as configured; GB per rank; peak: what stays plus the larger of the "
              "forward/backward and the step phases; +ckpt: activation checkpointing; max mb: "
              "the largest micro batch that fits",
              "cheapest setting that fits: " + (f"{best['setting']} "
              f"({' '.join(best['overrides']) or 'as configured'})" if best else "none")]
    return "\n".join(lines)


def check_fits(cfg: TrainConfig, zero: dict[str, Any], device: torch.device, world: int) -> None:
    """Refuse, in one line, a run predicted not to fit its device (unless plan.check=false)."""
    if not cfg.plan.check:
        return
    hw = local_hardware(cfg, device, world)
    st = configured(cfg, world)
    shape = shape_of(cfg, zero)
    if fits(shape, st, hw):
        return
    peak = memory(shape, st, world, hw.on_cpu)["peak"] / GB
    best = cheapest_fit(shape, st, hw)
    change = (f"{' '.join(overrides(best, st, cfg.trainer.global_batch_size is not None))} "
              f"(peak {memory(shape, best, world, hw.on_cpu)['peak'] / GB:.2f} GB)"
              if best else "none at this number of devices: add devices")
    raise ConfigError(
        f"predicted peak {peak:.2f} GB per rank ({st.name}, micro batch {st.micro_batch}) "
        f"exceeds the {hw.memory_gb - hw.overhead_gb:.2f} GB this {hw.kind} device has for it "
        f"({hw.memory_gb:.1f} GB less {hw.overhead_gb} GB for the runtime); the cheapest change "
        f"that fits: {change}; or plan.check=false")


def cli(argv: list[str] | None = None) -> None:
    """lmforge-plan [--out DIR] [overrides]: print the plan, write plan.json."""
    ap = argparse.ArgumentParser(prog="lmforge-plan", description=__doc__)
    ap.add_argument("--out", type=Path, help="where plan.json goes (default: the run dir)")
    a, args = ap.parse_known_args(argv)
    try:
        cfg, out = compose(args), a.out or run_dir(args)
    except Exception as e:  # Hydra's and OmegaConf's many error types: one line each
        fail(e)
    try:
        plan = make_plan(cfg)
    except ConfigError as e:
        fail(e)
    out.mkdir(parents=True, exist_ok=True)
    (out / "plan.json").write_text(json.dumps(plan, indent=2) + "\n")
    print(format_table(plan))
    print(f"wrote {out / 'plan.json'}")


def fail(e: Exception) -> None:
    print(f"lmforge-plan: config error: {one_line(e)}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    cli()
