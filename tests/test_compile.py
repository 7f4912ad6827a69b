"""trainer.compile: each block compiled in place; the same losses as eager, the same
checkpoint names, and a clear refusal where it cannot work."""
from __future__ import annotations

import subprocess
import sys
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


def test_compile_with_zero3_is_refused_in_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lmforge.train", f"hydra.run.dir={tmp_path}",
                           *TINY, "trainer.compile=true", "parallel=zero3"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    line = proc.stderr.strip().splitlines()[-1]
    assert "trainer.compile=true does not work with parallel.zero_stage=3" in line
    assert not (tmp_path / "checkpoints").exists()
