"""Document sources: the embedded stdlib corpus, local text/JSONL/Parquet files and hub
datasets, streamed through `datasets`, split into train/validation by content hash."""
from __future__ import annotations

import dataclasses
import functools
import glob
import hashlib
import json
import logging
import os
import sysconfig
import zlib
from collections import Counter
from pathlib import Path
from typing import Iterator

import datasets

from lmforge.config import ConfigError, DataConfig

datasets.disable_progress_bars()
log = logging.getLogger("lmforge")

# Test suites, codec tables and vendored packages are low-value or machine-specific text.
_SKIP_DIRS = {"test", "tests", "idle_test", "encodings", "site-packages", "dist-packages",
              "__pycache__", "__phello__", "turtledemo", "ensurepip"}
_FORMATS = {".txt": "text", ".md": "text", ".py": "text", ".jsonl": "json", ".json": "json",
            ".parquet": "parquet"}


def embedded_corpus_files() -> list[Path]:
    """The Python standard library's .py sources, in a deterministic (sorted) order."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS)
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


def fingerprint(files: list[Path]) -> dict:
    """File count, bytes and a hash of names and sizes, recorded with each run."""
    h = hashlib.sha256()
    total = 0
    for f in files:
        size = f.stat().st_size
        total += size
        h.update(f"{f.name}:{size}\n".encode())
    return {"files": len(files), "bytes": total, "sha256": h.hexdigest()[:16]}


def resolve_files(paths: list[str]) -> list[Path]:
    """Expand files and globs; every entry must match at least one file."""
    out: list[Path] = []
    for p in paths:
        matches = sorted(glob.glob(os.path.expanduser(p), recursive=True))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ConfigError(f"data.paths entry {p!r} matches no file; check the path or glob")
        out += [Path(m) for m in matches]
    return out


def _format_of(files: list[Path], fmt: str) -> str:
    if fmt != "auto":
        return fmt
    kinds = {_FORMATS.get(f.suffix.lower(), "text") for f in files}
    if len(kinds) > 1:
        raise ConfigError(f"data.paths mixes formats {sorted(kinds)}; set data.format or split them")
    return kinds.pop()


def load_stream(cfg: DataConfig, seed: int = 0) -> tuple[datasets.IterableDataset, dict]:
    """A streaming dataset with a `text` column, and a description of where it came from.
    A mixture interleaves its sources' documents at random by weight (seeded), each source
    starting over until every one has been read through once."""
    if cfg.source == "mixture":
        parts = [load_stream(dataclasses.replace(
            cfg, source=src.kind, paths=src.files, format=src.format,
            text_field=src.text_field, hub_name=src.hub_name, hub_config=src.hub_config,
            hub_split=src.hub_split, sources=[])) for src in cfg.sources]
        total = sum(src.weight for src in cfg.sources)
        weights = [src.weight / total for src in cfg.sources]
        ds = datasets.interleave_datasets([p.select_columns(["text"]) for p, _ in parts],
                                          probabilities=weights, seed=seed,
                                          stopping_strategy="all_exhausted")
        return ds, {"source": "mixture", "weights": weights, "parts": [i for _, i in parts]}
    if cfg.source == "hub":
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.hub_split,
                                   streaming=True)
        info = {"source": "hub", "name": cfg.hub_name, "config": cfg.hub_config}
        field = cfg.text_field
    else:
        files = embedded_corpus_files() if cfg.source == "embedded" else resolve_files(cfg.paths)
        empty = [f for f in files if f.stat().st_size == 0]
        if empty and cfg.source != "embedded":  # the stdlib has empty __init__.py files
            log.warning("skipping %d empty file(s): %s", len(empty),
                        ", ".join(str(f) for f in empty[:3]) + (" ..." if len(empty) > 3 else ""))
            files = [f for f in files if f.stat().st_size > 0]
        if not files:
            raise ConfigError(f"every file of data.paths={list(cfg.paths)} is empty")
        fmt = "text" if cfg.source == "embedded" else _format_of(files, cfg.format)
        data_files = [str(f) for f in files]
        if fmt == "parquet":
            ds = datasets.load_dataset("parquet", data_files=data_files, split="train",
                                       streaming=True, columns=[cfg.text_field])
            field = cfg.text_field
        else:
            # Bad bytes become U+FFFD and such documents are skipped and counted (see
            # skip_reason) instead of an exception in the middle of a run.
            ds = datasets.load_dataset("text", data_files=data_files, split="train",
                                       streaming=True, encoding_errors="replace",
                                       sample_by="document" if fmt == "text" else "line")
            field = "text"
            if fmt == "json":  # parsed per line here: a bad line is skipped, not fatal
                ds = ds.map(functools.partial(_json_line, field=cfg.text_field))
        info = {"source": cfg.source, "format": fmt, **fingerprint(files),
                "empty_files": len(empty)}
    if field != "text":
        ds = ds.rename_column(field, "text")
    return ds, info


def _json_line(ex: dict, field: str) -> dict:
    """One JSONL line -> {"text": its field, "skip": why it has none}."""
    try:
        obj = json.loads(ex["text"])
    except ValueError:
        return {"text": None, "skip": "bad_json" if ex["text"].strip() else "empty"}
    text = obj.get(field) if isinstance(obj, dict) else None
    return {"text": text if isinstance(text, str) else None,
            "skip": None if isinstance(text, str) else "no_text_field"}


def skip_reason(ex: dict) -> str | None:
    """Why a document is not used (counted by the loader), or None."""
    if ex.get("skip"):
        return ex["skip"]
    text = ex["text"]
    if not isinstance(text, str) or not text.strip():
        return "empty"
    if "\x00" in text:
        return "binary"
    if "\ufffd" in text:
        return "not_utf8"
    return None


def is_validation(text: str, val_percent: float) -> bool:
    """Stable held-out choice: depends on the document's content only."""
    return zlib.crc32(text.encode("utf-8", "replace")) % 10_000 < val_percent * 100


def iter_documents(ds: datasets.IterableDataset, split: str, val_percent: float,
                   start: int = 0, skipped: Counter | None = None) -> Iterator[tuple[int, str]]:
    """(index, text) of the usable documents of one split; index counts that split's
    documents. Unusable ones (empty, binary, not UTF-8, bad JSON line, no text field) are
    counted in `skipped` once the index reaches `start`."""
    want_val = split == "validation"
    i = 0
    for ex in iter_examples(ds):
        reason = skip_reason(ex)
        if reason:
            if skipped is not None and i >= start:
                skipped[reason] += 1
            continue
        text = ex["text"]
        if is_validation(text, val_percent) != want_val:
            continue
        if i >= start:
            yield i, text
        i += 1


def iter_examples(ds: datasets.IterableDataset) -> Iterator[dict]:
    """Every example of the stream, in order, in any process."""
    # .iter(), not iter(ds): inside a DataLoader worker, iter(ds) would hand this worker only
    # some of the files; lmforge shards by document index itself.
    # Small batches: a batch of whole-file documents is held twice (Arrow and Python).
    for batch in ds.iter(batch_size=16):
        yield from ({k: batch[k][j] for k in batch} for j in range(len(batch["text"])))
