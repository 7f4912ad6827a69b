"""Everything DeepSpeed, and the only module that imports it: typed sub-configs -> the
DeepSpeed config -> an engine that steps, evaluates, saves, loads and converts; plus the
pieces of DeepSpeed that consolidation for export reads checkpoints with.

Workarounds of DeepSpeed 0.19 bugs are marked "Workaround:" with the upstream issue and
when to remove them; tests/test_upstream.py fails when the upstream fix lands."""
from __future__ import annotations

import contextlib
import contextvars
import logging
import math
import os
import pickle
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from lmforge.config import ConfigError, OptimConfig, ParallelConfig, PrecisionConfig
from lmforge.manifest import load_error

log = logging.getLogger("lmforge")


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for k, v in extra.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def zero_tuning(stage: int, d_model: int) -> dict[str, Any]:
    """ZeRO settings for GPUs, scaled to the model instead of DeepSpeed's defaults (buckets of
    5e8 elements, larger than small models; no overlap)."""
    d2 = d_model * d_model
    out: dict[str, Any] = {
        # Reduce while backward still runs; one flat gradient buffer, no fragmentation.
        "overlap_comm": True, "contiguous_gradients": True,
        # ~one layer's weights per bucket (the sizes Hugging Face's "auto" values use):
        # big enough to saturate the link, small enough to start early and overlap.
        "reduce_bucket_size": d2, "allgather_bucket_size": max(d2, int(5e7)),
        "reduce_scatter": True,
    }
    if stage == 3:
        out.update({
            "stage3_prefetch_bucket_size": int(0.9 * d2),  # the next layer, gathered ahead
            # Norms and biases (~d elements) stay whole on every rank: gathering them costs
            # more latency than their memory is worth.
            "stage3_param_persistence_threshold": 10 * d_model})
    return out


def guards_on_device(parallel: ParallelConfig, precision: PrecisionConfig) -> bool:
    """Whether a non-finite step is skipped on the device, with no host read (Engine): the
    fused AdamW is given the global norm's found_inf, in fp32 and in bf16 with ZeRO 1-3.
    DeepSpeed's host check stays for fp16 (its loss scaler must know), bf16 at ZeRO-0
    (DeepSpeed's unfused BF16 path checks every tensor) and an offloaded optimizer (AdamW
    then steps on the CPU, which would read a flag still being copied from the GPU)."""
    if parallel.offload_optimizer:
        return False
    if dict(parallel.ds_extra).get("zero_optimization", {}).get("compute_grad_norm") is False:
        return False  # no norm to decide on: DeepSpeed's own choice stands
    return precision.dtype == "fp32" or (precision.dtype == "bf16" and parallel.zero_stage > 0)


def ds_config(parallel: ParallelConfig, precision: PrecisionConfig, optim: OptimConfig,
              micro_batch_size: int, grad_accum_steps: int, world_size: int,
              on_gpu: bool = False, d_model: int = 0) -> dict[str, Any]:
    """The DeepSpeed config these settings describe; `parallel.ds_extra` is merged last.
    On GPUs the ZeRO settings are tuned to the model (zero_tuning); on CPU (gloo, tests)
    DeepSpeed's defaults are kept: overlap needs device streams."""
    zero: dict[str, Any] = {"stage": parallel.zero_stage}
    if on_gpu and parallel.zero_stage > 0 and d_model:
        zero.update(zero_tuning(parallel.zero_stage, d_model))
    if parallel.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if parallel.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    cfg = {
        "train_batch_size": micro_batch_size * grad_accum_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum_steps,
        "gradient_clipping": optim.grad_clip,
        "zero_optimization": zero,
        # Where lmforge skips a non-finite step on the device (guards_on_device), DeepSpeed's
        # own check, which reads every gradient partition back to the host, is off.
        "bf16": {"enabled": precision.dtype == "bf16",
                 "check_grad_overflow": not guards_on_device(parallel, precision)},
        "fp16": {"enabled": precision.dtype == "fp16", "loss_scale": 0,
                 "initial_scale_power": precision.initial_scale_power,
                 "loss_scale_window": precision.loss_scale_window,
                 "hysteresis": 2, "min_loss_scale": 1},
        # We pass torch's AdamW; DeepSpeed must not swap in its JIT-built CPU Adam.
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # Its throughput timer synchronizes the device twice per micro-step: the host could
        # never run ahead of the GPU. lmforge measures throughput itself, at log steps.
        "timers": {"throughput": {"enabled": False}},
    }
    if on_gpu and precision.dtype != "fp32":
        # Gradients are reduced in fp32: bf16 sums over many ranks lose low bits of the
        # update (Megatron-LM and torchtitan reduce in fp32 too); twice the bytes on the wire.
        cfg["communication_data_type"] = "fp32"
    cfg = _merge(cfg, dict(parallel.ds_extra))
    # The engine is driven by the typed keys; raw keys must not contradict them.
    for key, want, got_ in [
            ("zero_optimization.stage", parallel.zero_stage, cfg["zero_optimization"]["stage"]),
            ("bf16.enabled", precision.dtype == "bf16", cfg["bf16"]["enabled"]),
            ("fp16.enabled", precision.dtype == "fp16", cfg["fp16"]["enabled"])]:
        if got_ != want:
            raise ConfigError(f"parallel.ds_extra sets {key}={got_}, which contradicts "
                              f"parallel.zero_stage / precision.dtype; set those instead")
    got = (cfg["train_batch_size"], cfg["train_micro_batch_size_per_gpu"],
           cfg["gradient_accumulation_steps"])
    if got[0] != got[1] * got[2] * world_size:
        raise ConfigError(f"parallel.ds_extra makes train_batch_size={got[0]} != micro batch "
                          f"{got[1]} x accumulation {got[2]} x {world_size} ranks; set "
                          "trainer.micro_batch_size / trainer.global_batch_size instead")
    return cfg


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices only: biases, norm weights and embedding tables get no weight decay."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for p in module.parameters(recurse=False):
            if id(p) in seen or not p.requires_grad:
                continue
            seen.add(id(p))
            ndim = len(getattr(p, "ds_shape", p.shape))  # ZeRO-3 partitions are flat
            (no_decay if ndim < 2 or isinstance(module, nn.Embedding) else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0}]


def lr_lambda(optim: OptimConfig, max_steps: int):
    """Linear warmup to 1, then cosine decay to min_lr_ratio at max_steps."""
    def f(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        span = max(max_steps - optim.warmup_steps, 1)
        progress = min((step - optim.warmup_steps) / span, 1.0)
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def check_precision(dtype: str, device: torch.device) -> None:
    """A dtype DeepSpeed's accelerator cannot run is a config error, said before any set-up
    (on CPU, fp16 needs oneDNN fp16 support, e.g. AVX512-FP16 or AMX-FP16)."""
    if dtype == "fp32":
        return
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    ok = acc.is_fp16_supported() if dtype == "fp16" else acc.is_bf16_supported()
    if not ok:
        instead = "precision=bf16 or precision=fp32" if dtype == "fp16" else "precision=fp32"
        raise ConfigError(f"precision={dtype} is not supported on this {device.type} device "
                          f"(DeepSpeed's accelerator says so); use {instead}")


# DeepSpeed's pydantic config models -> the config section each validates.
_DS_SECTIONS = {"DeepSpeedZeroConfig": "zero_optimization", "DeepSpeedBF16Config": "bf16",
                "DeepSpeedFP16Config": "fp16", "HybridEngineConfig": "hybrid_engine",
                "TensorBoardConfig": "tensorboard", "WandbConfig": "wandb",
                "CSVConfig": "csv_monitor", "CometConfig": "comet",
                "CommsLoggerConfig": "comms_logger", "TPTrainingConfig": "tensor_parallel",
                "DeepSpeedThroughputTimerConfig": "timers.throughput"}


@contextlib.contextmanager
def ds_config_errors() -> Iterator[None]:
    """DeepSpeed validates its config (pydantic) only when an engine or ZeRO-3 init is
    built: a raw key from parallel.ds_extra it rejects becomes one line naming the key."""
    import pydantic

    try:
        yield
    except pydantic.ValidationError as e:
        err = e.errors()[0]
        key = ".".join([_DS_SECTIONS.get(e.title, e.title), *map(str, err["loc"])])
        raise ConfigError(f"parallel.ds_extra: DeepSpeed rejects {key}={err.get('input')!r} "
                          f"({err['msg']}); fix or drop that key") from None


def init_distributed(device: torch.device) -> None:
    import deepspeed

    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")


def create_model(build: Callable[[], nn.Module], config: dict[str, Any],
                 parallel: ParallelConfig, device: torch.device,
                 load: Callable[[nn.Module, Callable | None], None] | None = None) -> nn.Module:
    """`build()`, then `load(model, gather)` when given (pretrained weights). Under ZeRO-3
    every rank creates only its partition of each parameter (deepspeed.zero.Init; no rank ever
    holds the whole model), and the model's initialisation, or `load`, runs again one gathered
    tensor at a time (`gather(param)`), written on rank 0."""
    if parallel.zero_stage != 3:
        model = build()
        if load is not None:
            load(model, None)
        return model
    import deepspeed

    init_distributed(device)
    with ds_config_errors(), deepspeed.zero.Init(config_dict_or_path=config):
        model = build()

    def gather(p: nn.Parameter) -> Any:
        return deepspeed.zero.GatheredParameters([p], modifier_rank=0)

    if load is None:
        model.init_weights(gather=gather)
    else:
        load(model, gather)
    return model


def to_universal(ckpt: Path, out: Path) -> None:
    """Convert the DeepSpeed files of `ckpt` into a universal checkpoint in `out` (every
    parameter's fp32 weights and Adam moments whole, in out/zero/<name>/), with DeepSpeed's
    own converter, deepspeed/checkpoint/ds_to_universal.py. `ckpt` is only read: the
    universal-checkpoint metadata DeepSpeed wants (our engine does not write it) is added in
    memory (--inject_missing_state). Its progress output goes to the log at debug level."""
    import argparse
    import io

    from deepspeed.checkpoint import ds_to_universal

    shutil.rmtree(out, ignore_errors=True)
    args = argparse.Namespace(input_folder=str(ckpt), output_folder=str(out),
                              num_extract_workers=1, num_merge_workers=1,  # no process pool
                              keep_temp_folder=False, strict=True, inject_missing_state=True)
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text), contextlib.redirect_stderr(text), weights_only():
            ds_to_universal.main(args)
    except Exception as e:
        shutil.rmtree(out, ignore_errors=True)
        raise RuntimeError(f"DeepSpeed could not convert {ckpt} to a universal checkpoint "
                           f"({type(e).__name__}: {e})") from e
    finally:
        log.debug("%s", text.getvalue())


def compile_each_block(model: nn.Module) -> None:
    """torch.compile every transformer block, as torchtitan does: each block is one graph
    (norms, attention, MLP and their elementwise ops fused) reused by all layers, and what
    happens between blocks (ZeRO-3's gathers, activation checkpointing) stays eager. The
    block's forward is compiled, not its module call: the module's hooks (ZeRO-3's gather and
    release) run eager around the graph, and parameter names and checkpoints are unchanged.
    Compiled after DeepSpeed has set the module up, on its final device and dtype."""
    if next(model.parameters()).device.type == "cpu":
        from torch._inductor.cpp_builder import get_cpp_compiler

        try:  # else the first step fails deep in inductor
            get_cpp_compiler()
        except Exception as e:
            raise ConfigError(f"trainer.compile=true on CPU needs a C++ compiler (g++ or "
                              f"clang++; set CXX to one): {e}") from e
    for block in model.blocks:
        block.forward = torch.compile(block.forward)


def whole_blocks_for_zero3(model: nn.Module) -> None:
    """ZeRO-3 gathers each block's parameters at once, in the block's own hook, instead of
    one submodule at a time: the compiled block then holds no hook inside it (with them,
    dynamo breaks the graph at each submodule and recompiles on DeepSpeed's state). The
    same losses as per-submodule gathering; a block's parameters are live together (what
    the prefetch of the next layer holds anyway). Before deepspeed.initialize registers
    the hooks."""
    from deepspeed.utils import set_z3_leaf_modules

    set_z3_leaf_modules(model, list({type(b) for b in model.blocks}))


# True while an Engine that guards its update on the device steps (see Engine._guarded).
_GUARD_ON_DEVICE = contextvars.ContextVar("lmforge_guard_on_device", default=False)


def _defer_norm_checks_to_the_device() -> None:
    """DeepSpeed's ZeRO optimizers decide whether to skip a step on the host
    (`is_invalid_grad_norm`: bool() of the device norm, a sync every step). While an Engine
    that guards on the device steps, that check answers "valid" without reading: the norm's
    found_inf flag makes the fused AdamW leave weights and moments as they were, on the
    device. Everywhere else (fp16's loss scaling, other engines) DeepSpeed's check runs."""
    from deepspeed.runtime import utils
    from deepspeed.runtime.zero import stage3, stage_1_and_2

    check = utils.is_invalid_grad_norm
    if getattr(stage3.is_invalid_grad_norm, "lmforge", False):
        return

    def is_invalid_grad_norm(norm: Any) -> bool:
        if torch.is_tensor(norm) and _GUARD_ON_DEVICE.get():
            return False
        return check(norm)

    is_invalid_grad_norm.lmforge = True  # type: ignore[attr-defined]
    stage3.is_invalid_grad_norm = stage_1_and_2.is_invalid_grad_norm = is_invalid_grad_norm


def not_finite(norm: torch.Tensor) -> torch.Tensor:
    """1.0 where `norm` is inf/NaN (or DeepSpeed's -1 sentinel for one), else 0.0: the float
    found_inf flag a fused torch optimizer skips its update on, without a host read."""
    return (~torch.isfinite(norm) | (norm < 0)).float()


class Engine:
    """A DeepSpeed engine plus what the trainer asks of it: a step over micro-batches,
    the gradient norm, the learning rate, save and load."""

    def __init__(self, model: nn.Module, config: dict[str, Any], optim: OptimConfig,
                 parallel: ParallelConfig, precision: PrecisionConfig, max_steps: int,
                 world_size: int, device: torch.device, compile_blocks: bool = False) -> None:
        """`config` is ds_config(parallel, precision, optim, ...) (model creation needs it
        first, for ZeRO-3's partitioned init). `compile_blocks`: torch.compile each
        transformer block in place (see compile_blocks)."""
        import deepspeed

        model.gradient_checkpointing = parallel.activation_checkpointing
        self.config, self.dtype = config, precision.dtype
        # fused: one kernel for all parameters (CPU and CUDA); ~5x faster than the default
        # per-tensor loop on CPU, where the optimizer is a large share of a small model's step.
        opt = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr,
                                betas=(optim.beta1, optim.beta2), eps=optim.eps, fused=True)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(optim, max_steps))
        init_distributed(device)
        if compile_blocks and parallel.zero_stage == 3:
            whole_blocks_for_zero3(model)
        with ds_config_errors():
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, optimizer=opt, lr_scheduler=sched, config=self.config)
        self.stage = parallel.zero_stage
        # Workaround (deepspeedai/DeepSpeed#8393): DeepSpeed 0.19 scales the loss in
        # engine.backward() only for its ZeRO optimizers, yet its stage-0 fp16 optimizer
        # divides the gradients by the loss scale in step(): the loss is scaled here for that
        # optimizer. Remove when #8393 is fixed (the fp16 1%-tracking test then fails on a
        # double scale, and so does tests/test_upstream.py).
        from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

        self._scale_loss = isinstance(self.optimizer, FP16_UnfusedOptimizer)
        if isinstance(self.optimizer, FP16_UnfusedOptimizer):
            self._undo_construction_step(opt)
        if world_size == 1 and self.stage == 0:
            # DeepSpeed flattens and all-reduces gradients even over a group of one: ~25% of
            # a small model's CPU step for nothing.
            self.engine.enable_backward_allreduce = False
        self.device = device
        self._adamw = opt
        self._guarded = guards_on_device(parallel, precision)
        if self._guarded and self.stage > 0:
            _defer_norm_checks_to_the_device()
            zero = self.optimizer
            # DeepSpeed computes the global norm (all ranks) before it steps AdamW.
            opt.register_step_pre_hook(lambda o, args, kwargs: setattr(
                o, "found_inf", None if zero._global_grad_norm is None
                else not_finite(torch.as_tensor(zero._global_grad_norm))))
        if compile_blocks:
            compile_each_block(self.engine.module)

    def _undo_construction_step(self, adamw: torch.optim.Optimizer) -> None:
        """Workaround (DeepSpeed 0.19, fp16/unfused_optimizer.py initialize_optimizer_states):
        DeepSpeed's unfused optimizer (bf16 and fp16 at ZeRO-0) steps AdamW once on zero
        gradients when it is built: weight decay hits the fp32 master weights and AdamW's
        step count starts at 1, so the first real update is ~26% too small (bias correction
        of step 2). The masters are copied again from the 16-bit weights they were made
        from, and the counts set to 0 (the moments are still zero). A resumed run loads its
        own state afterwards. Remove when tests/test_upstream.py says DeepSpeed fixed it."""
        with torch.no_grad():
            for low, high in zip(self.optimizer.fp16_groups, self.optimizer.fp32_groups):
                for lp, hp in zip(low, high):
                    hp.copy_(lp.float())
        for state in adamw.state.values():
            state["step"].zero_()

    @property
    def module(self) -> nn.Module:
        return self.engine.module

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def train_step(self, micro_batches: list[dict[str, torch.Tensor]]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One optimizer step over `grad_accum_steps` micro-batches: (mean loss, grad norm,
        applied). All three stay on the device; a non-finite gradient skips the update."""
        self.engine.train()
        total = torch.zeros((), device=self.device)
        grad_norm = None
        skipped_before = self.engine.skipped_steps
        scale = self._loss_scale() if self._scale_loss else 1.0
        for batch in micro_batches:
            loss = self.engine(self._to_device(batch))
            self.engine.backward(loss.float() * scale if self._scale_loss else loss)
            if self.engine.is_gradient_accumulation_boundary() and self._norm_not_tracked():
                grad_norm = self._plain_fp32_norm_and_guard()
            token = _GUARD_ON_DEVICE.set(self._guarded)
            try:
                self.engine.step()
            finally:
                _GUARD_ON_DEVICE.reset(token)
            total += loss.detach().float()
        if grad_norm is None:
            # FP16_UnfusedOptimizer reports the norm of the still-scaled gradients. No `or`
            # on the norm: truth-testing a device tensor would wait for the GPU.
            norm = self.engine.get_global_grad_norm()
            grad_norm = torch.as_tensor(0.0 if norm is None else norm).float() / scale
        if self._guarded:
            applied = not_finite(grad_norm) == 0
        else:  # DeepSpeed decided on the host
            applied = torch.tensor(self.engine.skipped_steps == skipped_before,
                                   device=self.device)
        return total / len(micro_batches), grad_norm, applied

    def _plain_fp32_norm_and_guard(self) -> torch.Tensor:
        """DeepSpeed's plain fp32 path neither records the norm nor skips non-finite grads
        (its ZeRO, bf16 and fp16 optimizers do): compute the norm, and have the fused AdamW
        skip the update (and its step count) on the device when it is not finite."""
        norm = torch.nn.utils.get_total_norm(
            [p.grad for p in self.engine.module.parameters() if p.grad is not None])
        self._adamw.found_inf = not_finite(norm)
        return norm

    def _norm_not_tracked(self) -> bool:
        return self.stage == 0 and self.dtype == "fp32"

    @torch.no_grad()
    def eval_loss(self, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
        """Mean loss over `batches` on this rank."""
        self.engine.eval()
        total = torch.zeros((), device=self.device)
        for batch in batches:
            total += self.engine(self._to_device(batch)).float()
        self.engine.train()
        return total / max(len(batches), 1)

    def shard_fractions(self) -> dict[str, float]:
        """This rank's share of the parameters and of the fp32 master weights (whose size the
        Adam moments share), read from the engine's own partitions."""
        params = list(self.engine.module.parameters())
        total = sum(getattr(p, "ds_numel", p.numel()) for p in params)
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in params)
        opt = self.optimizer
        flat = (getattr(opt, "single_partition_of_fp32_groups", None)  # ZeRO-1/2
                or getattr(opt, "fp32_partitioned_groups_flat", None)  # ZeRO-3
                or getattr(opt, "fp32_groups_flat_partition", None))  # bf16, stage 0
        master = sum(t.numel() for t in flat) if flat else total
        return {"params": round(local / total, 4), "optimizer_state": round(master / total, 4)}

    @property
    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @property
    def loss_scale(self) -> float:
        return self._loss_scale() if self.dtype == "fp16" else 1.0

    def _loss_scale(self) -> float:
        # ZeRO optimizers have `cur_scale` and `loss_scale`; FP16_[Unfused]Optimizer the latter.
        return float(getattr(self.optimizer, "loss_scale", None) or 1.0)

    @property
    def skipped_steps(self) -> int:
        return int(self.engine.skipped_steps)

    def save(self, directory: Path, tag: str, client_state: dict[str, Any]) -> None:
        """Every rank writes its shard of the engine state under directory/tag."""
        # `latest` is ours, written only after every rank finished (checkpoint.save).
        self.engine.save_checkpoint(str(directory), tag=tag, client_state=client_state,
                                    save_latest=False)

    def load(self, directory: Path, tag: str) -> dict[str, Any]:
        """Restore engine, optimizer and scheduler state; returns the saved client state.
        Every file is read weights-only: a crafted one is refused in one line."""
        try:
            with weights_only():
                path, client = self.engine.load_checkpoint(str(directory), tag=tag)
        except (pickle.UnpicklingError, RuntimeError) as e:
            if "weights" not in str(e).lower() and "unpickl" not in str(e).lower():
                raise
            raise ConfigError(f"{directory / tag}: {load_error(e)}") from None
        if path is None:
            raise RuntimeError(f"checkpoint {directory / tag} could not be loaded")
        return client

    def load_universal(self, universal: Path) -> None:
        """Load a universal checkpoint (from to_universal) into this engine,
        whatever the world size. DeepSpeed reads its checkpoint.load_universal switch at load
        time, so it is on only for this call.
        Workaround: two slips of DeepSpeed 0.19.8's ZeRO-3 universal load are then put right
        (both no-ops where DeepSpeed got it right; remove when tests/test_upstream.py says
        DeepSpeed fixed them):
        - it gives every parameter group group 0's hyperparameters (our no-decay group would get
          weight decay): each group gets back its own, as saved;
        - it gives every ZeRO-3 sub-group's Adam state one shared `step` tensor, which torch's
          AdamW then increments once per sub-group per step (wrong bias correction): each gets
          its own copy."""
        cfg = self.engine._config
        before = cfg.load_universal_checkpoint
        cfg.load_universal_checkpoint = True
        ds_log = logging.getLogger("DeepSpeed")  # "MPU is not provided, setting tp size to 1"
        level = ds_log.level
        ds_log.setLevel(logging.ERROR)
        try:
            self.load(universal.parent, universal.name)
        finally:
            cfg.load_universal_checkpoint = before
            ds_log.setLevel(level)
        if self.stage != 3:
            return
        base = self.optimizer.optimizer  # the torch optimizer inside DeepSpeed's ZeRO-3 one
        # DeepSpeed's own output, written a moment ago by rank 0 (it holds a ZeroStageEnum).
        with weights_only():
            saved = torch.load(universal / "zero" / "optimizer_state.pt", map_location="cpu",
                               weights_only=True)["optimizer_state_dict"]["param_groups"]
        if len(saved) != len(base.param_groups):
            raise RuntimeError(f"{universal} has {len(saved)} optimizer parameter groups, the "
                               f"optimizer {len(base.param_groups)}")
        for group, want in zip(base.param_groups, saved):
            group.update({k: v for k, v in want.items() if k != "params"})
        for state in base.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()


@contextlib.contextmanager
def weights_only() -> Iterator[None]:
    """Every torch.load inside runs with weights_only=True, whatever the caller passes, with
    DeepSpeed's plain records allow-listed (deepspeed_safe_globals): a crafted checkpoint
    file is refused, never unpickled.
    Workaround: DeepSpeed 0.19's zero_to_fp32, load_checkpoint and ds_to_universal call
    torch.load(weights_only=False); torch's own switch overrides them. Remove when DeepSpeed
    loads weights-only itself (tests/test_upstream.py fails then)."""
    saved = {k: os.environ.pop(k, None)
             for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD")}
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            yield
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None)
            if v is not None:
                os.environ[k] = v


def deepspeed_safe_globals() -> list[type]:
    """What DeepSpeed pickles into its checkpoint files besides tensors: plain records (an
    int Enum, a two-int dataclass, a loss scaler's numbers and dtype). torch rebuilds them by
    __new__ and __dict__ update: none of their code runs."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def zero_fp32_state_dict(ckpt: Path) -> dict[str, torch.Tensor]:
    """The fp32 weights merged from a ZeRO 1-3 checkpoint's shards, by DeepSpeed's own
    zero_to_fp32 (call it under consolidate.weights_only())."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    return get_fp32_state_dict_from_zero_checkpoint(str(ckpt.parent), tag=ckpt.name)
