"""`run_distributed(fn, world_size, *args)`: `fn(rank, world_size, *args)` on that many
spawned processes joined in one gloo process group, with no launcher and no CLI start-up;
the return values come back in rank order, and an exception on any rank fails the caller
with that rank's traceback."""
from __future__ import annotations

import os
import pickle
import shutil
import signal
import tempfile
import time
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from lmforge.distributed import exit_process, free_port, teardown

# What a launcher would give each rank on this CPU-only machine. One intra-op thread: two
# ranks share 2 cores, and two threads each are many times slower under load.
ENV = {"MASTER_ADDR": "127.0.0.1", "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1"}


def run_distributed(fn: Callable[..., Any], world_size: int, *args: Any, timeout_s: float = 600,
                    env: dict[str, str] | None = None) -> list[Any]:
    """[fn(0, world_size, *args), ..., fn(world_size - 1, ...)], each in its own process.

    `fn` must be picklable by reference (a module-level function of an importable module,
    e.g. a test file), as must `args` and the results. `env` is added to every rank's
    environment. All ranks are stopped once one fails or `timeout_s` has passed."""
    out = Path(tempfile.mkdtemp(prefix="run_distributed-"))
    rank_env = {**ENV, "MASTER_PORT": str(free_port()), "WORLD_SIZE": str(world_size),
                **(env or {})}
    # start_processes' wrapper writes a failing rank's traceback to its error file.
    ctx = mp.start_processes(_entry, args=(fn, world_size, rank_env, str(out), timeout_s, args),
                             nprocs=world_size, join=False, start_method="spawn")
    procs, deadline = ctx.processes, time.monotonic() + timeout_s
    try:
        while (running := _running(procs)) and not any(p.exitcode for p in procs):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"run_distributed({fn.__name__}, {world_size}) still running "
                                   f"after {timeout_s:.0f}s; stopped ranks {ctx.pids()}")
            wait([p.sentinel for p in running], timeout=deadline - time.monotonic())
        # After a failure the others usually fail a moment later (their peer is gone): let
        # them report, so that the first error can be told from its consequences.
        grace = time.monotonic() + 5
        while (running := _running(procs)) and time.monotonic() < grace:
            wait([p.sentinel for p in running], timeout=grace - time.monotonic())
        stopped = _stop(procs)
        failed = [r for r, p in enumerate(procs) if p.exitcode and r not in stopped]
        if failed:
            raise RankFailed(_report(failed, procs, ctx.error_files))
        results = []
        for rank in range(world_size):
            with open(out / f"rank{rank}.pkl", "rb") as f:
                results.append(pickle.load(f))
        return results
    finally:
        _stop(procs)
        shutil.rmtree(out, ignore_errors=True)
        for path in ctx.error_files:
            Path(path).unlink(missing_ok=True)


class RankFailed(RuntimeError):
    """A rank of a `run_distributed` world raised or died."""


def _report(failed: list[int], procs: list, error_files: list[str]) -> str:
    """Each failed rank's traceback (or exit status), the earliest failure first."""
    def when(rank: int) -> float:
        path = Path(error_files[rank])
        return path.stat().st_mtime if path.is_file() else float("inf")

    parts = []
    for rank in sorted(failed, key=when):
        path = Path(error_files[rank])
        why = pickle.loads(path.read_bytes()) if path.is_file() else \
            f"exited with code {procs[rank].exitcode} (a negative code is a signal)\n"
        parts.append(f"rank {rank} of {len(procs)}: {why}")
    return "\n" + "\n".join(parts)


def _entry(rank: int, fn: Callable[..., Any], world_size: int, env: dict[str, str], out: str,
           timeout_s: float, args: tuple) -> None:
    """One rank: its launcher environment, the process group, `fn`, its pickled result."""
    os.environ.update(env, RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    dist.init_process_group("gloo", rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    # No try/finally: a rank that raises keeps its connections until its traceback is
    # written and it exits, so its peers' errors (peer gone) come after its own.
    result = fn(rank, world_size, *args)
    dist.barrier()  # no rank leaves (and tears the group down) while another still works
    teardown()  # as lmforge-train ends: whatever lmforge started beside the group, then it
    with open(Path(out) / f"rank{rank}.pkl", "wb") as f:
        pickle.dump(result, f)
    # As lmforge-train ends, past C++ static destructors: a finished rank was seen to abort
    # there (SIGABRT) once its process group was gone, failing a test that had passed.
    exit_process(0)


def _running(procs: list) -> list:
    """The ranks still running. Taken once per wait: wait([]) would sleep its whole timeout."""
    return [p for p in procs if p.exitcode is None]


def _stop(procs: list) -> list[int]:
    """SIGTERM, then SIGKILL, every rank still running; the ranks it stopped."""
    stopped = [r for r, p in enumerate(procs) if p.is_alive()]
    for r in stopped:
        procs[r].terminate()
    for r in stopped:
        procs[r].join(10)
        if procs[r].is_alive():
            os.kill(procs[r].pid, signal.SIGKILL)
            procs[r].join()
    return stopped
