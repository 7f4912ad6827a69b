"""Launcher environment (torchrun / accelerate / deepspeed / srun / mpirun) -> process group,
with single-process defaults so the same code path runs on one CPU."""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist

from lmforge.config import ConfigError

# (rank, world size, local rank) as each launcher names them, most specific first.
_LAUNCHER_VARS = [
    ("RANK", "WORLD_SIZE", "LOCAL_RANK"),  # torchrun, accelerate, deepspeed
    ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"),  # srun, one task per process
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALRANKID"),
]


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launcher_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """RANK/WORLD_SIZE/LOCAL_RANK/MASTER_* as torch.distributed wants them, from whichever
    launcher set the environment; defaults describe a single process."""
    env = dict(os.environ if env is None else env)
    out: dict[str, str] = {}
    for r, w, lr in _LAUNCHER_VARS:
        if r in env and w in env:
            out = {"RANK": env[r], "WORLD_SIZE": env[w], "LOCAL_RANK": env.get(lr, "0")}
            break
    else:
        out = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"}
    if "MASTER_ADDR" not in env and "SLURM_JOB_NODELIST" in env and out["WORLD_SIZE"] != "1":
        raise RuntimeError("under srun set MASTER_ADDR (first host of SLURM_JOB_NODELIST); "
                           "slurm/train.sbatch shows how")
    out["MASTER_ADDR"] = env.get("MASTER_ADDR", "127.0.0.1")
    out["MASTER_PORT"] = env.get("MASTER_PORT") or (
        str(free_port()) if out["WORLD_SIZE"] == "1" else "29500")
    return out


EXIT_PEER = 4  # this rank stopped because another rank failed or stopped answering


def _drop_stale_build_lock(ext_dir: Path, max_age_s: float = 900.0) -> None:
    """torch's JIT build lock outlives a build that was killed (Ctrl-C, SIGKILL), and every
    later DeepSpeed start then waits on it forever. A build takes ~100 s: a lock older than
    15 minutes is such a leftover."""
    for lock in ext_dir.glob("*/lock"):
        try:
            if time.time() - lock.stat().st_mtime > max_age_s:
                lock.unlink()
                print(f"lmforge: removed a stale build lock {lock} (a killed JIT build)",
                      file=sys.stderr)
        except OSError:
            pass


def cuda_usable(device: str) -> bool:
    """Whether to run on CUDA for trainer.device; `cuda` without a usable GPU is refused
    (a GPU job must never train on CPU unnoticed)."""
    if device == "cpu":
        return False
    if torch.cuda.is_available():
        return True
    if device == "cuda":
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise ConfigError(f"trainer.device=cuda but CUDA is not usable (torch {torch.__version__}"
                          f" is {build}; no GPU or driver found): install a CUDA build of torch "
                          "that matches the driver, or set trainer.device=cpu")
    return False


def setup(timeout_s: float = 600.0, device: str = "auto") -> DistInfo:
    """Set the process-group env, pick the device and backend, and init torch.distributed.

    DeepSpeed's own init falls back to MPI discovery without these variables, so we set
    them and initialise first; deepspeed.init_distributed then finds the group ready.
    """
    os.environ.update(launcher_env())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if cuda_usable(device):
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed JIT-builds a CPU comm op; one cache per environment, so two venvs on a
        # machine do not rebuild it over each other.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                              os.path.join(sys.prefix, "torch_extensions"))
        _drop_stale_build_lock(Path(os.environ["TORCH_EXTENSIONS_DIR"]))
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    info = DistInfo(rank, world, local_rank, device)
    watch(info, timeout_s)
    return info


class Watchdog:
    """Fail fast, together. Every rank beats a counter in a side channel (a client of the
    process group's rendezvous TCPStore, not a collective); rank 0 watches every rank, the
    others watch rank 0. A rank whose beat stops for `timeout_s` (dead, SIGSTOPped, a wedged
    device: its process stops), or that reports a failure, ends every rank within a few
    seconds with one line naming it. A rank alive but stuck (a hung filesystem) keeps
    beating: its peers then stop at the collective timeout, which names the ranks whose
    progress mark lags."""

    def __init__(self, rank: int, world: int, timeout_s: float, interval_s: float = 2.0) -> None:
        self.rank, self.world, self.timeout_s, self.interval_s = rank, world, timeout_s, interval_s
        self.mark = "set-up"  # this rank's progress, published with each beat
        self._stop = threading.Event()
        prefix = f"lmforge/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                              is_master=False, timeout=timedelta(seconds=min(timeout_s, 30)))
        self.store = dist.PrefixStore(prefix, store)
        self._thread = threading.Thread(target=self._run, name="lmforge-watchdog", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        seen: dict[int, tuple[int, float]] = {}
        ok = time.monotonic()
        while not self._stop.wait(self.interval_s):
            now = time.monotonic()
            try:
                self.store.set(f"mark/{self.rank}", self.mark)
                self.store.add(f"beat/{self.rank}", 1)
                if self.store.add("failed", 0):
                    self._exit_for_reported_failure()
                for r in (range(self.world) if self.rank == 0 else [0]):
                    beat = self.store.add(f"beat/{r}", 0)
                    if r == self.rank or seen.get(r, (None,))[0] != beat:
                        seen[r] = (beat, now)
                    elif now - seen[r][1] > self.timeout_s:
                        msg = f"rank {r} stopped answering for {self.timeout_s:.0f} s (dead or stalled)"
                        self.report(msg, EXIT_PEER, about=r)
                        self._exit(msg, EXIT_PEER)
                ok = now
            except Exception:  # the store itself is gone: rank 0 hosts it
                if self._stop.is_set():
                    return
                if now - ok > self.timeout_s:
                    self._exit(f"rank 0 (it hosts the rendezvous store) stopped answering for "
                               f"{self.timeout_s:.0f} s (dead or stalled)", EXIT_PEER)

    def _exit_for_reported_failure(self) -> None:
        for r in range(self.world):
            if r != self.rank and self.store.check([f"error/{r}"]):
                # The failed rank exits with its own code; its peers stop because of it.
                self._exit(self.store.get(f"error/{r}").decode().partition("|")[2], EXIT_PEER)

    def _exit(self, msg: str, code: int) -> None:
        if not self._stop.is_set():
            print(f"lmforge-train: rank {self.rank} stops: {msg}", file=sys.stderr, flush=True)
            os._exit(code)

    def report(self, msg: str, code: int, about: int | None = None) -> None:
        """Tell every rank that rank `about` (default: this one) failed with `msg`; this
        rank's own exit is then its caller's, not the watchdog's."""
        about = self.rank if about is None else about
        if about == self.rank:
            self._stop.set()
        try:
            self.store.set(f"error/{about}", f"{code}|{msg}")
            self.store.add("failed", 1)
        except Exception:  # the store is gone: the peers notice that on their own
            pass

    def diagnose(self) -> str:
        """After a collective failed: the ranks whose beat stopped over three beats (dead or
        stalled), else those whose progress mark differs from this rank's (stuck)."""
        try:
            before = [self.store.add(f"beat/{r}", 0) for r in range(self.world)]
            time.sleep(3 * self.interval_s)
            after = [self.store.add(f"beat/{r}", 0) for r in range(self.world)]
            silent = [r for r in range(self.world) if r != self.rank and before[r] == after[r]]
            if silent:
                return f"rank {', '.join(map(str, silent))} stopped answering (dead or stalled)"
            marks = {r: self.store.get(f"mark/{r}").decode() for r in range(self.world)}
        except Exception:
            return "rank 0 (it hosts the rendezvous store) stopped answering"
        lag = [f"rank {r} is at {m}" for r, m in marks.items() if m != self.mark]
        return (", ".join(lag) + f" while this rank is at {self.mark}") if lag else \
            "no other rank was found dead, stalled or behind"

    def stop(self) -> None:
        self._stop.set()


def exit_process(code: int | str | None) -> None:
    """Exit once everything is written and closed, without running C++ static destructors:
    a finished rank was seen to abort there (SIGABRT, "terminate called without an active
    exception") after its process group was destroyed."""
    import logging

    if isinstance(code, str):
        print(code, file=sys.stderr)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


_watchdog: Watchdog | None = None


def watch(info: DistInfo, timeout_s: float) -> None:
    """Start this process's Watchdog (several ranks only)."""
    global _watchdog
    if info.world_size > 1 and _watchdog is None:
        _watchdog = Watchdog(info.rank, info.world_size, timeout_s)


def mark(progress: str) -> None:
    """Publish this rank's progress ("step 12", "save step 12") with its next beat."""
    if _watchdog is not None:
        _watchdog.mark = progress


def report_failure(msg: str, code: int) -> None:
    """Tell every other rank that this one failed (they stop within a beat or two)."""
    if _watchdog is not None:
        _watchdog.report(msg, code)


def diagnose() -> str:
    return _watchdog.diagnose() if _watchdog is not None else "a single process"


def is_comm_error(e: BaseException) -> bool:
    """An error of a collective: a peer closed the connection, or a timeout."""
    text = str(e)
    return isinstance(e, dist.DistError) or any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer",
                            "Timed out", "timed out", "NCCL", "Gloo", "gloo"))


def stop_on_error(e: Exception) -> int:
    """The exit code for an error that ends this rank, its one line printed and told to the
    other ranks; an unexpected error (a bug) is re-raised with its traceback."""
    rank = int(os.environ.get("RANK", 0))
    if is_comm_error(e):
        first = next((ln for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
        msg = f"a collective failed ({first.strip()[:200]}): {diagnose()}"
        code = EXIT_PEER
    elif isinstance(e, OSError):
        msg, code = f"{e.strerror or e}: {e.filename or ''}".rstrip(": "), 1
    else:
        report_failure(f"rank {rank} failed: {type(e).__name__}: {e}", 1)
        raise e
    report_failure(f"rank {rank}: {msg}", code)
    print(f"lmforge-train: rank {rank} stops: {msg}", file=sys.stderr, flush=True)
    return code


def teardown() -> None:
    global _watchdog
    if _watchdog is not None:
        _watchdog.stop()
        _watchdog = None
    if dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean over ranks (a copy; a no-op on one process)."""
    x = x.detach().clone()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(x)
        x /= dist.get_world_size()
    return x


def all_reduce_min(n: int, device: torch.device) -> int:
    t = torch.tensor([n], device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return int(t.item())


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag true on every rank when it is true on any (one tiny all-reduce per call)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return list(flags)
    return [bool(v) for v in max_over_ranks(torch.tensor([int(f) for f in flags],
                                                         device=device)).tolist()]


def max_over_ranks(t: torch.Tensor) -> torch.Tensor:
    """`t`, in place, as its elementwise maximum over the ranks (a collective, no host read)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def gather_to_main(obj: Any) -> list[Any] | None:
    """Every rank's `obj`, in rank order, on rank 0 (None elsewhere)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return [obj]
    out = [None] * dist.get_world_size() if dist.get_rank() == 0 else None
    dist.gather_object(obj, out, dst=0)
    return out


def broadcast_object(obj: object, src: int = 0) -> object:
    """rank `src`'s value on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def on_main(info: DistInfo, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only and return its value on every rank; an error there is raised
    on every rank instead of a hang."""
    out: tuple[Any, BaseException | None] = (None, None)
    if info.is_main:
        try:
            out = (fn(), None)
        except Exception as e:  # re-raised below, on every rank
            out = (None, e)
    value, err = broadcast_object(out)
    if err is not None:
        raise err
    return value
