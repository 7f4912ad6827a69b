"""On-the-fly readers (ranks x loader workers): whole files dealt to readers when there are
enough of them, else every reader streams all and keeps its share of documents; each
document of an epoch read once either way, and a position that resumes without replay."""
from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Iterator

import datasets
import pytest
import torch

from conftest import compose, random_texts, same_state, write_jsonl
from lmforge.assembly import build_loaders, open_corpus
from lmforge.config import ConfigError, DataConfig
from lmforge.distributed import DistInfo
from lmforge.data.loader import BlockLoader, reader_scheme
from lmforge.data.sources import iter_documents, load_stream
from lmforge.data.tokenizer import train_tokenizer
from lmforge.data.workers import WorkerLoader

N_FILES = 6
OPENED: list[str] = []  # files the recording stream opened, in order


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """N_FILES JSONL files of 30 distinct documents each ("f<file> d<doc> ...")."""
    root = tmp_path_factory.mktemp("readers")
    return [write_jsonl(root / f"part{f}.jsonl",
                        random_texts(30, seed=f, lengths=(5, 60), prefix=f"f{f} d{{}} "))
            for f in range(N_FILES)]


@pytest.fixture(scope="module")
def tok(corpus: list[Path]):
    texts = [json.loads(line)["text"] for p in corpus for line in p.read_text().splitlines()]
    return train_tokenizer(iter(texts), "bpe", 300)


def cfg_for(files: list[Path], **kw) -> DataConfig:
    return DataConfig(source="files", paths=[str(p) for p in files], seq_len=16,
                      shuffle_buffer=8, **kw)


def loader(files: list[Path], tok, rank: int = 0, world: int = 1, **kw) -> BlockLoader:
    cfg = cfg_for(files)
    stream, _ = load_stream(cfg)
    return BlockLoader(stream, tok, "gpt", cfg, 2, rank, world, seed=7, **kw)


def _recorded(files: list[str]) -> Iterator[dict]:
    for path in files:
        OPENED.append(Path(path).name)
        for line in Path(path).read_text().splitlines():
            yield {"text": json.loads(line)["text"]}


def recording_loader(files: list[Path], tok, rank: int, world: int) -> BlockLoader:
    """A reader over a stream (a shard per file) that notes each file it opens."""
    stream = datasets.IterableDataset.from_generator(
        _recorded, gen_kwargs={"files": [str(p) for p in files]})
    return BlockLoader(stream, tok, "gpt", cfg_for(files), 2, rank, world, seed=7)


def every_reader(make, ranks: int, workers: int) -> list[BlockLoader]:
    return [make(rank, ranks).for_worker(w, workers) for rank in range(ranks)
            for w in range(workers)]


def train_texts(files: list[Path]) -> list[str]:
    stream, _ = load_stream(cfg_for(files))
    return [t for _, t in iter_documents(stream, "train", 2.0)]


def take(it, n: int) -> list[torch.Tensor]:
    return [next(it)["input_ids"] for _ in range(n)]


def test_scheme_choice(corpus: list[Path], tok) -> None:
    assert reader_scheme(6, 4)[0] == "files" and reader_scheme(4, 4)[0] == "files"
    assert reader_scheme(3, 4) == ("documents", "3 file(s) (shards) < 4 readers (ranks x "
                                                "data.num_workers)")
    assert reader_scheme(6, 1)[0] == "documents"  # one reader: the order it always had
    assert reader_scheme(6, 4, assign_files=False)[0] == "documents"  # a mixture
    assert loader(corpus, tok, 0, 2).scheme == "files"
    assert loader(corpus, tok, 0, 1).scheme == "documents"
    assert loader(corpus, tok, 0, 2, split="validation").scheme == "documents"
    assert loader(corpus, tok, 0, 2).for_worker(1, 4).scheme == "documents"  # 6 files < 8


def test_rank_0_logs_the_scheme_and_why(corpus: list[Path], tok) -> None:
    lines: list[str] = []
    handler = logging.Handler(logging.INFO)
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("lmforge")
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    paths = ",".join(map(str, corpus))
    cases = [([f"data.paths=[{paths}]"], "only its own files (6 file(s) (shards) >= 4 readers"),
             ([f"data.paths=[{paths}]", "data.num_workers=4"], "its share of documents (6 "
              "file(s) (shards) < 8 readers"),
             (["data=mixture", f"data.sources=[{{path: {corpus[0]}}}, {{path: {corpus[1]}}}]"],
              "its share of documents (a mixture")]
    try:
        for overrides, want in cases:
            cfg = compose(["data=files", "data.num_workers=2", *overrides])
            for rank in (0, 1):
                lines.clear()
                build_loaders(cfg, DistInfo(rank, 2, rank, torch.device("cpu")), tok,
                              open_corpus(cfg))
                ours = [line for line in lines if line.startswith("on-the-fly training data")]
                assert len(ours) == (rank == 0) and all(want in line for line in ours), ours
    finally:
        log.removeHandler(handler)
        log.setLevel(level)


@pytest.mark.parametrize("n_files", [N_FILES, 3])  # files, documents
def test_two_ranks_by_two_workers_read_each_document_once(corpus: list[Path], tok,
                                                          n_files: int) -> None:
    files = corpus[:n_files]
    readers = every_reader(lambda r, n: loader(files, tok, r, n), 2, 2)
    assert {r.scheme for r in readers} == {"files" if n_files >= 4 else "documents"}
    shares = [[t for _, t in r.documents()] for r in readers]
    assert all(shares) and Counter(t for s in shares for t in s) == Counter(train_texts(files))
    if n_files >= 4:  # a reader's documents come from its own files only
        for r, share in zip(readers, shares):
            mine = {f"f{f}" for f in r.my_files()}
            assert {t.split()[0] for t in share} == mine


def test_epochs_deal_files_anew_reproducibly(corpus: list[Path], tok) -> None:
    readers = every_reader(lambda r, n: loader(corpus, tok, r, n), 2, 2)
    deals = []
    for epoch in range(3):
        for r in readers:
            r.epoch = epoch
        deal = [r.my_files() for r in readers]
        assert sorted(f for files in deal for f in files) == list(range(N_FILES))
        deals.append(deal)
    assert len({str(d) for d in deals}) == 3
    again = loader(corpus, tok, 1, 2).for_worker(0, 2)
    again.epoch = 2
    assert again.my_files() == deals[2][2]


def test_a_reader_opens_only_its_files(corpus: list[Path], tok) -> None:
    OPENED.clear()
    reader = recording_loader(corpus, tok, 1, 3)
    assert reader.scheme == "files"
    mine = [corpus[f].name for f in reader.my_files()]
    n = sum(1 for _ in reader.documents())
    assert OPENED == mine and len(mine) == 2 and n > 40


def test_resume_mid_file_and_across_files_is_exact(corpus: list[Path], tok,
                                                   tmp_path: Path) -> None:
    straight = loader(corpus, tok, 0, 2)
    want = take(straight, 130)
    assert straight.epoch == 1  # the batches cross every file boundary and an epoch's end
    cuts = []
    for k in (3, 33, 60, 110):
        a = loader(corpus, tok, 0, 2)
        take(a, k)
        torch.save(a.state_dict(), tmp_path / "state.pt")
        state = torch.load(tmp_path / "state.pt", weights_only=True)
        cuts.append((state["file"], state["next_doc"]))
        b = loader(corpus, tok, 0, 2)
        b.load_state_dict(state)
        got = take(b, 130 - k)
        assert all(torch.equal(x, y) for x, y in zip(want[k:], got)), k
        assert same_state(b.state_dict(), straight.state_dict())
    assert [f for f, _ in cuts] == [0, 0, 1, 2] and all(d > 0 for _, d in cuts)


def test_resume_skips_the_files_before_its_position(corpus: list[Path], tok) -> None:
    a = recording_loader(corpus, tok, 0, 2)
    while a.file == 0:
        next(a)
    mine = [corpus[f].name for f in a.my_files()]
    state, want = a.state_dict(), take(a, 40)
    OPENED.clear()
    b = recording_loader(corpus, tok, 0, 2)
    b.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(want, take(b, 40)))
    assert OPENED == mine[1:3]  # the first file is not opened again


def test_worker_processes_resume_exactly_with_files(corpus: list[Path], tok) -> None:
    straight = take(WorkerLoader(loader(corpus, tok, 1, 2), num_workers=2), 30)
    first = WorkerLoader(loader(corpus, tok, 1, 2), num_workers=2)
    take(first, 17)
    state = first.state_dict()
    first.close()
    assert {s["scheme"] for s in state["states"]} == {"files"}
    again = WorkerLoader(loader(corpus, tok, 1, 2), num_workers=2)
    again.load_state_dict(state)
    assert all(torch.equal(x, y) for x, y in zip(straight[17:], take(again, 13)))
    again.close()


def test_a_position_from_the_other_scheme_is_refused_in_one_line(corpus: list[Path],
                                                                 tok) -> None:
    by_files = loader(corpus, tok, 0, 2)
    take(by_files, 2)
    by_docs = loader(corpus[:1], tok, 0, 2)
    with pytest.raises(ConfigError, match=r"deals whole files .* has every reader stream") as e:
        by_docs.load_state_dict(by_files.state_dict())
    assert "\n" not in str(e.value)
    old = by_docs.state_dict()
    for key in ("scheme", "file"):  # as written before readers had schemes
        del old[key]
    with pytest.raises(ConfigError, match="has every reader stream .* deals whole files"):
        loader(corpus, tok, 0, 2).load_state_dict(old)
    two = WorkerLoader(loader(corpus, tok, 0, 1), num_workers=2)
    take(two, 2)
    two.close()
    fewer = WorkerLoader(loader(corpus[:1], tok, 0, 1), num_workers=2)
    with pytest.raises(ConfigError, match="deals whole files"):  # in this process
        fewer.load_state_dict(two.state_dict())


def test_a_position_saved_before_schemes_still_resumes(corpus: list[Path], tok) -> None:
    a = loader(corpus[:1], tok, 1, 2)
    take(a, 5)
    old = {k: v for k, v in a.state_dict().items() if k not in ("scheme", "file")}
    want = take(a, 5)
    b = loader(corpus[:1], tok, 1, 2)
    b.load_state_dict(old)
    assert all(torch.equal(x, y) for x, y in zip(want, take(b, 5)))


def test_json_files_through_datasets_are_dealt_too(corpus: list[Path], tok) -> None:
    """A hub dataset streams its data files as shards, as datasets' json builder does here."""
    stream = datasets.load_dataset("json", data_files=[str(p) for p in corpus], split="train",
                                   streaming=True)
    assert stream.n_shards == N_FILES
    cfg = cfg_for(corpus)
    readers = every_reader(lambda r, n: BlockLoader(stream, tok, "gpt", cfg, 2, r, n, 7), 2, 2)
    assert {r.scheme for r in readers} == {"files"}
    texts = [t for r in readers for _, t in r.documents()]
    assert Counter(texts) == Counter(train_texts(corpus))


def test_a_reader_dealt_only_files_without_documents_waits_for_the_next_deal(
        corpus: list[Path], tok, tmp_path: Path) -> None:
    bad = [tmp_path / f"bad{i}.jsonl" for i in range(3)]
    for path in bad:
        path.write_text('{"title": "no text field"}\n')
    for r in every_reader(lambda r, n: loader([corpus[0], *bad], tok, r, n), 2, 2):
        dealt_the_good_file = 0 in r.my_files()
        take(r, 5)
        assert dealt_the_good_file or r.epoch > 0  # empty epochs passed, not an error
    with pytest.raises(ConfigError, match="got no training document in epoch 0"):
        next(loader(bad, tok, 0, 3))
