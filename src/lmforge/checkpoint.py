"""Run-directory checkpoints you can trust. Every rank writes into checkpoints/.tmp-<tag>/;
once all are done rank 0 writes a manifest (files, sizes, sha256), renames the directory
to checkpoints/<tag>/ and only then moves checkpoints/latest. A crash at any moment leaves
the previous checkpoint intact; resume takes the newest one whose manifest verifies."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import torch

from lmforge.distributed import barrier

log = logging.getLogger("lmforge")

LATEST = "latest"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"


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


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(ckpt: Path, step: int) -> None:
    """List every file of `ckpt` with its size and sha256 (written last, so its presence
    means the rest is complete)."""
    files = {}
    for p in sorted(ckpt.rglob("*")):
        if p.is_file() and p.name != MANIFEST:
            files[p.relative_to(ckpt).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256(p)}
    tmp = ckpt / f"{MANIFEST}.tmp"
    tmp.write_text(json.dumps({"step": step, "files": files}, indent=1))
    os.replace(tmp, ckpt / MANIFEST)


def verify(ckpt: Path, checksums: bool = True) -> str | None:
    """None when `ckpt` is complete and intact, else the reason it is not."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest (an interrupted save?)"
    for name, meta in manifest["files"].items():
        p = ckpt / name
        if not p.is_file():
            return f"{name} is missing"
        if p.stat().st_size != meta["bytes"]:
            return f"{name} has {p.stat().st_size} bytes, the manifest says {meta['bytes']}"
        if checksums and sha256(p) != meta["sha256"]:
            return f"{name} does not match its checksum"
    return None


def write_latest(ckpt_dir: Path, tag: str) -> None:
    """Point `latest` at `tag` by an atomic rename, so it never names a half-written file."""
    tmp = ckpt_dir / f".{LATEST}.tmp"
    tmp.write_text(tag + "\n")
    os.replace(tmp, ckpt_dir / LATEST)


def latest_good(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that verifies: `latest` first, then older ones, newest first.
    Each one skipped is reported."""
    candidates = sorted((p for p in ckpt_dir.glob("step_*") if p.is_dir()), reverse=True)
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        named = ckpt_dir / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for ckpt in candidates:
        problem = verify(ckpt)
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s", ckpt, problem)
    return None


def save(engine: Any, ckpt_dir: Path, step: int, trainer_state: dict[str, Any], rank: int,
         keep_last: int, extra_files: tuple[Path, ...] = ()) -> Path:
    """Every rank calls this; returns the final checkpoint directory. `extra_files` (the
    resolved config, the tokenizer) are copied in, so a checkpoint stands on its own."""
    tag = tag_for(step)
    tmp_tag, final = TMP_PREFIX + tag, ckpt_dir / tag
    if rank == 0:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(TMP_PREFIX + "*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
    barrier()
    engine.save(ckpt_dir, tmp_tag, client_state={"step": step})
    torch.save({**trainer_state, "rng": rng_state()},
               ckpt_dir / tmp_tag / f"trainer_rank{rank}.pt")
    barrier()
    if rank == 0:
        for f in extra_files:
            shutil.copyfile(f, ckpt_dir / tmp_tag / f.name)
        write_manifest(ckpt_dir / tmp_tag, step)
        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(ckpt_dir / tmp_tag, final)
        _fsync_dir(ckpt_dir)
        write_latest(ckpt_dir, tag)
        if keep_last > 0:
            for old in sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    barrier()
    return final


def saved_world_size(ckpt: Path) -> int:
    """How many ranks wrote `ckpt` (each wrote one trainer_rank{r}.pt)."""
    return len(list(ckpt.glob("trainer_rank*.pt")))


def saved_zero_stage(ckpt: Path) -> int | None:
    """parallel.zero_stage of the run that wrote `ckpt` (its own copy of config.yaml), or
    None when it has none."""
    from omegaconf import OmegaConf

    if not (ckpt / "config.yaml").is_file():
        return None
    return int(OmegaConf.load(ckpt / "config.yaml").parallel.zero_stage)


def partitioned(ckpt: Path) -> bool:
    """True when DeepSpeed split the optimizer state over the data-parallel ranks (ZeRO 1-3:
    one *zero_pp_rank_{r}_*optim_states.pt per rank). At ZeRO-0 the whole model and optimizer
    state is in mp_rank_00_model_states.pt, which any number of ranks can load."""
    return any(ckpt.glob("*zero_pp_rank_*optim_states.pt"))


def load_trainer_state(ckpt: Path, rank: int) -> dict[str, Any]:
    """Rank `rank`'s trainer state (tensors and plain types only: nothing is unpickled)."""
    path = ckpt / f"trainer_rank{rank}.pt"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: {ckpt} was written by {saved_world_size(ckpt)} "
                           "ranks")
    return torch.load(path, weights_only=True)


def reseed(seed: int, step: int, rank: int) -> None:
    """Fresh python/torch RNG streams derived from (seed, step, rank), for a resume whose
    ranks have no saved stream of their own (another world size)."""
    import numpy as np

    s = int(np.random.SeedSequence([seed, step, rank]).generate_state(1, np.uint64)[0] >> 1)
    random.seed(s)
    torch.manual_seed(s)  # CUDA generators too


UNIVERSAL_PREFIX = ".universal-"
