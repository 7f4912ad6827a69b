"""Loader workers: every (rank, worker) pair reads a disjoint share, together everything;
batches through worker processes are the ones the in-process readers make, and a saved
position resumes exactly (shards: also with another number of workers)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import prepare_shards, random_corpus
from lmforge.config import ConfigError, DataConfig
from lmforge.data.loader import BlockLoader
from lmforge.data.shards import ShardLoader, ShardSet
from lmforge.data.sources import iter_documents, load_stream
from lmforge.data.tokenizer import load_tokenizer, special_ids
from lmforge.data.workers import WorkerLoader


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("workers")
    path = random_corpus(root / "corpus.jsonl", 240, seed=3, lengths=(5, 80),
                         words="one two three four five six seven eight nine ten".split(),
                         prefix="doc{} ")
    prepare_shards(path, root / "shards", "tokenizer.vocab_size=300")
    return root


def stream_cfg(corpus: Path, **kw) -> DataConfig:
    return DataConfig(source="files", paths=[str(corpus / "corpus.jsonl")], seq_len=32,
                      shuffle_buffer=16, **kw)


def block_loader(corpus: Path, rank: int = 0, world: int = 1) -> BlockLoader:
    cfg = stream_cfg(corpus)
    stream, _ = load_stream(cfg)
    tok = load_tokenizer(corpus / "shards/tokenizer.json")
    return BlockLoader(stream, tok, "gpt", cfg, 4, rank, world, seed=5)


def shard_loader(corpus: Path, rank: int = 0, world: int = 1) -> ShardLoader:
    tok = load_tokenizer(corpus / "shards/tokenizer.json")
    return ShardLoader(ShardSet(corpus / "shards", "train"), "gpt", special_ids(tok, "bpe"), 32,
                       4, rank, world, seed=5)


def take(loader, n: int) -> list[torch.Tensor]:
    return [next(loader)["input_ids"] for _ in range(n)]


def test_two_ranks_by_two_workers_read_disjoint_shares_covering_the_epoch(corpus: Path) -> None:
    cfg = stream_cfg(corpus)
    stream, _ = load_stream(cfg)
    every = [i for i, _ in iter_documents(stream, "train", cfg.val_percent)]
    seen: dict[int, tuple[int, int]] = {}
    for rank in (0, 1):
        for w in (0, 1):
            reader = block_loader(corpus, rank, 2).for_worker(w, 2)
            for i, _ in reader.documents():
                assert i not in seen, f"document {i} read by {seen[i]} and {(rank, w)}"
                seen[i] = (rank, w)
    assert sorted(seen) == every
    assert {v for v in seen.values()} == {(0, 0), (0, 1), (1, 0), (1, 1)}


def test_worker_processes_serve_the_readers_batches_round_robin(corpus: Path) -> None:
    base = block_loader(corpus)
    readers = [base.for_worker(w, 2) for w in (0, 1)]
    want = [next(readers[k % 2])["input_ids"] for k in range(10)]
    got = take(WorkerLoader(block_loader(corpus), num_workers=2), 10)
    assert all(torch.equal(a, b) for a, b in zip(want, got))


@pytest.mark.parametrize("kind", ["stream", "shards"])
def test_worker_position_resumes_exactly(corpus: Path, kind: str, tmp_path: Path) -> None:
    make = block_loader if kind == "stream" else shard_loader
    straight = take(WorkerLoader(make(corpus), num_workers=2), 12)
    first = WorkerLoader(make(corpus), num_workers=2)
    take(first, 5)
    torch.save(first.state_dict(), tmp_path / "state.pt")
    first.close()
    again = WorkerLoader(make(corpus), num_workers=2)
    again.load_state_dict(torch.load(tmp_path / "state.pt", weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(straight[5:], take(again, 7)))


def test_resume_before_every_worker_has_served(corpus: Path, tmp_path: Path) -> None:
    straight = take(WorkerLoader(block_loader(corpus), num_workers=3), 5)
    first = WorkerLoader(block_loader(corpus), num_workers=3)
    take(first, 1)  # workers 1 and 2 have handed out nothing yet
    again = WorkerLoader(block_loader(corpus), num_workers=3)
    again.load_state_dict(first.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(straight[1:], take(again, 4)))


def test_shard_batches_do_not_depend_on_the_number_of_workers(corpus: Path) -> None:
    want = take(WorkerLoader(shard_loader(corpus), num_workers=0), 9)
    assert all(torch.equal(a, b) for a, b in
               zip(want, take(WorkerLoader(shard_loader(corpus), num_workers=3), 9)))
    two = WorkerLoader(shard_loader(corpus), num_workers=2)
    take(two, 4)
    none = WorkerLoader(shard_loader(corpus), num_workers=0)
    none.load_state_dict(two.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(want[4:], take(none, 5)))


def test_stream_position_needs_the_same_number_of_workers(corpus: Path) -> None:
    two = WorkerLoader(block_loader(corpus), num_workers=2)
    take(two, 3)
    with pytest.raises(ConfigError, match="data.num_workers=2"):
        WorkerLoader(block_loader(corpus), num_workers=1).load_state_dict(two.state_dict())
    with pytest.raises(ConfigError, match="data.num_workers=0"):
        WorkerLoader(block_loader(corpus), num_workers=2).load_state_dict(
            block_loader(corpus).state_dict())


def test_batches_for_a_gpu_come_pinned(monkeypatch) -> None:
    """For a CUDA device every batch is page-locked before the trainer's non_blocking copy
    (this CPU-only torch cannot pin: the call is recorded instead)."""
    pinned: list[torch.Size] = []
    monkeypatch.setattr(torch.Tensor, "pin_memory",
                        lambda self: pinned.append(self.shape) or self.clone())
    batches = [{"input_ids": torch.zeros(2, 4), "labels": torch.ones(2, 4)}] * 2
    for pin in (False, True):
        got = next(WorkerLoader(iter(batches), 0, pin_memory=pin))
        assert torch.equal(got["labels"], batches[0]["labels"])
    assert pinned == [torch.Size([2, 4])] * 2  # both tensors of the pinned loader's batch
