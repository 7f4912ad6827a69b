"""Manifests: files listed with their size and sha256, written atomically and checked back
(checkpoints and pre-tokenized shards both stand on one)."""
from __future__ import annotations

import hashlib
import json
import os
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
