"""Runs that survive scale: a dead, stalled or failing rank ends every rank in time with
one line naming it; retention by write order and explicit rollbacks; damaged-only and
poisoned checkpoints refused; signals honoured from start to exit; one job per run dir."""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, Payload, read_metrics
from lmforge.checkpoint import (SET_ASIDE, latest_good, load_trainer_state, pick_checkpoint,
                                prune, verify, write_latest, write_manifest)
from lmforge.config import ConfigError
from lmforge.distributed import free_port

RUN = [*TINY, "trainer.log_every=1", "trainer.eval_every=0"]


def _fake_ckpt(root: Path, step: int) -> Path:
    ckpt = root / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_rank0.pt").write_bytes(os.urandom(256))
    write_manifest(ckpt, step)
    time.sleep(0.01)  # distinct write times
    return ckpt


def _damage(ckpt: Path) -> None:
    with open(ckpt / "trainer_rank0.pt", "r+b") as f:
        f.truncate(3)


# --- retention, rollback, damaged-only: the decisions, without training ----------------------

def test_the_checkpoint_just_written_always_survives(tmp_path: Path) -> None:
    four, eight = _fake_ckpt(tmp_path, 4), _fake_ckpt(tmp_path, 8)
    six = _fake_ckpt(tmp_path, 6)  # written last, after a rollback to step 4
    prune(tmp_path, 1, six)
    assert [p.name for p in tmp_path.glob("step_*")] == [six.name]
    assert not four.exists() and not eight.exists()


def test_a_rollback_sets_newer_checkpoints_aside_and_requeues_keep_progress(
        tmp_path: Path) -> None:
    four, eight = _fake_ckpt(tmp_path, 4), _fake_ckpt(tmp_path, 8)
    write_latest(tmp_path, eight.name)
    assert pick_checkpoint(tmp_path, str(four), False) == str(four)
    assert not eight.exists()
    aside = list((tmp_path / SET_ASIDE).iterdir())
    assert len(aside) == 1 and aside[0].name.startswith("step_00000008")
    # The run goes on from 4 and writes 6: a requeue with the same resume_from keeps it.
    six = _fake_ckpt(tmp_path, 6)
    write_latest(tmp_path, six.name)
    assert pick_checkpoint(tmp_path, str(four), False) == str(six)
    # Without resume_from the newest good one is taken; a newer damaged one is set aside.
    nine = _fake_ckpt(tmp_path, 9)
    _damage(nine)
    assert pick_checkpoint(tmp_path, None, False) == str(six)
    assert not nine.exists() and len(list((tmp_path / SET_ASIDE).iterdir())) == 2


def test_a_run_dir_whose_checkpoints_all_fail_is_refused(tmp_path: Path) -> None:
    for step in (2, 4):
        _damage(_fake_ckpt(tmp_path, step))
    with pytest.raises(ConfigError, match="every checkpoint .* fails verification.*start_fresh"):
        pick_checkpoint(tmp_path, None, False)
    assert latest_good(tmp_path) is None and len(list(tmp_path.glob("step_*"))) == 2
    assert pick_checkpoint(tmp_path, None, True) is None  # asked to start fresh
    assert not list(tmp_path.glob("step_*")) and len(list((tmp_path / SET_ASIDE).iterdir())) == 2


def test_a_manifest_without_its_file_list_fails_verification(tmp_path: Path) -> None:
    ckpt = _fake_ckpt(tmp_path, 1)
    (ckpt / "manifest.json").write_text('{"step": 1}')
    assert "file list" in verify(ckpt)




def test_a_poisoned_trainer_state_is_refused_unrun(tmp_path: Path) -> None:
    ckpt = tmp_path / "step_00000001"
    ckpt.mkdir()
    torch.save({"step": 1, "x": Payload(tmp_path / "pwned")}, ckpt / "trainer_rank0.pt")
    with pytest.raises(ConfigError, match="refusing to unpickle"):
        load_trainer_state(ckpt, 0)
    assert not (tmp_path / "pwned").exists()


# --- end to end, one process --------------------------------------------------------------

def _start(run_dir: Path, *overrides: str, env: dict | None = None,
           preexec=None) -> tuple[subprocess.Popen, Path]:
    run_dir.mkdir(parents=True, exist_ok=True)
    log = run_dir.parent / f"{run_dir.name}-{time.monotonic_ns()}.err"
    cmd = [sys.executable, "-m", "lmforge.train", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
                            env={**os.environ, **(env or {})}, preexec_fn=preexec)
    return proc, log


def _wait_for(cond, procs: list[subprocess.Popen], timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not cond():
        assert time.time() < deadline, "timed out"
        assert all(p.poll() is None for p in procs), "a process ended early"
        time.sleep(0.01)


def _run(run_dir: Path, *overrides: str) -> tuple[int, str]:
    proc, log = _start(run_dir, *overrides)
    proc.wait(timeout=600)
    return proc.returncode, log.read_text()


@pytest.mark.slow
def test_rollback_end_to_end_keeps_the_new_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, err = _run(run, *RUN, "trainer.max_steps=8", "trainer.save_every=4",
                     "trainer.keep_last=2")
    assert code == 0, err[-3000:]
    rollback = [*RUN, f"trainer.resume_from={run}/checkpoints/step_00000004",
                "trainer.save_every=3", "trainer.keep_last=1"]
    code, err = _run(run, *rollback, "trainer.max_steps=10")
    assert code == 0, err[-3000:]
    assert "set aside step_00000008" in err and "resumed from" in err
    assert [p.name for p in (run / "checkpoints").glob("step_*")] == ["step_00000010"]
    assert (run / "checkpoints/latest").read_text().strip() == "step_00000010"
    # The requeued job (same command) keeps its own progress instead of going back to 4.
    code, err = _run(run, *rollback, "trainer.max_steps=12")
    assert code == 0, err[-3000:]
    assert "was applied before" in err and "step_00000010 (step 10" in err
    assert max(r["step"] for r in read_metrics(run)) == 12


@pytest.mark.slow
def test_a_poisoned_checkpoint_is_refused_without_running_it(tmp_path: Path) -> None:
    run = tmp_path / "run"
    code, err = _run(run, *RUN, "trainer.max_steps=2")
    assert code == 0, err[-3000:]
    ckpt = run / "checkpoints/step_00000002"
    states = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)
    states["evil"] = Payload(tmp_path / "pwned")
    torch.save(states, ckpt / "mp_rank_00_model_states.pt")
    write_manifest(ckpt, 2)  # the attacker can rewrite the manifest too
    code, err = _run(run, *RUN, "trainer.max_steps=4")
    assert code == 2 and not (tmp_path / "pwned").exists()
    assert err.strip().splitlines()[-1].startswith("lmforge-train: config error: ")
    assert "refusing to unpickle" in err and "Traceback" not in err


@pytest.mark.slow
def test_sigusr1_during_set_up_exits_75_without_a_checkpoint(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc, log = _start(run, *RUN, "trainer.max_steps=50")
    _wait_for(lambda: "run dir" in log.read_text(), [proc])  # handlers are in place
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 75, log.read_text()[-3000:]
    assert not list(run.glob("checkpoints/step_*")) and not (run / "metrics.jsonl").exists()


@pytest.mark.slow
def test_sigusr1_during_a_save_saves_once_and_exits_75(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc, log = _start(run, *RUN, "trainer.max_steps=200", "trainer.save_every=3")
    _wait_for(lambda: any((run / "checkpoints").glob(".tmp-step_*")), [proc])
    proc.send_signal(signal.SIGUSR1)
    assert proc.wait(timeout=300) == 75, log.read_text()[-3000:]
    saves = [ln.split("checkpoints/")[1] for ln in log.read_text().splitlines() if " saved " in ln]
    assert len(saves) == len(set(saves)) == 1  # the save under way, and no second one
    last = latest_good(run / "checkpoints")
    assert last is not None and last.name == saves[0]
    assert max(r["step"] for r in read_metrics(run)) == int(last.name.split("_")[1])


@pytest.mark.slow
def test_a_second_job_in_a_locked_run_dir_is_refused(tmp_path: Path) -> None:
    run = tmp_path / "run"
    first, log = _start(run, *RUN, "trainer.max_steps=500")
    _wait_for(lambda: "run dir" in log.read_text(), [first])
    code, err = _run(run, *RUN, "trainer.max_steps=500")
    assert code == 2 and "is in use by another job (host" in err and "Traceback" not in err
    first.kill()
    first.wait()
    code, err = _run(run, *RUN, "trainer.max_steps=0")  # the dead holder's lock is taken over
    assert code == 0 and "took over the lock" in err, err[-3000:]


# --- two ranks, started without a launcher agent (as srun starts them) -----------------------

MP = [*RUN, "parallel=zero2", "trainer.keep_last=0"]


def _ranks(run_dir: Path, *overrides: str, limit_rank1: int = 0) -> list[tuple]:
    port = str(free_port())
    out = []
    for rank in range(2):
        env = {"SLURM_PROCID": str(rank), "SLURM_NTASKS": "2", "SLURM_LOCALID": str(rank),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "OMP_NUM_THREADS": "1"}
        pre = None
        if rank == 1 and limit_rank1:  # a full disk on rank 1 only: writes fail with EFBIG
            pre = lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit_rank1, limit_rank1))  # noqa: E731
        out.append(_start(run_dir, *overrides, env=env, preexec=pre))
        time.sleep(0.2)
    return out


def _wait_codes(ranks: list[tuple], timeout: float) -> list[int]:
    deadline = time.time() + timeout
    for p, _ in ranks:
        p.wait(timeout=max(deadline - time.time(), 1))
    return [p.returncode for p, _ in ranks]


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, float]:
    run = tmp_path_factory.mktemp("straight") / "run"
    ranks = _ranks(run, *MP, "trainer.max_steps=10")
    assert _wait_codes(ranks, 600) == [0, 0], ranks[0][1].read_text()[-3000:]
    return {r["step"]: r["loss"] for r in read_metrics(run)}


def _resumes_exactly(run: Path, straight: dict[int, float]) -> None:
    ranks = _ranks(run, *MP, "trainer.max_steps=10")
    assert _wait_codes(ranks, 600) == [0, 0], ranks[0][1].read_text()[-3000:]
    assert "resumed from" in ranks[0][1].read_text()
    got = {r["step"]: r["loss"] for r in read_metrics(run)}  # the last logged value wins
    assert sorted(got) == list(range(1, 11))
    for s in got:
        assert got[s] == pytest.approx(straight[s], rel=1e-6), s


@pytest.mark.slow
@pytest.mark.multiproc
@pytest.mark.parametrize("how", ["SIGKILL", "SIGSTOP"])
def test_a_dead_or_stalled_rank_stops_the_other_in_time(tmp_path: Path, how: str,
                                                        straight: dict[int, float]) -> None:
    run = tmp_path / "run"
    timeout_s = 60
    ranks = _ranks(run, *MP, "trainer.max_steps=10", "trainer.save_every=2",
                   f"trainer.dist_timeout_s={timeout_s}")
    _wait_for(lambda: (run / "metrics.jsonl").is_file() and len(read_metrics(run)) >= 4,
              [p for p, _ in ranks])
    victim, _ = ranks[1]
    victim.send_signal(getattr(signal, how))
    t0 = time.time()
    survivor, log = ranks[0]
    code = survivor.wait(timeout=timeout_s + 90)
    took = time.time() - t0
    err = log.read_text().strip().splitlines()
    assert code == 4, "\n".join(err[-20:])
    assert err[-1].startswith("lmforge-train: rank 0 stops: ") and "rank 1" in err[-1], err[-1]
    assert took < (30 if how == "SIGKILL" else timeout_s + 60), took
    victim.kill()
    victim.wait()
    _resumes_exactly(run, straight)


@pytest.mark.slow
@pytest.mark.multiproc
def test_a_full_disk_on_one_rank_during_a_save_stops_both(tmp_path: Path,
                                                          straight: dict[int, float]) -> None:
    run = tmp_path / "run"
    ranks = _ranks(run, *MP, "trainer.max_steps=4", "trainer.save_every=2")
    assert _wait_codes(ranks, 600) == [0, 0], ranks[1][1].read_text()[-3000:]
    ranks = _ranks(run, *MP, "trainer.max_steps=10", "trainer.save_every=2",
                   limit_rank1=1 << 20)
    ranks[1][0].wait(timeout=300)
    failed = time.time()
    codes = _wait_codes(ranks, 120)
    assert time.time() - failed < 60 and codes[1] == 1 and codes[0] in (1, 4), codes
    lines = ranks[1][1].read_text().strip().splitlines()
    assert lines[-1].startswith("lmforge-train: rank 1 stops: could not write this rank's "
                                "checkpoint files (disk full"), lines[-3:]
    assert "Traceback" not in ranks[1][1].read_text()
    assert "rank 1" in ranks[0][1].read_text().strip().splitlines()[-1]
    last = latest_good(run / "checkpoints")
    assert last is not None and last.name == "step_00000004" and verify(last) is None
    _resumes_exactly(run, straight)
