"""Sharded, resumable batches: documents of a split -> this reader's share -> tokens ->
packed blocks -> micro-batches. Takes rank and world size as ints, never a process group."""
from __future__ import annotations

from collections import Counter
from typing import Any, Iterator

import datasets
import numpy as np
import torch
from tokenizers import Tokenizer

from lmforge.config import ConfigError, DataConfig
from lmforge.data.packing import Packer, bert_batch, frame_for, gpt_batch
from lmforge.data.sources import iter_documents
from lmforge.data.tokenizer import encode_documents, kind_for, special_ids

_ENCODE_CHUNK = 32  # documents per encode_batch call
_HOW = {"files": "deals whole files to readers",
        "documents": "has every reader stream every file and keep its share of documents"}


def reader_scheme(n_shards: int, readers: int, assign_files: bool = True) -> tuple[str, str]:
    """How `readers` (ranks x loader workers) divide a training stream of n_shards files
    (shards), and why: "files" deals each reader whole files, "documents" has each stream
    everything and keep documents i % readers. One reader keeps "documents": its order is
    the one lmforge has always given a single process (the default job's losses)."""
    if readers == 1:
        return "documents", "one reader reads every file"
    if not assign_files:
        return "documents", "a mixture interleaves its sources document by document"
    few = n_shards < readers
    counts = (f"{n_shards} file(s) (shards) {'<' if few else '>='} {readers} readers (ranks x "
              "data.num_workers)")
    return ("documents" if few else "files"), counts


class BlockLoader:
    """Infinite (train) or single-pass (validation) iterator of micro-batch dicts.

    `rank` and `world` name this reader among all (ranks x loader workers). Training data
    is divided by `reader_scheme`: with at least as many files (shards) as readers, each
    epoch's seeded permutation of the files is dealt round-robin and a reader opens only its
    own; otherwise document i of the epoch's order (a seeded permutation of the files)
    belongs to reader i % world. Validation always uses the latter, unshuffled. Training
    blocks pass through a seeded shuffle buffer, so `state_dict()` (epoch, file, next
    document, packer carry, buffer, RNGs) is enough to continue exactly where a run stopped.
    """

    def __init__(self, stream: datasets.IterableDataset, tok: Tokenizer, arch: str,
                 cfg: DataConfig, micro_batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, split: str = "train", assign_files: bool = True) -> None:
        self.stream, self.tok, self.arch, self.cfg = stream, tok, arch, cfg
        self.micro_batch_size, self.rank, self.world = micro_batch_size, rank, world
        self.seed, self.split, self.assign_files = seed, split, assign_files
        self.train = split == "train"
        self.scheme = (reader_scheme(stream.n_shards, world, assign_files)[0] if self.train
                       else "documents")
        self.specials = special_ids(tok, kind_for(arch))
        self.vocab_size = tok.get_vocab_size()
        # "files": file is the position in my_files() and next_doc counts that file's
        # documents; "documents": file stays 0 and next_doc counts the epoch's.
        self.epoch, self.file, self.next_doc = 0, 0, 0
        self.packer = Packer(frame_for(arch, cfg.seq_len, self.specials))
        self.mask_gen = torch.Generator().manual_seed(seed * 1009 + rank)
        self.shuffle_rng = np.random.default_rng([seed, rank])
        self.buffer: list[np.ndarray] = []
        self.skipped: Counter = Counter()  # unusable documents (first epoch), by reason
        self._blocks: Iterator[np.ndarray] | None = None

    def _epoch_stream(self) -> datasets.IterableDataset:
        if not self.train:
            return self.stream
        # buffer_size=1: only the shard (file) order is permuted, which state_dict can replay.
        ds = self.stream.shuffle(seed=self.seed, buffer_size=1)
        ds.set_epoch(self.epoch)
        return ds

    def my_files(self) -> list[int]:
        """This reader's files (shard indices) in the current epoch, in reading order."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(self.stream.n_shards)
        return order[self.rank::self.world].tolist()

    def located_documents(self) -> Iterator[tuple[int, int, str]]:
        """(file, index, text) of this reader's documents of the current epoch, from its
        position (file, next_doc) on."""
        skipped = self.skipped if self.epoch == 0 else None
        if self.scheme == "documents":
            for i, text in iter_documents(self._epoch_stream(), self.split,
                                          self.cfg.val_percent, start=self.next_doc,
                                          skipped=skipped):
                if i % self.world == self.rank:
                    yield 0, i, text
            return
        files, n = self.my_files(), self.stream.n_shards
        # Files before the position are never opened; the current one is read from its
        # start up to next_doc.
        for f in range(self.file, len(files)):
            one = self.stream.shard(num_shards=n, index=files[f])
            start = self.next_doc if f == self.file else 0
            for i, text in iter_documents(one, self.split, self.cfg.val_percent, start=start,
                                          skipped=skipped):
                yield f, i, text

    def documents(self) -> Iterator[tuple[int, str]]:
        """(index, text) of this reader's documents of the current epoch, from its position
        on; the index counts the epoch's documents ("documents") or its file's ("files")."""
        for _, i, text in self.located_documents():
            yield i, text

    def _gen_blocks(self) -> Iterator[np.ndarray]:
        # A restored carry is emptied before the next document is read, as it was originally.
        yield from self.packer.drain()
        while True:
            docs, fresh, read = self.located_documents(), (self.file, self.next_doc) == (0, 0), 0
            while chunk := [d for _, d in zip(range(_ENCODE_CHUNK), docs)]:
                for (f, i, _), ids in zip(chunk, encode_documents(self.tok,
                                                                  [t for *_, t in chunk])):
                    self.file, self.next_doc, read = f, i + 1, read + 1
                    yield from self.packer.add(ids)
            if not self.train:
                return
            if fresh and not read and self.skipped and self.world == 1:
                raise ConfigError(f"no usable training document ({sum(self.skipped.values())} "
                                  f"skipped: {dict(self.skipped)}); check data.paths, "
                                  "data.format and data.text_field")
            if fresh and not read and not self._others_have_documents():
                raise ConfigError(f"reader {self.rank} of {self.world} (ranks x loader workers) "
                                  f"got no training document in epoch {self.epoch}; the corpus "
                                  "has too few documents: use fewer ranks or data.num_workers")
            self.epoch, self.file, self.next_doc = self.epoch + 1, 0, 0

    def _others_have_documents(self) -> bool:
        """Whether an epoch in which this reader's files held no training document is only
        bad luck of the deal (another file has one: the next epoch deals anew)."""
        if self.scheme == "documents":
            return False
        docs = iter_documents(self.stream, self.split, self.cfg.val_percent)
        return next(docs, None) is not None

    def _shuffled(self, blocks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """A buffer of blocks drawn from at random, so a batch mixes many documents. The
        buffer and its RNG are part of the state: a resume continues the same draws."""
        size = self.cfg.shuffle_buffer if self.train else 0
        for b in blocks:
            if len(self.buffer) < size:
                self.buffer.append(b)
                continue
            if not self.buffer:
                yield b
                continue
            i = int(self.shuffle_rng.integers(len(self.buffer)))
            # Swap before yielding: while suspended, the state must already hold `b`.
            out, self.buffer[i] = self.buffer[i], b
            yield out

    def __iter__(self) -> "BlockLoader":
        return self

    def for_worker(self, w: int, n_workers: int) -> "BlockLoader":
        """Loader worker w of n: reader rank*n + w of world*n over the same stream."""
        return BlockLoader(self.stream, self.tok, self.arch, self.cfg, self.micro_batch_size,
                           self.rank * n_workers + w, self.world * n_workers, self.seed,
                           self.split, self.assign_files)

    def __next__(self) -> dict[str, torch.Tensor]:
        if self._blocks is None:
            self._blocks = self._shuffled(self._gen_blocks())
        blocks = [b for _, b in zip(range(self.micro_batch_size), self._blocks)]
        if len(blocks) < self.micro_batch_size:
            raise StopIteration
        if self.arch == "gpt":
            return gpt_batch(blocks)
        s = self.specials
        return bert_batch(blocks, self.mask_gen, s["mask"], self.vocab_size,
                          [s["cls"], s["sep"], s["pad"]], self.cfg.mlm_probability)

    def state_dict(self) -> dict[str, Any]:
        """Position after the last batch returned; valid between batches."""
        return {"kind": "stream", "scheme": self.scheme, "epoch": self.epoch, "file": self.file,
                "next_doc": self.next_doc, "rank": self.rank, "world": self.world,
                "carry": torch.tensor(self.packer.carry, dtype=torch.int64),
                "mask_rng": self.mask_gen.get_state(),
                # Tensors: cheap to send from a loader worker with every batch.
                "buffer": torch.from_numpy(np.stack(self.buffer)) if self.buffer
                else torch.zeros(0, dtype=torch.int64),
                "shuffle_rng": self.shuffle_rng.bit_generator.state,
                "skipped": dict(self.skipped)}

    def check_state(self, state: dict[str, Any]) -> None:
        """Refuse, in one line, a position this reader cannot continue exactly."""
        if state.get("kind", "stream") != "stream":
            raise ConfigError("the checkpoint's data position is from pre-tokenized shards; "
                              "resume with data.source=shards as it was saved")
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise ConfigError(f"the checkpoint's data position is for rank {state['rank']} of "
                              f"{state['world']}, not rank {self.rank} of {self.world}: "
                              "on-the-fly data resumes only with the same number of ranks "
                              "(data.source=shards resumes with any)")
        saved = state.get("scheme", "documents")  # a position from before schemes
        if saved != self.scheme:
            why = reader_scheme(self.stream.n_shards, self.world, self.assign_files)[1]
            raise ConfigError(f"the checkpoint's data position was saved by a run that "
                              f"{_HOW[saved]}, but this one {_HOW[self.scheme]} ({why}); it "
                              "would not continue the same data: resume with the data.paths "
                              "and lmforge version it was saved with, or start a new run")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; it must come from the same reader layout and scheme."""
        self.check_state(state)
        self.epoch, self.next_doc = state["epoch"], state["next_doc"]
        self.file = state.get("file", 0)
        self.packer.carry = [int(t) for t in state["carry"]]
        self.mask_gen.set_state(torch.as_tensor(state["mask_rng"], dtype=torch.uint8))
        self.buffer = [row.numpy() for row in state["buffer"]]
        self.shuffle_rng.bit_generator.state = state["shuffle_rng"]
        self.skipped = Counter(state.get("skipped", {}))
        self._blocks = None
