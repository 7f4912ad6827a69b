"""Run-directory checkpoint layout: checkpoints/step_XXXXXXXX/ holds DeepSpeed's shards and
one trainer-state file per rank; checkpoints/latest names the newest complete one, written
last; keep-last-K pruning."""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from lmforge.distributed import barrier

LATEST = "latest"


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def write_latest(ckpt_dir: Path, tag: str) -> None:
    """Point `latest` at `tag` by an atomic rename, so it never names a half-written file."""
    tmp = ckpt_dir / f".{LATEST}.tmp"
    tmp.write_text(tag + "\n")
    os.replace(tmp, ckpt_dir / LATEST)


def latest_tag(ckpt_dir: Path) -> str | None:
    """The newest complete checkpoint's tag, or None when there is none."""
    path = ckpt_dir / LATEST
    if not path.is_file():
        return None
    tag = path.read_text().strip()
    return tag if (ckpt_dir / tag).is_dir() else None


def save(engine: Any, ckpt_dir: Path, step: int, trainer_state: dict[str, Any], rank: int,
         keep_last: int) -> str:
    """Every rank: DeepSpeed shards, then this rank's trainer state; rank 0 then moves
    `latest` and prunes old checkpoints once all ranks are done."""
    tag = tag_for(step)
    engine.save(ckpt_dir, tag, client_state={"step": step})
    torch.save({**trainer_state, "rng": rng_state()}, ckpt_dir / tag / f"trainer_rank{rank}.pt")
    barrier()
    if rank == 0:
        write_latest(ckpt_dir, tag)
        if keep_last > 0:
            old = sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())[:-keep_last]
            for p in old:
                shutil.rmtree(p, ignore_errors=True)
    barrier()
    return tag


def load_trainer_state(ckpt_dir: Path, tag: str, rank: int) -> dict[str, Any]:
    """This rank's trainer state of `tag` (tensors and plain types only: no unpickling)."""
    path = ckpt_dir / tag / f"trainer_rank{rank}.pt"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: the checkpoint was written by a different "
                           "number of ranks or is incomplete")
    return torch.load(path, weights_only=True)
