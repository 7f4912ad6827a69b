"""Pre-tokenized corpora. `write_shards` tokenizes a corpus once into raw token files
(uint16 when the vocab fits, else uint32) with a document index and a manifest;
`ShardLoader` memory-maps them and cuts blocks by *global sample index*: sample i of the
run is block perm_epoch[i mod n_blocks], and rank r of w takes samples
[c + r*mb, c + (r+1)*mb) of each global micro-step starting at c. A batch therefore does
not depend on how many ranks read it, and the loader state is one integer."""
from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from tokenizers import Tokenizer

from lmforge.config import ConfigError
from lmforge.data.packing import bert_batch_seeded, frame_for, gpt_batch
from lmforge.data.tokenizer import encode_documents
from lmforge.manifest import check_file, sha256, write_json

FORMAT = "lmforge-shards/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "validation")
log = logging.getLogger("lmforge")


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


class _SplitWriter:
    """Appends documents (each followed by `sep_id`) to numbered shard files of about
    `shard_tokens` tokens; each shard gets an index of document start offsets."""

    def __init__(self, out: Path, split: str, dtype: np.dtype, sep_id: int,
                 shard_tokens: int) -> None:
        self.out, self.split, self.dtype, self.sep = out, split, dtype, sep_id
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._file = None

    def _open(self) -> None:
        name = f"{self.split}-{len(self.shards):05d}.bin"
        self._name, self._file, self._hash = name, open(self.out / name, "wb"), hashlib.sha256()
        self._starts: list[int] = []
        self._tokens = 0

    def add(self, ids: np.ndarray) -> None:
        if self._file is None:
            self._open()
        arr = np.append(ids, self.sep).astype(self.dtype)
        data = arr.tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._starts.append(self._tokens)
        self._tokens += len(arr)
        if self._tokens >= self.shard_tokens:
            self._close_shard()

    def _close_shard(self) -> None:
        self._file.close()
        index = self._name.replace(".bin", ".idx.npy")
        np.save(self.out / index, np.asarray(self._starts + [self._tokens], dtype=np.int64))
        self.shards.append({"file": self._name, "index": index, "tokens": self._tokens,
                            "docs": len(self._starts), "sha256": self._hash.hexdigest()})
        self._file = None

    def close(self) -> dict[str, Any]:
        if self._file is not None:
            self._close_shard()
        return {"tokens": sum(s["tokens"] for s in self.shards),
                "docs": sum(s["docs"] for s in self.shards), "shards": self.shards}


def write_shards(docs: Iterable[tuple[str, str]], tok_path: Path, out: Path, sep_id: int,
                 kind: str, corpus: dict[str, Any], shard_tokens: int = 100_000_000,
                 batch_docs: int = 256, batch_chars: int = 1 << 23) -> dict[str, Any]:
    """Tokenize (split, text) pairs into shards under `out`; returns the manifest.

    Memory holds one batch of documents. Everything is written to `out`.tmp and renamed at
    the end, so an interrupted run never leaves a directory that looks complete."""
    if out.exists():
        raise ConfigError(f"{out} already exists; remove it or choose another output directory")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    tok = Tokenizer.from_file(str(tok_path))
    vocab = tok.get_vocab_size()
    dtype = token_dtype(vocab)
    writers = {s: _SplitWriter(tmp, s, dtype, sep_id, shard_tokens) for s in SPLITS}
    pending: dict[str, list[str]] = {s: [] for s in SPLITS}
    chars = dict.fromkeys(SPLITS, 0)
    start = time.perf_counter()

    def flush(split: str) -> None:
        for ids in encode_documents(tok, pending[split]):
            writers[split].add(ids)
        pending[split], chars[split] = [], 0

    for split, text in docs:
        pending[split].append(text)
        chars[split] += len(text)
        # Bounded by documents and by characters: memory stays flat for any document size.
        if len(pending[split]) >= batch_docs or chars[split] >= batch_chars:
            flush(split)
    for split in SPLITS:
        flush(split)
    manifest = {"format": FORMAT, "kind": kind, "vocab_size": vocab, "dtype": dtype.name,
                "sep_id": sep_id, "tokenizer_sha256": sha256(tok_path),
                "corpus": corpus, "splits": {s: w.close() for s, w in writers.items()},
                "wall_s": round(time.perf_counter() - start, 2)}
    shutil.copyfile(tok_path, tmp / "tokenizer.json")
    write_json(tmp / MANIFEST, manifest)
    os.replace(tmp, out)
    return manifest


class ShardSet:
    """The shards of one split, memory-mapped and checked against the manifest."""

    def __init__(self, root: str | Path, split: str, manifest: dict[str, Any] | None = None
                 ) -> None:
        self.root = Path(root)
        self.manifest = manifest or read_manifest(self.root)
        self.dtype = np.dtype(self.manifest["dtype"])
        self.vocab_size = self.manifest["vocab_size"]
        entries = self.manifest["splits"][split]["shards"]
        self.files, self.maps = [], []
        for e in entries:
            path = self.root / e["file"]
            want = e["tokens"] * self.dtype.itemsize
            size = path.stat().st_size if path.is_file() else -1
            if size != want:
                raise ConfigError(f"shard {path} is {'missing' if size < 0 else f'{size} bytes'}"
                                  f", the manifest says {want}: it is truncated or damaged; "
                                  "re-run lmforge-prepare shards")
            self.files.append(path)
            self.maps.append(np.memmap(path, dtype=self.dtype, mode="r") if want else
                             np.zeros(0, self.dtype))
        self.starts = np.cumsum([0] + [e["tokens"] for e in entries])
        self.n_tokens = int(self.starts[-1])

    def tokens(self, start: int, n: int) -> np.ndarray:
        """Tokens [start, start+n) of the split's concatenated stream, as int64."""
        out = np.empty(n, dtype=np.int64)
        done = 0
        k = int(np.searchsorted(self.starts, start, side="right")) - 1
        while done < n:
            lo = start + done - int(self.starts[k])
            part = self.maps[k][lo:lo + n - done]
            if len(part) and int(part.max()) >= self.vocab_size:
                raise ConfigError(f"shard {self.files[k]} holds token id {int(part.max())} >= "
                                  f"vocab size {self.vocab_size}: it is corrupted; re-run "
                                  "lmforge-prepare shards")
            out[done:done + len(part)] = part
            done += len(part)
            k += 1
        return out


def read_manifest(root: Path) -> dict[str, Any]:
    path = root / MANIFEST
    if not path.is_file():
        raise ConfigError(f"data.shards_dir={str(root)!r} has no {MANIFEST}; make one with "
                          "lmforge-prepare shards")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path} is not valid JSON ({e}); re-run lmforge-prepare shards") from None
    if not isinstance(manifest, dict):
        raise ConfigError(f"{path} is not a shard manifest (it holds a JSON "
                          f"{type(manifest).__name__}); re-run lmforge-prepare shards")
    if manifest.get("format") != FORMAT:
        raise ConfigError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    problem = _manifest_problem(manifest)
    if problem:
        raise ConfigError(f"{path} {problem}: it is damaged; re-run lmforge-prepare shards")
    return manifest


_KEYS = {"kind": str, "vocab_size": int, "dtype": str, "sep_id": int, "tokenizer_sha256": str,
         "corpus": dict, "splits": dict}
_SHARD_KEYS = {"file": str, "tokens": int, "sha256": str}


def _manifest_problem(m: dict[str, Any]) -> str | None:
    """What a manifest lacks (a key, a split, a shard entry's field), or None."""
    for key, kind in _KEYS.items():
        if not isinstance(m.get(key), kind):
            return f"has no valid {key!r}"
    if m["dtype"] not in ("uint16", "uint32"):
        return f"has dtype {m['dtype']!r} (uint16 or uint32)"
    for split in SPLITS:
        entry = m["splits"].get(split)
        if not isinstance(entry, dict) or not isinstance(entry.get("shards"), list) \
                or not isinstance(entry.get("tokens"), int):
            return f"has no shard list for the {split} split"
        for e in entry["shards"]:
            bad = [k for k, kind in _SHARD_KEYS.items()
                   if not isinstance(e, dict) or not isinstance(e.get(k), kind)]
            if bad:
                return f"has a {split} shard entry without a valid {bad[0]!r}"
            if Path(e["file"]).name != e["file"]:
                return f"names a shard outside its directory ({e['file']!r})"
    return None


def verify_shards(root: Path) -> list[str]:
    """Every problem found by re-hashing all shards (empty when they match the manifest)."""
    manifest = read_manifest(root)
    entries = [(root / e["file"], {"sha256": e["sha256"]})
               for split in SPLITS for e in manifest["splits"][split]["shards"]]
    entries.append((root / "tokenizer.json", {"sha256": manifest["tokenizer_sha256"]}))
    return [f"{path} {problem}" for path, entry in entries
            if (problem := check_file(path, entry))]


class ShardLoader:
    """Micro-batches from shards by global sample index (see the module docstring).

    Several shard sets are mixed per sample by weight with a deterministic greedy schedule
    (sample i comes from the source furthest behind its share, so every prefix of the run
    matches the weights to within one sample). Each source runs over epochs, each a seeded
    permutation of its blocks; validation is one pass in order. BERT masks are drawn from a
    generator seeded by (seed, sample index): they differ between epochs and do not depend
    on the rank layout. The position is (samples consumed, samples taken from each source).
    """

    layout_free = True  # the position is a global sample count, whatever reads it

    def __init__(self, shards: ShardSet | list[ShardSet], arch: str, specials: dict[str, int],
                 seq_len: int, micro_batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, train: bool = True, mlm_probability: float = 0.15,
                 weights: list[float] | None = None) -> None:
        self.sets = shards if isinstance(shards, list) else [shards]
        self.shards = self.sets[0]
        w = np.asarray(weights or [1.0] * len(self.sets), dtype=np.float64)
        self.weights = w / w.sum()
        self.arch, self.specials = arch, specials
        self.mb, self.rank, self.world, self.seed, self.train = (micro_batch_size, rank, world,
                                                                 seed, train)
        self.mlm_probability = mlm_probability
        self.frame = frame_for(arch, seq_len, specials)
        self.body = self.frame.body_len
        self.blocks = [s.n_tokens // self.body for s in self.sets]
        self.n_blocks = sum(self.blocks)
        for s, n in zip(self.sets, self.blocks):
            if train and n < world * micro_batch_size:
                raise ConfigError(f"the shards in {s.root} hold {n} blocks of {self.body} "
                                  f"tokens, fewer than one global micro-batch ({world}x"
                                  f"{micro_batch_size}); prepare more data or lower "
                                  "data.seq_len / trainer.micro_batch_size")
        self.consumed = 0  # global samples handed out, summed over ranks
        self.counts = np.zeros(len(self.sets), dtype=np.int64)  # of those, per source
        self.stride = 1  # global micro-steps per batch of this loader (loader workers)
        self._perms: dict[int, tuple[int, np.ndarray]] = {}

    def _advance(self, n: int) -> list[tuple[int, int]]:
        """(source, index within source) of the next n global samples; moves the position."""
        out = []
        for _ in range(n):
            src = int(np.argmax(self.weights * (self.consumed + 1) - self.counts))
            out.append((src, int(self.counts[src])))
            self.counts[src] += 1
            self.consumed += 1
        return out

    def _ahead(self, n: int) -> "ShardLoader":
        """A copy of this loader, n global samples further on; this one does not move."""
        ahead = copy.copy(self)
        ahead.counts, ahead._perms = self.counts.copy(), {}
        ahead._advance(n)
        return ahead

    def for_worker(self, w: int, n_workers: int) -> "ShardLoader":
        """The loader of worker w of n: global micro-steps w, w+n, ... from here on."""
        mine = self._ahead(w * self.world * self.mb)
        mine.stride = n_workers
        return mine

    def state_after(self, n_batches: int) -> dict[str, Any]:
        """The state once n more micro-batches of this loader were handed out."""
        return self._ahead(n_batches * self.world * self.mb).state_dict()

    def _block(self, src: int, i: int) -> np.ndarray:
        n = self.blocks[src]
        epoch, j = divmod(i, n)
        if self.train:
            if self._perms.get(src, (None,))[0] != epoch:  # one epoch's order per source
                self._perms[src] = (epoch, np.random.default_rng([self.seed, src, epoch])
                                    .permutation(n))
            j = int(self._perms[src][1][j])
        return self.frame.wrap(self.sets[src].tokens(j * self.body, self.body))

    def __iter__(self) -> "ShardLoader":
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        first = self.consumed + self.rank * self.mb
        if not self.train:  # one pass: stop before any source would start over
            nxt = self._ahead(self.world * self.mb)
            if any(c > n for c, n in zip(nxt.counts, self.blocks)):
                raise StopIteration
        step = self._advance(self.world * self.mb)
        mine = step[self.rank * self.mb:(self.rank + 1) * self.mb]
        self._advance(self.world * self.mb * (self.stride - 1))
        blocks = [self._block(src, i) for src, i in mine]
        if self.arch == "gpt":
            return gpt_batch(blocks)
        s = self.specials
        return bert_batch_seeded(blocks, [(self.seed, i) for i in range(first, first + self.mb)],
                                 s["mask"], self.shards.vocab_size,
                                 [s["cls"], s["sep"], s["pad"]], self.mlm_probability)

    def state_dict(self) -> dict[str, Any]:
        """Valid for any rank layout: the next global sample index and per-source counts."""
        return {"kind": "shards", "consumed": self.consumed, "counts": self.counts.tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("kind") != "shards":
            raise ConfigError("the checkpoint's data position is from on-the-fly tokenization, "
                              "not from shards; resume with the data config it was saved with")
        if len(state["counts"]) != len(self.sets):
            raise ConfigError(f"the checkpoint's data position is for {len(state['counts'])} "
                              f"shard sources, not {len(self.sets)}; resume with the same "
                              "data.sources")
        self.consumed = int(state["consumed"])
        self.counts = np.asarray(state["counts"], dtype=np.int64)
