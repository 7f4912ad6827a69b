"""Manifests: files listed with their size and sha256, written atomically and checked back
(checkpoints and pre-tokenized shards both stand on one)."""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any


def sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def write_json(path: Path, obj: Any) -> None:
    """`path` holds all of `obj` or its previous content, never a part (atomic rename)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1) + "\n")
    os.replace(tmp, path)


def file_entry(path: Path) -> dict[str, Any]:
    return {"bytes": path.stat().st_size, "sha256": sha256(path)}


def check_file(path: Path, entry: dict[str, Any], checksum: bool = True) -> str | None:
    """None when `path` matches its manifest entry (bytes and/or sha256), else why not
    (a predicate for the file's name: "is missing", ...)."""
    if not path.is_file():
        return "is missing"
    if "bytes" in entry and path.stat().st_size != entry["bytes"]:
        return f"has {path.stat().st_size} bytes, the manifest says {entry['bytes']}"
    if checksum and "sha256" in entry and sha256(path) != entry["sha256"]:
        return "does not match its checksum"
    return None


def load_error(e: BaseException) -> str:
    """One line for a file torch refused to load weights-only (or could not read)."""
    text = str(e)
    found = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if found:
        return (f"it pickles {found.group(1)}, which is neither a tensor nor an allow-listed "
                "DeepSpeed record: refusing to unpickle it")
    found = re.search(r"WeightsUnpickler error: (.*)", text)
    lines = [found.group(1)] if found else [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__
