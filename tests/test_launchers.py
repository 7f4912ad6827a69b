"""The same tiny two-rank ZeRO-3 run started by every launcher the README names (torchrun,
torchrun as two "nodes" on loopback, the `deepspeed` launcher, `accelerate launch`): each
run is a world of 2, and all of them log the same loss at every step."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest

from conftest import REPO, TINY, read_metrics
from lmforge.distributed import free_port

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

RUN = [*TINY, "trainer.log_every=1", "trainer.eval_every=0", "parallel=zero3",
       "trainer.max_steps=3"]
BIN = Path(sys.executable).parent
TIMEOUT = 600


def _train(run: Path) -> list[str]:
    return ["-m", "lmforge.train", f"hydra.run.dir={run}", *RUN]


def torchrun(run: Path) -> list[list[str]]:
    return [[str(BIN / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
             "--master_port", str(free_port()), *_train(run)]]


def torchrun_two_nodes(run: Path) -> list[list[str]]:
    """Two torchrun invocations, one per "node", static rendezvous on loopback; both nodes
    see the same run directory, as on a shared filesystem."""
    port = str(free_port())
    return [[str(BIN / "torchrun"), "--nnodes", "2", "--nproc_per_node", "1",
             "--node_rank", str(node), "--master_addr", "127.0.0.1", "--master_port", port,
             *_train(run)] for node in (0, 1)]


def deepspeed(run: Path) -> list[list[str]]:
    # On DS_ACCELERATOR=cpu the launcher counts one device per NUMA node (1 here, and 1 when
    # numactl is missing); --num_gpus 2 asks for 2 local processes regardless. The
    # --local_rank=N it appends is dropped by lmforge-train.
    return [[str(BIN / "deepspeed"), "--num_gpus", "2",
             "--master_port", str(free_port()), "--module", *_train(run)[1:]]]


def accelerate(run: Path) -> list[list[str]]:
    return [[str(BIN / "accelerate"), "launch", "--config_file",
             str(REPO / "launch/accelerate/cpu_2proc.yaml"),
             "--main_process_port", str(free_port()), *_train(run)]]


LAUNCHERS = {f.__name__: f for f in (torchrun, torchrun_two_nodes, deepspeed, accelerate)}


def launch(name: str, root: Path) -> tuple[Path, list[int], str]:
    """Start every command of one launch at once, wait for all; (run dir, exit codes, log)."""
    run = root / name
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logs = [root / f"{name}.{i}.log" for i in range(2)]
    procs = []
    for cmd, log in zip(LAUNCHERS[name](run), logs):
        with open(log, "w") as out:
            procs.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out,
                                          stderr=subprocess.STDOUT, start_new_session=True))
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=TIMEOUT))
        except subprocess.TimeoutExpired:
            for q in procs:  # each launcher and its ranks form one session of ours
                if q.poll() is None:
                    os.killpg(q.pid, signal.SIGKILL)
                    q.wait()
            codes.append(-9)
    text = "\n".join(f"--- {l.name}\n{l.read_text()[-3000:]}" for l in logs if l.exists())
    return run, codes, text


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    """Each launcher runs once per module, on first use (one training job at a time)."""
    root = tmp_path_factory.mktemp("launchers")
    return cache(lambda name: launch(name, root))


@pytest.mark.parametrize("name", list(LAUNCHERS))
def test_launcher_starts_a_world_of_two(launched, name: str) -> None:
    run, codes, log = launched(name)
    assert set(codes) == {0}, log
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["zero_stage"] == 3
    assert [r["step"] for r in read_metrics(run)] == [1, 2, 3]
    ckpt = run / "checkpoints" / (run / "checkpoints/latest").read_text().strip()
    assert sorted(p.name for p in ckpt.glob("trainer_rank*")) == \
        ["trainer_rank0.pt", "trainer_rank1.pt"]


def test_every_launcher_logs_the_same_losses(launched) -> None:
    losses = {}
    for name in LAUNCHERS:
        run, codes, log = launched(name)
        assert set(codes) == {0}, log
        assert json.loads((run / "summary.json").read_text())["world_size"] == 2, name
        losses[name] = [(r["step"], r["loss"]) for r in read_metrics(run)]
    want = losses["torchrun"]
    for name, got in losses.items():
        assert [s for s, _ in got] == [s for s, _ in want] == [1, 2, 3], name
        assert [l for _, l in got] == pytest.approx([l for _, l in want], rel=1e-6), name
