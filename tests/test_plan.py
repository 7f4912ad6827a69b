"""lmforge-plan against independent numbers: the activation estimate against the bytes
autograd saves for backward, the model-state formulas against the buffers DeepSpeed really
allocates (one process), the table's arithmetic, the CLI and run dir, and the trainer's
refusal of a run predicted not to fit."""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, compose, run_train
from lmforge.config import ConfigError
from lmforge.metrics import PEAK_TFLOPS, flops_per_token
from lmforge.models import build_model
from lmforge.plan import (ALLREDUCE_BUCKET, DS_DEFAULTS, GB, Setting, activation_bytes,
                          alternatives, check_fits, configured, fits, local_hardware, make_plan,
                          memory, planned_hardware, shape_of)
from test_upstream import deepspeed  # noqa: F401  (the fixture: DeepSpeed on a gloo group of one)

SEQ, BATCH = 128, 2


def saved_bytes(model: torch.nn.Module, batch: dict) -> int:
    """Bytes of the distinct storages autograd saves for backward in one forward (views of one
    storage, e.g. q, k, v of the fused qkv output, count once; parameters not at all)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if t.untyped_storage().data_ptr() not in params:
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch)
    return sum(seen.values())


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("preset", ["gpt_tiny", "llama_tiny", "bert_tiny"])
def test_activation_estimate_matches_saved_tensors(preset: str, dtype: str,
                                                   checkpointing: bool) -> None:
    cfg = compose([f"model={preset}", "model.vocab_size=8192", f"data.seq_len={SEQ}"]).model
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model = model.to(torch.bfloat16) if dtype == "bf16" else model
    model.gradient_checkpointing = checkpointing
    ids = torch.randint(5, cfg.vocab_size, (BATCH, SEQ))
    labels = ids.clone()
    if cfg.arch == "bert":  # the MLM head runs on the labelled positions only
        labels[torch.rand(ids.shape, generator=torch.Generator().manual_seed(0)) > 0.15] = -100
    share = (labels != -100).float().mean().item()
    got = saved_bytes(model, {"input_ids": ids, "labels": labels})
    saved, peak = activation_bytes(cfg, SEQ, BATCH, dtype, share, checkpointing)
    assert saved == pytest.approx(got, rel=0.03)
    assert peak > saved  # the loss's gradients come on top during the backward


@pytest.mark.parametrize("dropout,per_token", [(0.0, 32), (0.1, 34)])
def test_a_gpt2_layer_holds_what_korthikanti_et_al_count(dropout: float, per_token: int) -> None:
    """"Reducing Activation Recomputation in Large Transformer Models" (2022): a GPT layer in
    16-bit with flash attention saves 34 x s x b x h bytes, 2 of them dropout masks."""
    def saved(layers: int) -> float:
        cfg = compose(["model=gpt2_1p3b", "model.vocab_size=50257", f"model.n_layers={layers}",
                       f"model.dropout={dropout}"]).model
        return activation_bytes(cfg, 2048, 4, "bf16", 1.0, False)[0]

    assert saved(25) - saved(24) == pytest.approx(per_token * 2048 * 4 * 2048, rel=0.01)


def ds_bytes(engine, stage: int) -> dict[str, int]:
    """What DeepSpeed holds after a step, by kind, read from its own buffers."""
    def size(ts) -> int:
        return sum(t.numel() * t.element_size() for t in ts)

    opt, params = engine.optimizer, list(engine.module.parameters())
    held = {t.untyped_storage().data_ptr() for p in params
            for t in ([p.ds_tensor] if stage == 3 else [p.data])}
    masters = (getattr(opt, "fp32_partitioned_groups_flat", None)  # ZeRO-3
               or getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
               or [t for g in getattr(opt, "fp32_groups", []) for t in g])  # bf16, ZeRO-0
    masters = [t for t in masters if t.untyped_storage().data_ptr() not in held]
    base = getattr(opt, "optimizer", opt)  # the torch AdamW inside DeepSpeed's wrapper
    moments = [v for s in base.state.values() for k, v in s.items() if k in ("exp_avg",
                                                                             "exp_avg_sq")]
    out = {"params": size([p.ds_tensor for p in params] if stage == 3 else params),
           "optimizer": size(masters) + size(moments)}
    if stage == 3:
        out["grads"] = size([opt.grad_partitions_flat_buffer])
        out["bucket"] = sum(b.buffer.numel() for b in opt.ipg_buckets.values())
    return out


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_state_formulas_match_deepspeed(deepspeed, stage: int, dtype: str) -> None:
    from lmforge.engine import Engine, create_model, ds_config

    cfg = compose(TINY + ["model.vocab_size=512", "model.n_layers=2", f"parallel=zero{stage}",
                          f"precision={dtype}"])
    t = cfg.trainer
    ds = ds_config(cfg.parallel, cfg.precision, cfg.optim, t.micro_batch_size, 1, 1)
    torch.manual_seed(0)
    model = create_model(lambda: build_model(cfg.model), ds, cfg.parallel, torch.device("cpu"))
    engine = Engine(model, ds, cfg.optim, cfg.parallel, cfg.precision, 10, 1, torch.device("cpu"))
    ids = torch.randint(cfg.model.vocab_size, (t.micro_batch_size, cfg.data.seq_len))
    loss = engine.engine({"input_ids": ids, "labels": ids})
    engine.engine.backward(loss)
    # Gradients held until the step: on the parameters (ZeRO-0), in DeepSpeed's per-group
    # lists (ZeRO-1/2; ZeRO-2's views of its partition buffer).
    held = ([p.grad for p in model.parameters() if p.grad is not None] if stage == 0 else
            [t for ts in getattr(engine.optimizer, "averaged_gradients", {}).values() for t in ts])
    grads = sum(t.numel() * t.element_size() for t in held)
    engine.engine.step()
    got = ds_bytes(engine.engine, stage)
    shape = shape_of(cfg, ds["zero_optimization"])
    want = memory(shape, configured(cfg, 1), 1, touched_only=False)
    assert got["params"] == pytest.approx(want["params"], rel=0.01)
    assert got["optimizer"] == pytest.approx(want["optimizer"], rel=0.01)
    if stage < 3:
        assert grads == pytest.approx(want["grads"], rel=0.01)
    else:
        assert got["grads"] == pytest.approx(want["grads"], rel=0.01)
        assert got["bucket"] == shape.ds["reduce_bucket_size"]
    frac = engine.shard_fractions()  # one rank holds everything
    assert frac == {"params": 1.0, "optimizer_state": 1.0}


def test_deepspeed_defaults_are_the_plans(deepspeed) -> None:
    """The plan reads DeepSpeed's buffer sizes without importing it (engine.py is the only
    importer): a DeepSpeed that changes them fails here."""
    from deepspeed.runtime.engine import MEMORY_OPT_ALLREDUCE_SIZE
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig

    zero = DeepSpeedZeroConfig()
    assert zero.reduce_bucket_size == DS_DEFAULTS["reduce_bucket_size"]
    assert zero.max_reuse_distance == DS_DEFAULTS["stage3_max_reuse_distance"]
    assert zero.param_persistence_threshold == DS_DEFAULTS["stage3_param_persistence_threshold"]
    assert MEMORY_OPT_ALLREDUCE_SIZE == ALLREDUCE_BUCKET


def test_zero_stages_shard_as_deepspeed_does_on_eight_ranks() -> None:
    cfg = compose(["model=gpt2_350m", "model.vocab_size=50257", "precision=bf16",
                   "plan.gpus_per_node=8"])
    shape = shape_of(cfg, {})
    n, gb = shape.n_params, {}
    for z in range(4):
        gb[z] = memory(shape, Setting(z, micro_batch=4), 8, touched_only=False)
    assert gb[0]["params"] == gb[1]["params"] == gb[2]["params"] == 2 * n
    assert gb[0]["optimizer"] == 12 * n and gb[1]["optimizer"] == 12 * n / 8
    assert gb[0]["grads"] == gb[1]["grads"] == 2 * n and gb[2]["grads"] == 2 * n / 8
    assert gb[3]["params"] == pytest.approx(2 * n / 8 + 2 * shape.zero3_persistent())
    assert gb[2]["peak"] <= gb[1]["peak"] < gb[0]["peak"]
    states = {z: gb[z]["params"] + gb[z]["grads"] + gb[z]["optimizer"] for z in gb}
    assert states[3] < states[2] < states[1] < states[0]
    # ...yet with DeepSpeed's defaults ZeRO-3 peaks above ZeRO-2 on a model this small: it
    # keeps every gathered parameter until the backward (all reuse within 1e9 parameters),
    # beside its gradient bucket of 5e8 elements.
    assert shape.zero3_live() == n and gb[3]["peak"] > gb[2]["peak"]


def gpu_plan(*overrides: str) -> dict:
    return make_plan(compose(["model=gpt2_124m", "model.vocab_size=50257", "plan.gpu=H100",
                              "precision=bf16", *overrides]))


def test_table_arithmetic() -> None:
    p = gpu_plan("trainer.micro_batch_size=16", "trainer.grad_accum_steps=2",
                 "plan.gpus_per_node=4", "plan.nodes=2", "plan.price_per_gpu_hour=3")
    assert p["target_tokens"] == 20 * p["n_params"] == 20 * 124_439_808
    assert p["world_size"] == 8
    tokens_per_step = 16 * 2 * 8 * 256
    assert p["tokens_per_s"] == pytest.approx(tokens_per_step / p["step_time_s"])
    assert p["hours"] == pytest.approx(p["target_tokens"] / p["tokens_per_s"] / 3600)
    assert p["cost"] == pytest.approx(p["hours"] * 8 * 3)
    fpt = flops_per_token(compose(["model=gpt2_124m", "model.vocab_size=50257"]).model, 256)
    assert p["mfu"] == pytest.approx(p["tokens_per_s"] / 8 * fpt / (PEAK_TFLOPS["H100"]["bf16"]
                                                                     * 1e12))
    t = p["time_s"]  # compute at the assumed MFU plus the collectives over the bandwidth
    assert t["compute_s"] == pytest.approx(16 * 2 * 256 * fpt / (989e12 * 0.40))
    assert p["step_time_s"] == pytest.approx(t["compute_s"] + t["comm_s"] + t["optimizer_s"])
    assert p["hardware"]["bandwidth_gb_s"] == 45.0  # two nodes: the network, not NVLink
    assert set(p["per_rank_gb"]) == {"params", "grads", "optimizer", "activations", "buffers",
                                     "peak"}
    assert len(p["alternatives"]) == 12 and p["alternatives"]["zero0"]["per_rank_gb"] == \
        p["per_rank_gb"]
    assert gpu_plan("plan.target_tokens=1000000")["target_tokens"] == 1_000_000


def test_max_micro_batch_is_the_edge_of_fitting() -> None:
    cfg = compose(["model=gpt2_1p3b", "model.vocab_size=50257", "data.seq_len=1024",
                   "precision=bf16", "plan.gpu=A10G", "plan.gpus_per_node=8"])
    p = make_plan(cfg)
    hw, shape = planned_hardware(cfg), shape_of(cfg, {})
    settings = {st.name: st for st in alternatives(configured(cfg, 8))}
    for name, row in p["alternatives"].items():
        st, m = settings[name], row["max_micro_batch_size"]
        assert m == 0 or fits(shape, dataclasses.replace(st, micro_batch=m), hw)
        assert not fits(shape, dataclasses.replace(st, micro_batch=m + 1), hw)
    assert p["alternatives"]["zero0"]["max_micro_batch_size"] == 0  # 1.3B x 16 B > 22 GB
    assert p["alternatives"]["zero3+ckpt"]["max_micro_batch_size"] > 0


def test_cli_writes_plan_json_into_the_training_run_dir(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lmforge.plan", "model=gpt_tiny",
                           "trainer.micro_batch_size=8", "plan.gpu=A100"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # lmforge-train with these overrides runs in outputs/gpt_tiny__trainer.micro_batch_size=8:
    # plan.* keys are not part of the run-dir name.
    plan = json.loads((tmp_path / "outputs/gpt_tiny__trainer.micro_batch_size=8/plan.json")
                      .read_text())
    assert plan["hardware"]["kind"] == "A100" and plan["micro_batch_size"] == 8
    assert "zero3+offload+ckpt" in proc.stdout and "cheapest setting that fits" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "lmforge.plan", "plan.gpu=B300"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
    assert "plan.gpu='B300' is not a known kind" in bad.stderr


def test_readme_plan_example_is_what_the_command_prints(tmp_path: Path) -> None:
    text = (REPO / "README.md").read_text().split("## Plan a run", 1)[1]
    command = re.search(r"```bash\n\.venv/bin/lmforge-plan (.*?)\n", text).group(1).split()
    printed = re.search(r"```\n(gpt .*?)\n```", text, re.S).group(1)
    proc = subprocess.run([sys.executable, "-m", "lmforge.plan", *command, "--out",
                           str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().rsplit("\n", 1)[0] == printed.strip()


def refused_cfg(*extra: str):
    """A gpt_tiny run whose activations (micro batch 64 x 256 tokens) need more than the
    device memory it claims: 1.5 GB for the runtime plus 0.5 GB."""
    return compose(TINY + ["model.vocab_size=512", "data.seq_len=256",
                           "trainer.micro_batch_size=64", "plan.device_memory_gb=2", *extra])


def test_check_refuses_a_run_predicted_not_to_fit_and_names_a_change_that_fits() -> None:
    cfg = refused_cfg()
    zero = {"stage": 0}
    shape, st = shape_of(cfg, zero), configured(cfg, 1)
    peak = memory(shape, st, 1, True)["peak"] / GB
    with pytest.raises(ConfigError) as e:
        check_fits(cfg, zero, torch.device("cpu"), 1)
    msg = str(e.value)
    assert "\n" not in msg and f"predicted peak {peak:.2f} GB per rank" in msg
    change = re.search(r"the cheapest change that fits: (.*?) \(peak", msg).group(1).split()
    fixed = compose(TINY + ["model.vocab_size=512", "data.seq_len=256",
                            "trainer.micro_batch_size=64", "plan.device_memory_gb=2", *change])
    assert fits(shape, configured(fixed, 1), local_hardware(fixed, torch.device("cpu"), 1))
    check_fits(fixed, zero, torch.device("cpu"), 1)  # the named change passes the check
    check_fits(refused_cfg("plan.check=false"), zero, torch.device("cpu"), 1)


@pytest.mark.slow
def test_trainer_refuses_before_building_with_one_line_and_exit_2(tmp_path: Path) -> None:
    # A single process: not the rendezvous of this module's DeepSpeed fixture.
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = run_train(tmp_path, *TINY, "model.vocab_size=512", "data.seq_len=256",
                     "trainer.micro_batch_size=64", "plan.device_memory_gb=2", check=False,
                     env=env)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("lmforge-train: config error: predicted peak ")
    assert "the cheapest change that fits: " in line and "plan.check=false" in line
    assert not (tmp_path / "checkpoints").exists()
