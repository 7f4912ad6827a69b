"""slurm/train.sbatch under a faked Slurm (tests/fake_slurm stands in for srun and
scontrol on one machine): it starts one rank per task, and a preemption signal ends in a
verified checkpoint and a requeue."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, read_metrics
from lmforge.checkpoint import latest_good

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]


def sbatch(tmp_path: Path, *overrides: str) -> tuple[subprocess.Popen, Path, Path]:
    state, run = tmp_path / "slurm-state", tmp_path / "run"
    state.mkdir()
    env = {**os.environ, "PATH": f"{REPO / 'tests/fake_slurm'}:{os.environ['PATH']}",
           "FAKE_SLURM_STATE": str(state), "SLURM_JOB_ID": "4242", "SLURM_JOB_NAME": "t",
           "SLURM_NTASKS": "2", "SLURM_JOB_NODELIST": "localhost", "SLURM_CPUS_PER_TASK": "1",
           "SLURM_SUBMIT_DIR": str(REPO), "RUN_DIR": str(run), "PYTHON": os.sys.executable}
    proc = subprocess.Popen(["bash", str(REPO / "slurm/train.sbatch"), *TINY, *overrides],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, run, state


def test_sbatch_starts_one_rank_per_task(tmp_path: Path) -> None:
    proc, run, state = sbatch(tmp_path, "trainer.max_steps=3", "parallel=zero2")
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert json.loads((run / "summary.json").read_text())["world_size"] == 2
    logs = sorted(p.name for p in (run / "logs").glob("*-rank*.log"))
    assert [n.split("-rank")[1] for n in logs] == ["0.log", "1.log"]
    assert not (state / "requeued").exists()


def test_sbatch_usr1_checkpoints_and_requeues(tmp_path: Path) -> None:
    proc, run, state = sbatch(tmp_path, "trainer.max_steps=500", "trainer.log_every=1")
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 2):
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    for pid in (state / "pids").read_text().split():  # Slurm signals every task
        os.kill(int(pid), signal.SIGUSR1)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 75, out
    assert (state / "requeued").read_text().split() == ["4242"]
    ckpt = latest_good(run / "checkpoints")
    assert ckpt is not None and (ckpt / "trainer_rank1.pt").is_file()
