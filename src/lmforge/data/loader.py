"""Sharded, resumable batches: documents of a split -> this rank's share -> tokens ->
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


class BlockLoader:
    """Infinite (train) or single-pass (validation) iterator of micro-batch dicts.

    Document i of an epoch's order belongs to rank i % world. The epoch order is a seeded
    permutation of the stream's shards, and training blocks pass through a seeded shuffle
    buffer, so `state_dict()` (epoch, next document, packer carry, buffer, RNGs) is enough
    to continue exactly where a run stopped.
    """

    def __init__(self, stream: datasets.IterableDataset, tok: Tokenizer, arch: str,
                 cfg: DataConfig, micro_batch_size: int, rank: int = 0, world: int = 1,
                 seed: int = 0, split: str = "train") -> None:
        self.stream, self.tok, self.arch, self.cfg = stream, tok, arch, cfg
        self.micro_batch_size, self.rank, self.world = micro_batch_size, rank, world
        self.seed, self.split = seed, split
        self.train = split == "train"
        self.specials = special_ids(tok, kind_for(arch))
        self.vocab_size = tok.get_vocab_size()
        self.epoch, self.next_doc = 0, 0
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

    def documents(self) -> Iterator[tuple[int, str]]:
        """(index, text) of this reader's documents of the current epoch, from next_doc on."""
        for i, text in iter_documents(self._epoch_stream(), self.split, self.cfg.val_percent,
                                      start=self.next_doc,
                                      skipped=self.skipped if self.epoch == 0 else None):
            if i % self.world == self.rank:
                yield i, text

    def _gen_blocks(self) -> Iterator[np.ndarray]:
        # A restored carry is emptied before the next document is read, as it was originally.
        yield from self.packer.drain()
        while True:
            docs, start = self.documents(), self.next_doc
            while chunk := [d for _, d in zip(range(_ENCODE_CHUNK), docs)]:
                for (i, _), ids in zip(chunk, encode_documents(self.tok, [t for _, t in chunk])):
                    self.next_doc = i + 1
                    yield from self.packer.add(ids)
            if not self.train:
                return
            if start == 0 and self.next_doc == 0 and self.skipped and self.world == 1:
                raise ConfigError(f"no usable training document ({sum(self.skipped.values())} "
                                  f"skipped: {dict(self.skipped)}); check data.paths, "
                                  "data.format and data.text_field")
            if start == 0 and self.next_doc == 0:
                raise ConfigError(f"reader {self.rank} of {self.world} (ranks x loader workers) "
                                  f"got no training document in epoch {self.epoch}; the corpus "
                                  "has too few documents: use fewer ranks or data.num_workers")
            self.epoch, self.next_doc = self.epoch + 1, 0

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
                           self.split)

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
        return {"kind": "stream", "epoch": self.epoch, "next_doc": self.next_doc, "rank": self.rank,
                "world": self.world, "carry": torch.tensor(self.packer.carry, dtype=torch.int64),
                "mask_rng": self.mask_gen.get_state(),
                # Tensors: cheap to send from a loader worker with every batch.
                "buffer": torch.from_numpy(np.stack(self.buffer)) if self.buffer
                else torch.zeros(0, dtype=torch.int64),
                "shuffle_rng": self.shuffle_rng.bit_generator.state,
                "skipped": dict(self.skipped)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state`; it must come from the same rank layout."""
        if state.get("kind", "stream") != "stream":
            raise ConfigError("the checkpoint's data position is from pre-tokenized shards; "
                              "resume with data.source=shards as it was saved")
        if (state["rank"], state["world"]) != (self.rank, self.world):
            raise ConfigError(f"the checkpoint's data position is for rank {state['rank']} of "
                              f"{state['world']}, not rank {self.rank} of {self.world}: "
                              "on-the-fly data resumes only with the same number of ranks "
                              "(data.source=shards resumes with any)")
        self.epoch, self.next_doc = state["epoch"], state["next_doc"]
        self.packer.carry = [int(t) for t in state["carry"]]
        self.mask_gen.set_state(torch.as_tensor(state["mask_rng"], dtype=torch.uint8))
        self.buffer = [row.numpy() for row in state["buffer"]]
        self.shuffle_rng.bit_generator.state = state["shuffle_rng"]
        self.skipped = Counter(state.get("skipped", {}))
        self._blocks = None
