"""Checkpoints: manifests catch damage, resume picks the newest good one, signals and
kills never lose the last good checkpoint, and a resumed run equals an uninterrupted one."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, TINY, read_metrics, run_train
from lmforge.checkpoint import latest_good, verify, write_latest, write_manifest

RUN = [*TINY, "trainer.log_every=1", "trainer.eval_every=0", "trainer.keep_last=0"]


def _fake_ckpt(root: Path, step: int) -> Path:
    ckpt = root / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    (ckpt / "weights.pt").write_bytes(os.urandom(4096))
    (ckpt / "trainer_rank0.pt").write_bytes(b"state")
    write_manifest(ckpt, step)
    return ckpt


def test_manifest_detects_truncation_and_bit_flips(tmp_path: Path) -> None:
    ckpt = _fake_ckpt(tmp_path, 1)
    assert verify(ckpt) is None
    data = (ckpt / "weights.pt").read_bytes()
    (ckpt / "weights.pt").write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    assert "checksum" in verify(ckpt)
    (ckpt / "weights.pt").write_bytes(data[:100])
    assert "bytes" in verify(ckpt)
    (ckpt / "weights.pt").unlink()
    assert "missing" in verify(ckpt)
    (ckpt / "manifest.json").unlink()
    assert "manifest" in verify(ckpt)


def test_latest_good_skips_damaged_and_partial(tmp_path: Path) -> None:
    good = _fake_ckpt(tmp_path, 1)
    bad = _fake_ckpt(tmp_path, 2)
    (tmp_path / ".tmp-step_00000003").mkdir()  # a save that was killed
    write_latest(tmp_path, bad.name)
    assert latest_good(tmp_path) == bad
    with open(bad / "weights.pt", "r+b") as f:
        f.truncate(10)
    assert latest_good(tmp_path) == good
    assert latest_good(tmp_path / "nothing-here") is None


def _spawn(run_dir: Path, *overrides: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "lmforge.train", f"hydra.run.dir={run_dir}", *overrides]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def _wait_for_step(run_dir: Path, step: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        path = run_dir / "metrics.jsonl"
        if path.is_file() and any(r["step"] >= step for r in read_metrics(run_dir)):
            return
        assert proc.poll() is None, proc.stderr.read()
        time.sleep(0.05)
    raise TimeoutError(f"step {step} not reached")


@pytest.fixture(scope="module")
def straight(tmp_path_factory) -> dict[int, float]:
    """Per-step losses of an uninterrupted 40-step run."""
    run = tmp_path_factory.mktemp("straight") / "run"
    run_train(run, *RUN, "trainer.max_steps=40")
    return {r["step"]: r["loss"] for r in read_metrics(run)}


def _losses(run: Path) -> dict[int, float]:
    # A resumed run appends; the last value logged for a step is the one that counted.
    return {r["step"]: r["loss"] for r in read_metrics(run)}


@pytest.mark.slow
@pytest.mark.parametrize("kill_at", [12, 21, 29])
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path: Path, straight, kill_at: int) -> None:
    run = tmp_path / "run"
    proc = _spawn(run, *RUN, "trainer.max_steps=40", "trainer.save_every=4")
    _wait_for_step(run, kill_at, proc)
    proc.kill()  # SIGKILL: no handler runs, possibly in the middle of a save
    proc.wait()
    resumed_from = latest_good(run / "checkpoints")
    run_train(run, *RUN, "trainer.max_steps=40", "trainer.save_every=4")
    losses = _losses(run)
    assert sorted(losses) == list(range(1, 41))
    assert losses == straight  # bit-exact on one process
    assert resumed_from is None or verify(resumed_from) is None


@pytest.mark.slow
def test_kill_during_a_save_keeps_a_loadable_latest(tmp_path: Path, straight) -> None:
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    proc = _spawn(run, *RUN, "trainer.max_steps=40", "trainer.save_every=1")
    caught = False
    while proc.poll() is None and not caught:
        if ckpts.is_dir() and any(n.startswith(".tmp-step_000000") and n > ".tmp-step_00000010"
                                  for n in os.listdir(ckpts)):
            proc.kill()  # a save is in flight
            caught = True
        time.sleep(0.0005)
    proc.wait()
    assert caught, "the run ended before a save could be interrupted"
    good = latest_good(ckpts)
    assert good is not None and verify(good) is None
    assert (good / "config.yaml").is_file() and (good / "tokenizer.json").is_file()
    run_train(run, *RUN, "trainer.max_steps=40", "trainer.save_every=1")
    assert _losses(run) == straight


@pytest.mark.slow
def test_sigusr1_saves_and_exits_for_requeue(tmp_path: Path, straight) -> None:
    run = tmp_path / "run"
    proc = _spawn(run, *RUN, "trainer.max_steps=40")
    _wait_for_step(run, 15, proc)
    sent = time.time()
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 75, err[-2000:]
    assert time.time() - sent < 60
    ckpt = latest_good(run / "checkpoints")
    stopped_at = max(_losses(run))
    assert ckpt is not None and ckpt.name == f"step_{stopped_at:08d}" and stopped_at < 40
    proc = run_train(run, *RUN, "trainer.max_steps=40")
    assert f"resumed from {ckpt}" in proc.stderr
    assert _losses(run) == straight


@pytest.mark.slow
def test_damaged_latest_falls_back_to_previous(tmp_path: Path, straight) -> None:
    run = tmp_path / "run"
    run_train(run, *RUN, "trainer.max_steps=8", "trainer.save_every=4")
    shard = run / "checkpoints/step_00000008/mp_rank_00_model_states.pt"
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size // 2)
    proc = run_train(run, *RUN, "trainer.max_steps=40", "trainer.save_every=4")
    assert "skipping checkpoint" in proc.stderr and "step_00000004" in proc.stderr
    assert _losses(run) == straight


@pytest.mark.slow
def test_divergence_stops_with_last_good_checkpoint_intact(tmp_path: Path) -> None:
    run = tmp_path / "run"
    proc = run_train(run, *RUN, "trainer.max_steps=30", "trainer.save_every=1",
                     "optim.lr=1e12", "optim.grad_clip=0", "optim.warmup_steps=1",
                     "trainer.max_bad_steps=3", check=False)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert "3 steps in a row had a non-finite loss or gradient" in proc.stderr
    rows = read_metrics(run)
    assert rows[-1]["bad_steps"] >= 1 or rows[-1]["loss"] != rows[-1]["loss"]
    ckpt = latest_good(run / "checkpoints")
    assert ckpt is not None and verify(ckpt) is None
    last_finite = max(r["step"] for r in rows if r["loss"] is not None)
    assert ckpt.name == f"step_{last_finite:08d}" and last_finite < rows[-1]["step"]


@pytest.mark.slow
def test_resume_refuses_a_different_model(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_train(run, *RUN, "trainer.max_steps=2")
    proc = run_train(run, *RUN, "trainer.max_steps=4", "model.n_layers=2", check=False)
    assert proc.returncode == 2 and "different model" in proc.stderr
    proc = run_train(tmp_path / "other", *RUN, "trainer.max_steps=4",
                     f"trainer.resume_from={tmp_path}/missing", check=False)
    assert proc.returncode == 2 and "no such directory" in proc.stderr
