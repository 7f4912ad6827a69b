"""Launcher environment (torchrun / accelerate / deepspeed / srun / mpirun) -> process group,
with single-process defaults so the same code path runs on one CPU."""
from __future__ import annotations

import os
import socket
import sys
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

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
    backend: str
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


def setup(timeout_s: float = 1800.0) -> DistInfo:
    """Set the process-group env, pick the device and backend, and init torch.distributed.

    DeepSpeed's own init falls back to MPI discovery without these variables, so we set
    them and initialise first; deepspeed.init_distributed then finds the group ready.
    """
    os.environ.update(launcher_env())
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ["LOCAL_RANK"])
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank)
        device, backend = torch.device("cuda", local_rank), "nccl"
    else:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed JIT-builds a CPU comm op; one cache per environment, so two venvs on a
        # machine do not rebuild it over each other.
        os.environ.setdefault("TORCH_EXTENSIONS_DIR",
                              os.path.join(sys.prefix, "torch_extensions"))
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, rank=rank, world_size=world,
                                timeout=timedelta(seconds=timeout_s))
    return DistInfo(rank, world, local_rank, backend, device)


def teardown() -> None:
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


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (one tiny all-reduce per call)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return flag
    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_object(obj: object, src: int = 0) -> object:
    """rank `src`'s value on every rank."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
