"""Two ranks on gloo, started the way srun starts them (one process per rank, rank and
world size in the environment): resume equivalence under ZeRO-2/3, and a preemption
signal that reaches only one rank."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, read_metrics
from lmforge.checkpoint import latest_good, verify

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

RUN = [*TINY, "trainer.log_every=1", "trainer.eval_every=0", "trainer.keep_last=0"]


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_ranks(run_dir: Path, n: int, *overrides: str) -> list[subprocess.Popen]:
    port = str(_port())
    procs = []
    for rank in range(n):
        env = {**os.environ, "SLURM_PROCID": str(rank), "SLURM_NTASKS": str(n),
               "SLURM_LOCALID": str(rank), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port,
               "OMP_NUM_THREADS": "1"}
        cmd = [sys.executable, "-m", "lmforge.train", f"hydra.run.dir={run_dir}", *overrides]
        procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    return procs


def wait_all(procs: list[subprocess.Popen], timeout: float = 600) -> list[int]:
    codes, errs = [], []
    for p in procs:
        _, err = p.communicate(timeout=timeout)
        codes.append(p.returncode)
        errs.append(err)
    return codes, errs


def run_ranks(run_dir: Path, n: int, *overrides: str) -> str:
    codes, errs = wait_all(spawn_ranks(run_dir, n, *overrides))
    assert codes == [0] * n, errs[0][-3000:] + errs[-1][-3000:]
    return errs[0]


@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_sigkill_then_resume_equals_uninterrupted(tmp_path: Path, stage: int) -> None:
    args = [*RUN, f"parallel=zero{stage}", "trainer.max_steps=12", "trainer.save_every=2"]
    straight = tmp_path / "straight"
    run_ranks(straight, 2, *args)
    killed = tmp_path / "killed"
    procs = spawn_ranks(killed, 2, *args)
    deadline = time.time() + 300
    while not ((killed / "metrics.jsonl").is_file() and len(read_metrics(killed)) >= 7):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.02)
    for p in procs:
        p.kill()
        p.communicate()
    err = run_ranks(killed, 2, *args)
    assert "resumed from" in err
    want = {r["step"]: r["loss"] for r in read_metrics(straight)}
    got = {r["step"]: r["loss"] for r in read_metrics(killed)}  # last logged value wins
    assert sorted(got) == list(range(1, 13))
    for s in got:
        assert got[s] == pytest.approx(want[s], rel=1e-6), s
    assert sorted(p.name for p in (killed / "checkpoints/step_00000012").glob("trainer_rank*")) \
        == ["trainer_rank0.pt", "trainer_rank1.pt"]


def test_sigusr1_on_one_rank_checkpoints_and_stops_both(tmp_path: Path) -> None:
    run = tmp_path / "run"
    procs = spawn_ranks(run, 2, *RUN, "parallel=zero2", "trainer.max_steps=200")
    deadline = time.time() + 300
    while not ((run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 3):
        assert time.time() < deadline and all(p.poll() is None for p in procs)
        time.sleep(0.05)
    sent = time.time()
    procs[1].send_signal(signal.SIGUSR1)  # Slurm signals every task; one is the hard case
    codes, errs = wait_all(procs, timeout=90)
    assert codes == [75, 75], errs[0][-2000:]
    assert time.time() - sent < 60
    ckpt = latest_good(run / "checkpoints")
    assert ckpt is not None and verify(ckpt) is None
    assert (ckpt / "trainer_rank1.pt").is_file()
    assert int(ckpt.name.split("_")[1]) == max(r["step"] for r in read_metrics(run)) < 200

