"""trainer.compile: each block's forward compiled; the same losses as eager, the same
checkpoint names, at ZeRO-1 with activation checkpointing and at ZeRO-3."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY, read_metrics, run_distributed, train_runs

STEPS = ["trainer.max_steps=15", "trainer.log_every=1", "trainer.eval_every=0",
         "trainer.sample_tokens=0", "precision.dtype=bf16", "parallel.zero_stage=1"]


@pytest.mark.slow
def test_compiled_blocks_train_like_eager(tmp_path: Path) -> None:
    """15 steps compiled (with activation checkpointing around the compiled blocks) match
    eager within 2e-3 relative, and the checkpoint's parameter names are eager's."""
    runs = [(tmp_path / "eager", [*TINY, *STEPS]),
            (tmp_path / "compiled", [*TINY, *STEPS, "trainer.compile=true",
                                     "parallel.activation_checkpointing=true"])]
    run_distributed(train_runs, 1, runs, timeout_s=900)
    eager, compiled = ([r["loss"] for r in read_metrics(run)] for run, _ in runs)
    assert len(eager) == len(compiled) == 15
    worst = max(abs(a - b) / abs(a) for a, b in zip(eager, compiled))
    assert worst < 2e-3, (worst, eager, compiled)
    assert compiled[-1] < 0.9 * compiled[0]
    names = [sorted(torch.load(run / "checkpoints/step_00000015/mp_rank_00_model_states.pt",
                               weights_only=False)["module"]) for run, _ in runs]
    assert names[0] == names[1] and not any("_orig_mod" in n for n in names[1])


def _zero3_runs(rank: int, world: int, runs: list) -> dict:
    """train_runs, then what dynamo compiled in this process."""
    from torch._dynamo.utils import counters

    train_runs(rank, world, runs)
    return {"graphs": counters["stats"]["unique_graphs"],
            "breaks": sum(counters["graph_break"].values())}


@pytest.mark.slow
def test_compiled_blocks_train_like_eager_under_zero3(tmp_path: Path) -> None:
    """ZeRO-3 on 2 ranks: DeepSpeed gathers each compiled block whole, so every block runs
    one graph (no graph break, no recompile) and 15 steps match eager within 2e-3."""
    z3 = [*STEPS, "parallel.zero_stage=3"]
    runs = [(tmp_path / "eager", [*TINY, *z3]),
            (tmp_path / "compiled", [*TINY, *z3, "trainer.compile=true"])]
    seen = run_distributed(_zero3_runs, 2, runs, timeout_s=900)
    # One graph for training, one for the final evaluation (no grad, eval mode).
    assert seen == [{"graphs": 2, "breaks": 0}] * 2, seen
    eager, compiled = ([r["loss"] for r in read_metrics(run)] for run, _ in runs)
    assert len(eager) == len(compiled) == 15
    worst = max(abs(a - b) / abs(a) for a, b in zip(eager, compiled))
    assert worst < 2e-3, (worst, eager, compiled)
