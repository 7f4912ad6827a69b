"""Plain-text files become documents (paragraphs, or whole files, cut at data.doc_max_chars),
read a line at a time, so that a corpus of one file has a validation split."""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch

from conftest import TINY, compose, random_texts, read_metrics, run_distributed, train_runs
from lmforge.config import ConfigError, DataConfig
from lmforge.data.loader import BlockLoader
from lmforge.data.sources import is_validation, iter_documents, iter_examples, load_stream
from lmforge.data.tokenizer import train_tokenizer
from lmforge.data.workers import WorkerLoader


def paragraphs_file(path: Path, n: int, seed: int = 0) -> list[str]:
    """A file of n distinct paragraphs (two or three lines each) between blank lines; the
    documents it should give."""
    texts = random_texts(n, seed, lengths=(20, 60), prefix="paragraph {}: ")
    paras = [t[:60] + "\n" + t[60:] + "\n" for t in texts]
    path.write_text("\n".join(paras) + "\n\n", encoding="utf-8")
    return paras


def documents(cfg: DataConfig, split: str = "train", val_percent: float = 0.0
              ) -> tuple[list[str], Counter]:
    ds, _ = load_stream(cfg)
    skipped: Counter = Counter()
    return [t for _, t in iter_documents(ds, split, val_percent, skipped=skipped)], skipped


def test_one_file_gives_train_and_validation_covering_each_paragraph_once(tmp_path) -> None:
    paras = paragraphs_file(tmp_path / "corpus.txt", 400)
    cfg = DataConfig(source="files", paths=[str(tmp_path / "corpus.txt")])
    train, _ = documents(cfg, "train", 2.0)
    val, _ = documents(cfg, "validation", 2.0)
    assert train and val and not set(train) & set(val)
    assert Counter(train + val) == Counter(paras)
    assert all(is_validation(t, 2.0) for t in val)


def test_paragraphs_are_verbatim_runs_of_lines(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"\n\none\ntwo\r\n \t\nthree\n\n\n  four  \n")
    (tmp_path / "b.txt").write_text("no newline at the end")
    docs, skipped = documents(DataConfig(source="files", paths=[str(tmp_path / "*.txt")]))
    # Blank and whitespace-only lines separate, CRLF reads as LF (as datasets' reader).
    assert docs == ["one\ntwo\n", "three\n", "  four  \n", "no newline at the end"]
    assert not skipped


def test_bad_bytes_skip_only_their_paragraph(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"good one\n\ncaf\xe9 in latin-1\n\ngood two\n")
    docs, skipped = documents(DataConfig(source="files", paths=[str(tmp_path / "a.txt")]))
    assert docs == ["good one\n", "good two\n"] and skipped == {"not_utf8": 1}


def test_doc_max_chars_bounds_a_file_without_blank_lines(tmp_path: Path) -> None:
    line = "a line of text without any blank line after it, eighty characters long ....\n"
    text = line * (3_000_000 // len(line)) + "x" * 25_000  # 3 MB, and one line too long
    (tmp_path / "big.txt").write_text(text)
    for bound in (10_000, None):  # None: 10_000 for paragraphs
        docs, _ = documents(DataConfig(source="files", paths=[str(tmp_path / "big.txt")],
                                       doc_max_chars=bound))
        assert "".join(docs) == text and max(map(len, docs)) == 10_000
        assert all(d.endswith("\n") for d in docs[:-3])  # cut at line ends where it can
        assert [len(d) for d in docs[-3:]] == [10_000, 10_000, 5_000]  # the long line


def test_text_split_file_keeps_one_document_per_file(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_text("first\n\nfile\r\n")
    (tmp_path / "b.txt").write_bytes("caf\xe9\n\nand more".encode("latin-1"))
    (tmp_path / "c.txt").write_text(" \n\t\n")
    (tmp_path / "d.txt").write_bytes(b"text\x00with a NUL")
    (tmp_path / "e.txt").write_text("\n\n".join(random_texts(50, 1)))
    files = sorted(str(p) for p in tmp_path.glob("*.txt"))
    old = datasets.load_dataset("text", data_files=files, split="train", streaming=True,
                                encoding_errors="replace", sample_by="document")
    want = [ex["text"] for ex in iter_examples(old)]
    new, _ = load_stream(DataConfig(source="files", paths=files, text_split="file"))
    got = [ex["text"] for ex in iter_examples(new)]
    assert got[:3] + got[4:] == want[:3] + want[4:] and got[3] is None  # d: a binary skip
    docs, skipped = documents(DataConfig(source="files", paths=files, text_split="file"))
    assert docs == [want[0], want[4]]
    assert skipped == {"not_utf8": 1, "empty": 1, "binary": 1}


def test_a_file_is_read_as_it_streams_not_whole(tmp_path: Path) -> None:
    path = tmp_path / "growing.txt"
    paras = paragraphs_file(path, 5_000)  # ~1 MB
    ds, _ = load_stream(DataConfig(source="files", paths=[str(path)]))
    examples = iter_examples(ds)
    assert next(examples)["text"] == paras[0]
    # Written after the first document was read: a reader that had taken the file whole
    # would not see it.
    with open(path, "a") as f:
        f.write("written after the first document was read\n")
    rest = [ex["text"] for ex in examples]
    assert rest[-1] == "written after the first document was read\n"
    assert rest[:-1] == paras[1:]


def test_loader_state_roundtrip_on_text_files(tmp_path: Path) -> None:
    for i in range(3):
        paragraphs_file(tmp_path / f"part{i}.txt", 15, seed=i)
    cfg = DataConfig(source="files", paths=[str(tmp_path / "*.txt")], seq_len=32,
                     shuffle_buffer=8)
    ds, _ = load_stream(cfg)
    tok = train_tokenizer((t for _, t in iter_documents(ds, "train", 2.0)), "bpe", 300)
    a = BlockLoader(ds, tok, "gpt", cfg, 4, seed=3)
    for _ in range(40):  # past the end of the first epoch
        next(a)
    state = a.state_dict()
    expected = [next(a) for _ in range(5)]
    b = BlockLoader(ds, tok, "gpt", cfg, 4, seed=3)
    b.load_state_dict(state)
    assert state["epoch"] >= 1
    for want, got in zip(expected, [next(b) for _ in range(5)]):
        assert torch.equal(want["input_ids"], got["input_ids"])


def test_loader_worker_processes_read_every_text_file(tmp_path: Path) -> None:
    """In a DataLoader worker, datasets could hand the generator only some files (shards);
    each worker must read them all and take its share by document index."""
    for i in range(2):
        paragraphs_file(tmp_path / f"part{i}.txt", 30, seed=i)
    cfg = DataConfig(source="files", paths=[str(tmp_path / "*.txt")], seq_len=32)
    ds, _ = load_stream(cfg)
    tok = train_tokenizer((t for _, t in iter_documents(ds, "train", 2.0)), "bpe", 300)
    readers = [BlockLoader(ds, tok, "gpt", cfg, 4).for_worker(w, 2) for w in (0, 1)]
    want = [next(readers[k % 2])["input_ids"] for k in range(8)]
    workers = WorkerLoader(BlockLoader(ds, tok, "gpt", cfg, 4), num_workers=2)
    got = [next(workers)["input_ids"] for _ in range(8)]
    workers.close()
    assert all(torch.equal(a, b) for a, b in zip(want, got))


@pytest.mark.parametrize("override,needle", [
    ("data.text_split=lines", "data.text_split='lines' is not allowed"),
    ("data.doc_max_chars=0", "data.doc_max_chars=0 must be > 0"),
])
def test_bad_values_are_one_line(override: str, needle: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        compose([*TINY, "data=files", f"data.paths=[{tmp_path}/a.txt]", override])
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("overrides,needle", [
    (["data=hub", "data.hub_name=x", "data.text_split=file"], "data.source=hub does not read"),
    (["data.doc_max_chars=5000"], "set data.text_split=file or paragraph"),
    (["data=shards", "data.shards_dir=x", "data.text_split=file"], "data.source=shards does"),
    (["data=mixture", "data.sources=[{shards_dir: x}]", "data.doc_max_chars=9"],
     "data.doc_max_chars has no effect on pre-tokenized shards"),
])
def test_keys_that_would_be_ignored_are_one_line(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError) as e:
        compose([*TINY, *overrides])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_a_run_on_one_text_file_evaluates(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus.txt"
    paragraphs_file(corpus, 400)
    common = [*TINY, "data=files", f"data.paths=[{corpus}]", "trainer.max_steps=2",
              "trainer.log_every=1", "trainer.eval_every=2", "tokenizer.vocab_size=300",
              "trainer.sample_tokens=0"]
    # In a process of its own: a training leaves its rendezvous in the process.
    ((_, lines),) = run_distributed(train_runs, 1, [(tmp_path / "run", common),
                                                    (tmp_path / "whole",
                                                     [*common, "data.text_split=file"])])
    assert "val_loss" in read_metrics(tmp_path / "run")[-1]
    # As one document it has no validation split: one line says so, and how to get one.
    said = [ln for ln in lines if "no evaluation" in ln]
    assert len(said) == 1 and "raise data.val_percent" in said[0], lines
    assert "holds 0 document(s)" in said[0] and "data.text_split=paragraph" in said[0]
    assert "val_loss" not in read_metrics(tmp_path / "whole")[-1]
