"""Run-directory checkpoints you can trust. Every rank writes into checkpoints/.tmp-<tag>/;
once all are done rank 0 writes a manifest (files, sizes, sha256), renames the directory
to checkpoints/<tag>/ and only then moves checkpoints/latest. A crash at any moment leaves
the previous checkpoint intact; resume takes the newest one whose manifest verifies."""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import pickle
import random
import secrets
import shutil
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from lmforge.config import ConfigError
from lmforge.distributed import DistInfo, barrier, broadcast_object, gather_to_main, on_main
from lmforge.manifest import check_file, file_entry, load_error, write_json

log = logging.getLogger("lmforge")

LATEST = "latest"
MANIFEST = "manifest.json"
TMP_PREFIX = ".tmp-"
SET_ASIDE = "set_aside"
RESUMED_FROM = "resumed_from.json"


LOCK = ".lock"
_held: dict[Path, int] = {}  # run dir -> open lock fd, held as long as this process


def claim_run_dir(run_dir: Path, info: DistInfo) -> None:
    """Rank 0 takes run_dir/.lock (flock: released however its holder dies, so a stale lock
    is taken over, with a warning); a live job holding it is refused in one line. Every rank
    then reads rank 0's token there: ranks that see another directory are refused."""
    path = run_dir / LOCK

    def take() -> str:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        previous = os.read(fd, 4096).decode(errors="replace").strip()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            holder = previous or "holder unknown"
            raise ConfigError(f"{run_dir} is in use by another job ({holder}); wait for it "
                              "to end or set another hydra.run.dir")
        except OSError as e:  # a filesystem without locks
            log.warning("cannot lock %s (%s): nothing stops a second job in this run dir",
                        path, e.strerror)
        if previous and not previous.startswith("released"):
            log.warning("took over the lock of %s from a holder that is gone (%s)", run_dir,
                        previous)
        token = (f"host {socket.gethostname()} pid {os.getpid()} since "
                 f"{time.strftime('%Y-%m-%d %H:%M:%S')} token {secrets.token_hex(6)}")
        os.ftruncate(fd, 0)
        os.pwrite(fd, token.encode(), 0)
        os.fsync(fd)
        _held[run_dir] = fd
        return token

    token = on_main(info, take)
    seen = path.read_text().strip() if path.is_file() else ""
    blind = gather_to_main(None if seen == token else info.rank)
    blind = broadcast_object([r for r in blind if r is not None] if info.is_main else None)
    if blind:
        raise ConfigError(f"rank {', '.join(map(str, blind))} do not see rank 0's run dir "
                          f"{run_dir}: put it on a filesystem every node shares")


def release_run_dir(run_dir: Path) -> None:
    """Mark the lock released (a clean end), then drop it."""
    fd = _held.pop(run_dir, None)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.pwrite(fd, b"released", 0)
        os.close(fd)


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
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:  # some network filesystems refuse fsync on a directory
        log.warning("cannot fsync directory %s (%s): a power loss may lose its last rename",
                    path, e.strerror)


def _fsynced_entry(path: Path) -> dict[str, Any]:
    """Flush `path` to stable storage, then its manifest entry."""
    with open(path, "rb+") as f:
        os.fsync(f.fileno())
    return file_entry(path)


def write_manifest(ckpt: Path, step: int, files: dict[str, Any] | None = None) -> None:
    """List every file of `ckpt` with its size and sha256 (written last, so its presence
    means the rest is complete), and when it was written (retention goes by that)."""
    if files is None:
        files = {p.relative_to(ckpt).as_posix(): file_entry(p)
                 for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST}
    write_json(ckpt / MANIFEST, {"step": step, "written_ns": time.time_ns(), "files": files})


def _manifest(ckpt: Path) -> dict[str, Any]:
    return json.loads((ckpt / MANIFEST).read_text())


def verify(ckpt: Path) -> str | None:
    """None when `ckpt` is complete and intact, else the reason it is not."""
    try:
        manifest = _manifest(ckpt)
        files = manifest["files"]
        if not isinstance(files, dict):
            raise ValueError("no file list")
    except (OSError, ValueError, KeyError, TypeError):
        return "no readable manifest with a file list (an interrupted save?)"
    for name, entry in files.items():
        if not isinstance(entry, dict) or Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{MANIFEST} has a bad entry for {name!r}"
        if problem := check_file(ckpt / name, entry):
            return f"{name} {problem}"
    return None


def write_latest(ckpt_dir: Path, tag: str) -> None:
    """Point `latest` at `tag` by an atomic rename, so it never names a half-written file."""
    tmp = ckpt_dir / f".{LATEST}.tmp"
    tmp.write_text(tag + "\n")
    os.replace(tmp, ckpt_dir / LATEST)


def _step_dirs(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in ckpt_dir.glob("step_*") if p.is_dir())


def written_at(ckpt: Path) -> int:
    """When `ckpt` was written (ns; from its manifest, else the directory's mtime)."""
    try:
        return int(_manifest(ckpt)["written_ns"])
    except (OSError, ValueError, KeyError, TypeError):
        return ckpt.stat().st_mtime_ns


def latest_good(ckpt_dir: Path) -> Path | None:
    """The newest checkpoint that verifies: `latest` first, then older ones, newest first.
    Each one skipped is reported."""
    candidates = _step_dirs(ckpt_dir)[::-1]
    pointer = ckpt_dir / LATEST
    if pointer.is_file():
        named = ckpt_dir / pointer.read_text().strip()
        candidates = [named] + [c for c in candidates if c != named]
    for ckpt in candidates:
        problem = verify(ckpt) if ckpt.is_dir() else "is missing"
        if problem is None:
            return ckpt
        log.warning("skipping checkpoint %s: %s", ckpt, problem)
    return None


def set_aside(ckpt_dir: Path, ckpts: list[Path], why: str) -> None:
    """Move `ckpts` out of the resume path into checkpoints/set_aside/, saying where."""
    if not ckpts:
        return
    dest = ckpt_dir / SET_ASIDE
    dest.mkdir(exist_ok=True)
    for c in ckpts:
        target = dest / f"{c.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        os.replace(c, target)
        log.warning("set aside %s (%s): moved to %s; it will not be resumed", c.name, why, target)


def prune(ckpt_dir: Path, keep_last: int, newest: Path) -> None:
    """Keep the `keep_last` checkpoints written last (0: all), `newest` (just written)
    always among them: write order, not step names, which a rollback makes disagree."""
    if keep_last > 0:
        older = sorted((p for p in _step_dirs(ckpt_dir) if p != newest), key=written_at)
        for old in older[:max(len(older) - (keep_last - 1), 0)]:
            shutil.rmtree(old, ignore_errors=True)


def save(engine: Any, ckpt_dir: Path, step: int, trainer_state: dict[str, Any],
         info: DistInfo, keep_last: int, extra_files: tuple[Path, ...] = ()) -> Path:
    """Every rank calls this; returns the final checkpoint directory. `extra_files` (the
    resolved config, the tokenizer) are copied in, so a checkpoint stands on its own. Each
    rank fsyncs and hashes a share of the files; rank 0's part (manifest, rename, `latest`,
    retention) raises on every rank if it fails, so no rank waits for it forever."""
    tag = tag_for(step)
    tmp_tag, final = TMP_PREFIX + tag, ckpt_dir / tag
    tmp = ckpt_dir / tmp_tag

    def prepare() -> None:
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        for stale in ckpt_dir.glob(TMP_PREFIX + "*"):  # left by a killed save
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
        for f in extra_files:
            shutil.copyfile(f, tmp / f.name)

    on_main(info, prepare)
    try:
        engine.save(ckpt_dir, tmp_tag, client_state={"step": step})
        torch.save({**trainer_state, "rng": rng_state()}, tmp / f"trainer_rank{info.rank}.pt")
    except RuntimeError as e:  # torch's zip writer reports a failed write this way
        if "unexpected pos" not in str(e) and "failed writing" not in str(e):
            raise
        raise OSError(errno.EIO, "could not write this rank's checkpoint files (disk full or "
                      "an I/O error?)", str(tmp)) from e
    barrier()
    files = sorted(p for p in tmp.rglob("*") if p.is_file())
    mine = {p.relative_to(tmp).as_posix(): _fsynced_entry(p)
            for i, p in enumerate(files) if i % info.world_size == info.rank}
    shares = gather_to_main(mine)

    def publish() -> None:
        write_manifest(tmp, step, {k: v for share in shares for k, v in sorted(share.items())})
        if final.exists():  # re-saving a step (e.g. after a resume): replace it whole
            shutil.rmtree(final)
        os.replace(tmp, final)
        _fsync_dir(ckpt_dir)
        write_latest(ckpt_dir, tag)
        prune(ckpt_dir, keep_last, final)

    on_main(info, publish)
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
    try:
        return torch.load(path, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError) as e:
        raise ConfigError(f"{path}: {load_error(e)}") from None


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
    saved_world: int  # N


def _step_of(ckpt: Path) -> int:
    return int(ckpt.name.split("_")[1])


def pick_checkpoint(ckpt_dir: Path, resume_from: str | None, start_fresh: bool) -> str | None:
    """Which checkpoint a run continues from (rank 0 decides; None = step 0).

    trainer.resume_from applies until this run dir holds a checkpoint of its own written
    after it was applied (so a requeued job keeps its progress); checkpoints newer by step
    than the resume point are set aside, never resumed later. Without it: the newest
    checkpoint that verifies; newer damaged ones are set aside. A run dir whose checkpoints
    all fail verification is refused unless trainer.start_fresh."""
    own, steps = latest_good(ckpt_dir), _step_dirs(ckpt_dir)
    if resume_from:
        marker = ckpt_dir / RESUMED_FROM
        try:
            applied = json.loads(marker.read_text())
        except (OSError, ValueError):
            applied = {}
        if (applied.get("path") == resume_from and own is not None
                and written_at(own) > applied.get("at_ns", 0)):
            log.info("trainer.resume_from=%s was applied before and this run dir has newer "
                     "checkpoints of its own: continuing from %s", resume_from, own)
            return str(own)
        target = Path(resume_from)
        problem = verify(target) if target.is_dir() else "no such directory"
        if problem:
            raise ConfigError(f"trainer.resume_from={resume_from}: {problem}")
        newer = [p for p in steps if _step_of(p) > _step_of(target)
                 and p.resolve() != target.resolve()]
        set_aside(ckpt_dir, newer, f"newer than trainer.resume_from={resume_from}")
        ckpt_dir.mkdir(parents=True, exist_ok=True)
        write_json(marker, {"path": resume_from, "at_ns": time.time_ns()})
        return str(target)
    if own is None:
        if steps and not start_fresh:
            raise ConfigError(f"every checkpoint in {ckpt_dir} fails verification (newest: "
                              f"{steps[-1].name} {verify(steps[-1])}); restore one, or set "
                              "trainer.start_fresh=true to set them aside and start at step 0")
        set_aside(ckpt_dir, steps, "fails verification; trainer.start_fresh=true")
        return None
    set_aside(ckpt_dir, [p for p in steps if _step_of(p) > _step_of(own)], "fails verification")
    return str(own)


def choose_resume(ckpt_dir: Path, resume_from: str | None, start_fresh: bool, info: DistInfo,
                  layout_free: bool, zero_stage: int, expect: dict[str, Any]) -> Resume | None:
    """The resume decision, or None to start fresh (pick_checkpoint, on rank 0). Refused in
    one line (ConfigError): a checkpoint whose `expect`ed entries (model, tokenizer, and the
    `guard`: ZeRO stage, dtype, seq_len, data sources) differ, and another number of ranks
    unless the data position is layout-free (shards)."""
    picked = on_main(info, lambda: pick_checkpoint(ckpt_dir, resume_from, start_fresh))
    if picked is None:
        return None
    ckpt, world = Path(picked), info.world_size
    saved = saved_world_size(ckpt)
    regrid = saved != world
    by = f"{ckpt} was written by {saved} rank{'s' * (saved != 1)}"
    if regrid and not layout_free:
        raise ConfigError(f"{by}, this run has {world}: on-the-fly data resumes only with "
                          f"the same number of ranks ({saved}); data=shards resumes with any")
    state = load_trainer_state(ckpt, 0 if regrid else info.rank)
    for key, now in expect.items():
        if key == "guard":
            for k, v in now.items():
                # Older checkpoints recorded no guard; before data.text_split, a file was
                # one document.
                old = state.get(key, {}).get(k, "file" if k == "data.text_split" else v)
                if old != v:
                    raise ConfigError(f"{ckpt} was saved with {k}={old}, this run has {v}: "
                                      f"resume it with {k}={old}, or start a new run dir "
                                      "(hydra.run.dir=...)")
        elif state[key] != now:
            raise ConfigError(f"{ckpt} was trained with a different {key.split('_')[0]}; "
                              "resume it unchanged or start a new run (hydra.run.dir=...)")
    saved_stage = saved_zero_stage(ckpt)
    if regrid and saved_stage not in (None, zero_stage):
        raise ConfigError(f"{by} at ZeRO-{saved_stage}; with another number of ranks "
                          f"resume it at the same stage (parallel=zero{saved_stage})")
    return Resume(ckpt, state, regrid, regrid and partitioned(ckpt), by, saved)
