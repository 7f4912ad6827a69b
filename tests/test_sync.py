"""Quiet steps (no log, eval, save or check) make no host-device sync, in lmforge or in
DeepSpeed: a non-finite step is skipped on the device (the fused AdamW's found_inf), and the
non-finite count and the stop requests live on the device, read at check points.
Counted on CPU as calls of `aten::_local_scalar_dense` (what .item(), float() and bool() of
a tensor run) and of DeepSpeed's accelerator synchronize, attributed to their caller."""
from __future__ import annotations

import collections
import traceback
from pathlib import Path

import pytest

from conftest import TINY, run_distributed, train_in_process

QUIET = ["trainer.max_steps=12", "trainer.log_every=6", "trainer.eval_every=0",
         "trainer.save_every=0", "trainer.save_every_min=0", "trainer.check_every=6",
         "trainer.sample_tokens=0"]
# (ZeRO stage, dtype): the bf16 ZeRO-1 and ZeRO-3, and the default job's fp32 ZeRO-0.
# Not here: bf16 at ZeRO-0 (DeepSpeed's BF16_Optimizer reads every tensor's overflow) and
# fp16 (its loss scaler reads the overflow); the GPU recipes use ZeRO-1/2 in bf16.
CONFIGS = [(1, "bf16"), (3, "bf16"), (0, "fp32")]


def _count_syncs(rank: int, world: int, tmp: Path) -> dict[int, list[dict[str, int]]]:
    import torch
    from deepspeed.accelerator import get_accelerator
    from torch.utils._python_dispatch import TorchDispatchMode

    from lmforge import engine

    steps: list[list[str]] = []

    def caller() -> str:
        for frame in reversed(traceback.extract_stack()[:-3]):
            f = frame.filename
            if "/lmforge/" in f or "/deepspeed/" in f:
                return "lmforge" if "/lmforge/" in f else "deepspeed"
        return "other"

    class Count(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default and steps:
                steps[-1].append(caller())
            return func(*args, **(kwargs or {}))

    train_step, acc = engine.Engine.train_step, get_accelerator()
    synchronize = acc.synchronize

    def marked(self, micro):
        steps.append([])
        return train_step(self, micro)

    def counted(*a, **k):
        if steps:
            steps[-1].append("synchronize")
        return synchronize(*a, **k)

    engine.Engine.train_step, acc.synchronize = marked, counted
    out = {}
    for stage, dtype in CONFIGS:
        steps.clear()
        with Count():
            train_in_process(tmp / f"zero{stage}{dtype}", *TINY, *QUIET,
                             f"parallel.zero_stage={stage}", f"precision.dtype={dtype}")
        # Entries of step k: from the start of step k to the start of step k+1.
        out[(stage, dtype)] = [dict(collections.Counter(s)) for s in steps]
    return out


@pytest.mark.slow
def test_quiet_steps_make_no_sync(tmp_path: Path) -> None:
    (counts,) = run_distributed(_count_syncs, 1, tmp_path)
    assert list(counts) == CONFIGS
    for config, per_step in counts.items():
        assert len(per_step) == 12
        # Steps 1-2 warm up (ZeRO-3 traces the module order); 6 and 12 log.
        quiet = [c for i, c in enumerate(per_step, 1) if i not in (1, 2, 6, 12)]
        assert quiet == [{}] * 8, (config, quiet)
        # Each check/log step reads the loss (and the norm): the counter does see lmforge.
        assert per_step[5].get("lmforge", 0) >= 1, (config, per_step[5])


def _diverge(rank: int, world: int, tmp: Path, stage: int) -> str:
    from lmforge.trainer import NonFiniteError

    try:
        train_in_process(tmp / f"zero{stage}", *TINY, "trainer.max_steps=40", "trainer.log_every=40",
                         "trainer.eval_every=0", "trainer.save_every=0",
                         "trainer.save_every_min=0", "trainer.check_every=4",
                         "trainer.max_bad_steps=2", "optim.lr=1e12", "optim.grad_clip=0",
                         "optim.warmup_steps=1", "precision.dtype=bf16",
                         f"parallel.zero_stage={stage}", "trainer.sample_tokens=0")
    except NonFiniteError as e:
        return str(e)
    return "no error"


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 3])
def test_a_non_finite_streak_still_stops_every_rank(tmp_path: Path, stage: int) -> None:
    """Read every trainer.check_every steps, a streak past trainer.max_bad_steps still stops
    the run on every rank with one message (and the step count it saw)."""
    messages = run_distributed(_diverge, 2, tmp_path, stage)
    assert messages[0] == messages[1], messages
    assert "steps in a row had a non-finite loss or gradient" in messages[0], messages
    assert int(messages[0].split()[0]) >= 2


def _nonfinite_steps(rank: int, world: int) -> dict[str, tuple]:
    """For each stage and dtype, after a good step, a step whose loss and gradients are all
    NaN, and a good step again: (applied by the NaN step, weights unchanged by it, DeepSpeed's
    skipped-step count, applied by the next, weights finite after it, AdamW's step counts
    gained over both)."""
    import torch

    from conftest import tiny_engine
    from lmforge.engine import Engine

    def adam_steps(engine: Engine) -> torch.Tensor:
        return torch.stack([st["step"] for st in engine._adamw.state.values()])

    out = {}
    for parallel in ("zero0", "zero1", "zero2", "zero3", "zero3_offload"):
        for dtype in ("fp32", "bf16"):
            engine, cfg = tiny_engine(f"parallel={parallel}", f"precision={dtype}")
            t = cfg.trainer
            ids = torch.randint(512, (t.micro_batch_size, cfg.data.seq_len))
            batch = {"input_ids": ids, "labels": ids}
            engine.train_step([batch])  # one good step: optimizer state exists
            before, steps = engine.eval_loss([batch]), adam_steps(engine)
            poison = engine.module.blocks[0].register_forward_hook(
                lambda m, i, o: o * float("nan"))
            _, _, applied = engine.train_step([batch])
            poison.remove()
            after = engine.eval_loss([batch])
            _, _, applied_next = engine.train_step([batch])
            finite = all(bool(torch.isfinite(p).all()) for p in engine._adamw.param_groups[0]["params"])
            steps = adam_steps(engine) - steps
            out[f"{parallel} {dtype}"] = (bool(applied), bool(torch.equal(before, after)),
                                           engine.engine.skipped_steps, bool(applied_next),
                                           finite and bool(torch.isfinite(engine.eval_loss([batch]))),
                                           set(steps.tolist()))
    return out


@pytest.mark.slow
def test_a_non_finite_step_is_skipped_at_every_stage() -> None:
    """Without a per-step read, the update of a non-finite step is still not applied: the
    fused AdamW skips it on the device (fp32; bf16 at ZeRO 1-3), DeepSpeed's host check at
    bf16 ZeRO-0 and with the optimizer offloaded. Weights and Adam moments stay as they were, AdamW's step count too (bias
    correction), and the next good step trains."""
    (seen,) = run_distributed(_nonfinite_steps, 1)
    assert len(seen) == 10, seen
    for config, got in seen.items():
        host_check = config == "zero0 bf16" or config.startswith("zero3_offload")
        assert got == (False, True, int(host_check), True, True, {1.0}), (config, got)
