"""Documents -> fixed-length blocks (GPT: seq_len+1 tokens across documents with EOS
separators; BERT: [CLS] ... [SEP] blocks) and dynamic MLM masking."""
from __future__ import annotations

from typing import Iterable, Iterator, NamedTuple

import numpy as np
import torch


class Frame(NamedTuple):
    """How an architecture frames a block of seq_len model positions: GPT reads seq_len+1
    tokens (inputs and shifted labels) with EOS between documents; BERT reads
    [CLS] body [SEP] with [SEP] between documents."""
    body_len: int
    sep_id: int
    prefix: tuple[int, ...] = ()
    suffix: tuple[int, ...] = ()

    def wrap(self, body: np.ndarray) -> np.ndarray:
        """The block (a new array) holding `body` in this frame."""
        return np.concatenate([np.asarray(self.prefix, dtype=body.dtype), body,
                               np.asarray(self.suffix, dtype=body.dtype)])


def frame_for(arch: str, seq_len: int, specials: dict[str, int]) -> Frame:
    if arch == "gpt":
        return Frame(seq_len + 1, specials["eos"])
    return Frame(seq_len - 2, specials["sep"], (specials["cls"],), (specials["sep"],))


class Packer:
    """Concatenates documents (each followed by `sep_id`) and cuts blocks of `block_len`.

    Its `carry` (tokens not yet emitted, updated before each block is yielded) is part of
    the loader state, so a resume is exact. Tokens live in one numpy buffer and a read
    position: a document of millions of tokens is cut in linear time.
    """

    def __init__(self, frame: Frame) -> None:
        self.frame = frame
        self._buf, self._pos = np.zeros(0, dtype=np.int64), 0

    @property
    def carry(self) -> list[int]:
        return self._buf[self._pos:].tolist()

    @carry.setter
    def carry(self, ids: list[int]) -> None:
        self._buf, self._pos = np.asarray(ids, dtype=np.int64), 0

    def add(self, ids) -> Iterator[np.ndarray]:
        """Append one document and yield every block it completes."""
        self._buf = np.concatenate([self._buf[self._pos:], np.asarray(ids, dtype=np.int64),
                                    [self.frame.sep_id]])
        self._pos = 0
        yield from self.drain()

    def drain(self) -> Iterator[np.ndarray]:
        """Yield every full block the carried tokens make."""
        n = self.frame.body_len
        while len(self._buf) - self._pos >= n:
            body = self._buf[self._pos:self._pos + n]
            self._pos += n
            yield self.frame.wrap(body)


def pack_documents(docs: Iterable[list[int]], block_len: int, sep_id: int) -> Iterator[np.ndarray]:
    """All full blocks of `block_len` tokens made from `docs` (the tail is dropped)."""
    packer = Packer(Frame(block_len, sep_id))
    for ids in docs:
        yield from packer.add(ids)


def gpt_batch(blocks: list[np.ndarray]) -> dict[str, torch.Tensor]:
    """Blocks of seq_len+1 tokens -> next-token inputs and labels (B, T)."""
    x = torch.from_numpy(np.stack(blocks))
    return {"input_ids": x[:, :-1].contiguous(), "labels": x[:, 1:].contiguous()}


def mask_tokens(input_ids: torch.Tensor, generator: torch.Generator, mask_id: int,
                vocab_size: int, special_ids: list[int], probability: float = 0.15
                ) -> dict[str, torch.Tensor]:
    """BERT masking: pick `probability` of non-special tokens; of those 80% -> [MASK],
    10% -> a random token, 10% kept. Unpicked positions get label -100."""
    labels = input_ids.clone()
    probs = torch.full(input_ids.shape, probability)
    probs[torch.isin(input_ids, torch.tensor(special_ids))] = 0.0
    picked = torch.bernoulli(probs, generator=generator).bool()
    labels[~picked] = -100
    ids = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(ids.shape, 0.8), generator=generator).bool() & picked
    ids[to_mask] = mask_id
    # Half of the remaining 20% become random tokens.
    to_random = (torch.bernoulli(torch.full(ids.shape, 0.5), generator=generator).bool()
                 & picked & ~to_mask)
    ids[to_random] = torch.randint(vocab_size, ids.shape, generator=generator)[to_random]
    return {"input_ids": ids, "labels": labels}


def bert_batch(blocks: list[np.ndarray], generator: torch.Generator, mask_id: int,
               vocab_size: int, special_ids: list[int], probability: float
               ) -> dict[str, torch.Tensor]:
    """Framed blocks -> masked inputs, labels and zero token types (B, T)."""
    x = torch.from_numpy(np.stack(blocks))
    batch = mask_tokens(x, generator, mask_id, vocab_size, special_ids, probability)
    batch["token_type_ids"] = torch.zeros_like(x)
    return batch


def bert_batch_seeded(blocks: list[np.ndarray], keys: list[tuple[int, ...]], mask_id: int,
                      vocab_size: int, special_ids: list[int], probability: float
                      ) -> dict[str, torch.Tensor]:
    """As bert_batch, but each row's mask comes from its own generator seeded by its key, so
    a sample's mask does not depend on which batch or rank it lands in."""
    rows = []
    for block, key in zip(blocks, keys):
        seed = int(np.random.SeedSequence(list(key)).generate_state(1, np.uint64)[0] >> 1)
        gen = torch.Generator().manual_seed(seed)
        rows.append(mask_tokens(torch.from_numpy(block)[None], gen, mask_id, vocab_size,
                                special_ids, probability))
    batch = {k: torch.cat([r[k] for r in rows]) for k in ("input_ids", "labels")}
    batch["token_type_ids"] = torch.zeros_like(batch["input_ids"])
    return batch
