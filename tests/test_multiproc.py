"""Two ranks on gloo, started the way srun starts them (one process per rank, rank and
world size in the environment): resume equivalence under ZeRO-2/3, and a preemption
signal that reaches only one rank. The uninterrupted references train in one
`run_distributed` world."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, read_metrics, run_distributed, train_runs
from lmforge.checkpoint import latest_good, verify
from lmforge.distributed import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

RUN = [*TINY, "trainer.log_every=1", "trainer.eval_every=0", "trainer.keep_last=0"]


def spawn_ranks(run_dir: Path, n: int, *overrides: str) -> list[subprocess.Popen]:
    port = str(free_port())
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


STAGES = [2, 3]


def kill_args(stage: int) -> list[str]:
    return [*RUN, f"parallel=zero{stage}", "trainer.max_steps=12", "trainer.save_every=2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Uninterrupted 2-rank runs, in root/zero{stage}."""
    root = tmp_path_factory.mktemp("straight")
    run_distributed(train_runs, 2, [(root / f"zero{s}", kill_args(s)) for s in STAGES])
    return root


@pytest.mark.parametrize("stage", STAGES)
def test_two_rank_sigkill_then_resume_equals_uninterrupted(tmp_path: Path, uninterrupted: Path,
                                                           stage: int) -> None:
    args = kill_args(stage)
    straight = uninterrupted / f"zero{stage}"
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

