"""Document sources: the embedded stdlib corpus, local text/JSONL/Parquet files and hub
datasets, streamed through `datasets`, split into train/validation by content hash.
Plain-text files become documents by data.text_split (see `split_text`)."""
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
_SNIFF_BYTES = 8192  # a NUL in a text file's first bytes marks it binary (as git decides)
_DOC_MAX_CHARS = {"paragraph": 10_000, "file": 1_000_000}  # data.doc_max_chars=null
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


def _expand(pattern: str) -> Iterator[str]:
    """glob's matches for `pattern`, except that `**` descends into each real directory
    once: a symlink loop (a/loop -> a) is not followed round (glob goes ~40 levels deep,
    and with two loops 2**40 paths)."""
    parts = pattern.split(os.sep)
    if "**" not in parts:
        yield from glob.iglob(pattern)
        return
    i = parts.index("**")
    head, rest = os.sep.join(parts[:i]) or ("/" if pattern.startswith(os.sep) else "."), \
        os.sep.join(parts[i + 1:])
    seen: set[str] = set()
    for base in (glob.glob(head) if glob.has_magic(head) else [head]):
        for d, dirnames, filenames in os.walk(base, followlinks=True):
            real = os.path.realpath(d)
            if real in seen:
                dirnames[:] = []
                continue
            seen.add(real)
            dirnames[:] = sorted(n for n in dirnames if not n.startswith("."))  # as glob's **
            found = (_expand(os.path.join(glob.escape(d), rest)) if rest else
                     (os.path.join(d, f) for f in filenames if not f.startswith(".")))
            yield from map(os.path.normpath, found)  # "./a.txt" -> "a.txt", as glob has it


def resolve_files(paths: list[str]) -> tuple[list[Path], int]:
    """Expand files and globs; every entry must match at least one file. A file matched
    twice (overlapping globs, a symlink to it, a symlinked directory) is read once: the
    files by first match, and how many matches were dropped as duplicates."""
    out: list[Path] = []
    seen: set[str] = set()
    duplicates = 0
    for p in paths:
        matches = sorted(set(_expand(os.path.expanduser(p))))
        matches = [m for m in matches if os.path.isfile(m)]
        if not matches:
            raise ConfigError(f"data.paths entry {p!r} matches no file; check the path or glob")
        for m in matches:
            real = os.path.realpath(m)
            if real in seen:
                duplicates += 1
                continue
            seen.add(real)
            out.append(Path(m))
    if duplicates:
        log.warning("data.paths: %d match(es) of a file already listed skipped (overlapping "
                    "globs or symlinks); each file is read once", duplicates)
    return out, duplicates


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
        for i, ((part, _), src) in enumerate(zip(parts, cfg.sources)):
            _check_usable(part, f"data.sources[{i}] "
                                f"({src.hub_name or src.path or ', '.join(src.paths)})")
        total = sum(src.weight for src in cfg.sources)
        weights = [src.weight / total for src in cfg.sources]
        ds = datasets.interleave_datasets([_text_and_skip(p) for p, _ in parts],
                                          probabilities=weights, seed=seed,
                                          stopping_strategy="all_exhausted")
        return ds, {"source": "mixture", "weights": weights, "parts": [i for _, i in parts]}
    ds, info, field = _hub_stream(cfg) if cfg.source == "hub" else _file_stream(cfg)
    if field != "text":
        ds = ds.rename_column(field, "text")
    return ds, info


def _text_and_skip(ds: datasets.IterableDataset) -> datasets.IterableDataset:
    """A mixture part with the same two columns as every other: the text, and why it has
    none (JSON lines and files say; a hub dataset's rows never do)."""
    if ds.column_names is not None and "skip" not in ds.column_names:
        ds = ds.map(lambda ex: {"skip": None})
    return ds.select_columns(["text", "skip"])


def _check_usable(ds: datasets.IterableDataset, where: str) -> None:
    """Refuse a mixture source without one usable document: the others would fill its share
    of the mixture unnoticed. Reads up to its first usable document."""
    skipped: Counter = Counter()
    for ex in iter_examples(ds):
        reason = skip_reason(ex)
        if reason is None:
            return
        skipped[reason] += 1
    raise ConfigError(f"{where} has no usable document ({sum(skipped.values())} skipped: "
                      f"{dict(skipped)}); check its path(s), format and text_field")


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _hub_stream(cfg: DataConfig) -> tuple[datasets.IterableDataset, dict, str]:
    where = f"data.hub_name={cfg.hub_name!r}"
    try:
        ds = datasets.load_dataset(cfg.hub_name, cfg.hub_config, split=cfg.hub_split,
                                   streaming=True)
        columns = _feature_kinds(ds.features) if ds.features else _peek_kinds(ds)
    except Exception as e:  # datasets' many errors: offline, no such name, config or split
        raise ConfigError(f"{where} (config {cfg.hub_config!r}, split {cfg.hub_split!r}) "
                          f"cannot be read: {_first_line(e)}; check the name, data.hub_config "
                          "and data.hub_split (offline, only cached datasets load)") from None
    _check_text_column(columns, cfg.text_field, where)
    return ds, {"source": "hub", "name": cfg.hub_name, "config": cfg.hub_config}, cfg.text_field


def _file_stream(cfg: DataConfig) -> tuple[datasets.IterableDataset, dict, str]:
    files, duplicates = ((embedded_corpus_files(), 0) if cfg.source == "embedded"
                         else resolve_files(cfg.paths))
    empty = [f for f in files if f.stat().st_size == 0]
    if empty and cfg.source != "embedded":  # the stdlib has empty __init__.py files
        log.warning("skipping %d empty file(s): %s", len(empty),
                    ", ".join(str(f) for f in empty[:3]) + (" ..." if len(empty) > 3 else ""))
        files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise ConfigError(f"every file of data.paths={list(cfg.paths)} is empty")
    fmt = "text" if cfg.source == "embedded" else _format_of(files, cfg.format)
    info = {"source": cfg.source, "format": fmt, **fingerprint(files), "empty_files": len(empty)}
    if cfg.source != "embedded":
        info["duplicate_files"] = duplicates
    if fmt == "parquet":
        for f in files:  # a missing column would otherwise fail in the middle of the run
            _check_text_column(_parquet_kinds(f), cfg.text_field, str(f))
        return datasets.load_dataset("parquet", data_files=[str(f) for f in files],
                                     split="train", streaming=True,
                                     columns=[cfg.text_field]), info, cfg.text_field
    if fmt == "text" and not (cfg.source == "embedded" and cfg.text_split == "auto"):
        split = text_split(cfg)
        max_chars = cfg.doc_max_chars or _DOC_MAX_CHARS[split]
        info.update(text_split=split, doc_max_chars=max_chars)
        features = datasets.Features({"text": datasets.Value("string"),
                                      "skip": datasets.Value("string")})
        # A list in gen_kwargs makes each file a shard: the loader's per-epoch shuffle
        # permutes files, as it does for the embedded corpus.
        return datasets.IterableDataset.from_generator(
            text_documents, features=features,
            gen_kwargs={"files": [str(f) for f in files], "split": split,
                        "max_chars": max_chars}), info, "text"
    whole = [f for f in files if fmt == "json" and _one_json_value(f)]
    lines = [str(f) for f in files if f not in whole]
    # Bad bytes become U+FFFD and such documents are skipped and counted (see
    # skip_reason) instead of an exception in the middle of a run. The embedded corpus
    # (text_split=auto) keeps this reader, a document per file: the default job's losses.
    ds = datasets.load_dataset("text", data_files=lines, split="train",
                               streaming=True, encoding_errors="replace",
                               sample_by="document" if fmt == "text" else "line") if lines else None
    if fmt != "json":
        return ds, info, "text"
    parse = functools.partial(_json_line, field=cfg.text_field)  # per line: a bad one is skipped
    if not whole:
        return ds.map(parse), info, "text"
    log.info("reading %d .json file(s) as one JSON value each (an array: a document per "
             "element)", len(whole))
    features = datasets.Features({"text": datasets.Value("string"),
                                  "skip": datasets.Value("string")})
    arrays = datasets.IterableDataset.from_generator(
        _json_values, features=features,
        gen_kwargs={"files": [str(f) for f in whole], "field": cfg.text_field})
    parts = ([ds.map(parse, features=features)] if ds is not None else []) + [arrays]
    return datasets.concatenate_datasets(parts), info, "text"


def text_split(cfg: DataConfig) -> str:
    """data.text_split resolved: auto is file for the embedded corpus, else paragraph."""
    if cfg.text_split != "auto":
        return cfg.text_split
    return "file" if cfg.source == "embedded" else "paragraph"


def text_documents(files: list[str], split: str, max_chars: int) -> Iterator[dict]:
    """The documents of plain-text files, in file order, read a line at a time (a line
    longer than max_chars in pieces): a file is never held whole. A file with a NUL among
    its first bytes is one "binary" skip, one without any document one "empty" skip."""
    for path in files:
        with open(path, "rb") as f:
            if b"\x00" in f.read(_SNIFF_BYTES):
                yield {"text": None, "skip": "binary"}
                continue
        # Universal newlines and U+FFFD for bad bytes, as datasets' text reader has them.
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = iter(lambda: f.readline(max_chars), "")
            n = 0
            for n, text in enumerate(split_text(lines, split == "paragraph", max_chars), 1):
                yield {"text": text, "skip": None}
        if n == 0:
            yield {"text": "", "skip": None}


def split_text(lines: Iterator[str], by_paragraph: bool, max_chars: int) -> Iterator[str]:
    """Documents from lines (each at most max_chars, with its newline): paragraphs
    (blank or whitespace-only lines separate them and are dropped), or all lines as one,
    each cut before the line that would take it past max_chars. Documents are verbatim
    runs of lines, so a file without blank lines becomes pieces of at most max_chars."""
    doc: list[str] = []
    size = 0
    for line in lines:
        if by_paragraph and not line.strip():
            if doc:
                yield "".join(doc)
                doc, size = [], 0
            continue
        if doc and size + len(line) > max_chars:
            yield "".join(doc)
            doc, size = [], 0
        doc.append(line)
        size += len(line)
    if doc:
        yield "".join(doc)


def _one_json_value(path: Path) -> bool:
    """True for a file that is one JSON value over several lines or on one (an array, a
    pretty-printed object), not JSON Lines (whose first line is a whole value)."""
    with open(path, "rb") as f:
        head = f.read(1 << 16).decode("utf-8", "replace").lstrip("\ufeff \t\r\n")
    if head.startswith("["):
        return True
    try:
        json.loads(head.split("\n", 1)[0])
        return False
    except ValueError:
        return head.startswith("{")


def _json_values(files: list[str], field: str) -> Iterator[dict]:
    """The documents of files that are one JSON value each: an array's elements, an
    object as one; a file that does not parse whole is read as JSON Lines after all."""
    for path in files:
        text = Path(path).read_text(encoding="utf-8", errors="replace").lstrip("\ufeff")
        try:
            value = json.loads(text)
        except ValueError:
            lines = text.split("\n")
            lines = lines[:-1] if lines[-1] == "" else lines  # after the last newline
            yield from (_json_line({"text": line}, field) for line in lines)
            continue
        items = value if isinstance(value, list) else [value]
        yield from (_json_item(item, field) for item in items)
        if not items:
            yield {"text": None, "skip": "empty"}


def _feature_kinds(features: datasets.Features) -> dict[str, str]:
    return {k: ("string" if isinstance(v, datasets.Value) and "string" in v.dtype else
                "null" if isinstance(v, datasets.Value) and v.dtype == "null" else str(v))
            for k, v in features.items()}


def _peek_kinds(ds: datasets.IterableDataset) -> dict[str, str]:
    """Column kinds from the first example (a stream whose features are not declared)."""
    first = next(iter(ds.take(1)), {})
    return {k: "string" if isinstance(v, str) else "null" if v is None else type(v).__name__
            for k, v in first.items()}


def _parquet_kinds(path: Path) -> dict[str, str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        schema = pq.read_schema(path)
    except Exception as e:  # pyarrow's ArrowInvalid and OSError
        raise ConfigError(f"{path} is not a readable Parquet file ({_first_line(e)}); fix or "
                          "remove it from data.paths") from None
    text = (pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view",
                                                                   pa.types.is_string))
    return {f.name: "string" if any(t(f.type) for t in text) else
            "null" if pa.types.is_null(f.type) else str(f.type) for f in schema}


def _check_text_column(kinds: dict[str, str], field: str, where: str) -> None:
    """The text column must exist and hold strings: checked before reading, not mid-run."""
    names = ", ".join(list(kinds)[:12]) + (" ..." if len(kinds) > 12 else "")
    if field not in kinds:
        raise ConfigError(f"data.text_field={field!r} is not a column of {where} (its "
                          f"columns: {names or 'none'}); set data.text_field to one of them")
    if kinds[field] not in ("string", "null"):
        raise ConfigError(f"data.text_field={field!r} of {where} holds {kinds[field]}, not "
                          f"text (its columns: {names}); set data.text_field to a text column")


def _json_line(ex: dict, field: str) -> dict:
    """One JSONL line -> {"text": its field, "skip": why it has none}."""
    try:
        obj = json.loads(ex["text"])
    except ValueError:
        return {"text": None, "skip": "bad_json" if ex["text"].strip() else "empty"}
    return _json_item(obj, field)


def _json_item(obj: object, field: str) -> dict:
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
