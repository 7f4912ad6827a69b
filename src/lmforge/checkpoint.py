"""Run-directory checkpoints you can trust. Every rank writes into checkpoints/.tmp-<tag>/;
once all are done rank 0 writes a manifest (files, sizes, sha256), renames the directory
to checkpoints/<tag>/ and only then moves checkpoints/latest. A crash at any moment leaves
the previous checkpoint intact; resume takes the newest one whose manifest verifies."""
from __future__ import annotations

import json
import logging
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ConfigError
from lmforge.distributed import barrier
from lmforge.manifest import check_file, file_entry, write_json

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


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_manifest(ckpt: Path, step: int) -> None:
    """List every file of `ckpt` with its size and sha256 (written last, so its presence
    means the rest is complete)."""
    files = {p.relative_to(ckpt).as_posix(): file_entry(p) for p in sorted(ckpt.rglob("*"))
             if p.is_file() and p.name != MANIFEST}
    write_json(ckpt / MANIFEST, {"step": step, "files": files})


def verify(ckpt: Path) -> str | None:
    """None when `ckpt` is complete and intact, else the reason it is not."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        return "no readable manifest (an interrupted save?)"
    for name, entry in manifest["files"].items():
        if problem := check_file(ckpt / name, entry):
            return f"{name} {problem}"
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


@dataclass
class Resume:
    """Where and how a run continues: the checkpoint, this rank's saved trainer state, and
    whether the checkpoint was written by another number of ranks (`regrid`), in which case
    a partitioned optimizer state must first go through a universal checkpoint."""
    ckpt: Path
    state: dict[str, Any]
    regrid: bool
    universal: bool
    by: str  # "<ckpt> was written by N ranks", for messages


def choose_resume(ckpt_dir: Path, resume_from: str | None, rank: int, world: int,
                  layout_free: bool, zero_stage: int, expect: dict[str, Any]) -> Resume | None:
    """The resume decision, or None to start fresh: trainer.resume_from, else the newest
    checkpoint of the run that verifies. Refused in one line (ConfigError): a checkpoint
    whose `expect`ed keys (model, tokenizer) differ, and another number of ranks unless the
    data position is layout-free (shards) and the ZeRO stage is unchanged."""
    if resume_from:
        ckpt = Path(resume_from)
        problem = verify(ckpt) if ckpt.is_dir() else "no such directory"
        if problem:
            raise ConfigError(f"trainer.resume_from={resume_from}: {problem}")
    else:
        ckpt = latest_good(ckpt_dir)
        if ckpt is None:
            return None
    saved = saved_world_size(ckpt)
    regrid = saved != world
    by = f"{ckpt} was written by {saved} rank{'s' * (saved != 1)}"
    if regrid and not layout_free:
        raise ConfigError(f"{by}, this run has {world}: on-the-fly data resumes only with "
                          f"the same number of ranks ({saved}); data=shards resumes with any")
    state = load_trainer_state(ckpt, 0 if regrid else rank)
    for key, now in expect.items():
        if state[key] != now:
            raise ConfigError(f"{ckpt} was trained with a different {key.split('_')[0]}; "
                              "resume it unchanged or start a new run (hydra.run.dir=...)")
    saved_stage = saved_zero_stage(ckpt)
    if regrid and saved_stage not in (None, zero_stage):
        raise ConfigError(f"{by} at ZeRO-{saved_stage}; with another number of ranks "
                          f"resume it at the same stage (parallel=zero{saved_stage})")
    return Resume(ckpt, state, regrid, regrid and partitioned(ckpt), by)
