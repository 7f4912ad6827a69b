"""Data path: corpus, tokenizer, packing, masking, sharding and loader state."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from conftest import compose, same_state
from lmforge.config import ConfigError, DataConfig
from lmforge.data.loader import BlockLoader
from lmforge.data.packing import Frame, Packer, mask_tokens, pack_documents
from lmforge.data.sources import (embedded_corpus_files, fingerprint, is_validation,
                                  iter_documents, load_stream)
from lmforge.data.tokenizer import SPECIALS, load_tokenizer, special_ids, train_tokenizer


@pytest.fixture(scope="module")
def stdlib_docs() -> list[str]:
    ds, _ = load_stream(DataConfig())
    return [d for _, d in iter_documents(ds, "train", 2.0)]


@pytest.fixture(scope="module")
def bpe(stdlib_docs):
    return train_tokenizer(iter(stdlib_docs), "bpe", 1024, max_chars=3_000_000)


def test_embedded_corpus_is_deterministic_and_real() -> None:
    a, b = embedded_corpus_files(), embedded_corpus_files()
    assert a == b and len(a) > 100
    assert all(p.suffix == ".py" for p in a)
    assert not any(part in ("test", "tests", "encodings") for p in a for part in p.parts[-3:-1])
    fp = fingerprint(a)
    assert fp["files"] == len(a) and fp["bytes"] > 1_000_000 and fp == fingerprint(b)


def test_validation_split_is_stable_disjoint_and_small(stdlib_docs) -> None:
    ds, _ = load_stream(DataConfig())
    val = [d for _, d in iter_documents(ds, "validation", 2.0)]
    assert 0 < len(val) < 0.1 * len(stdlib_docs)
    assert not set(val) & set(stdlib_docs)
    assert all(is_validation(d, 2.0) for d in val)
    assert val == [d for _, d in iter_documents(ds, "validation", 2.0)]


def test_tokenizer_roundtrip_and_specials(bpe, tmp_path: Path) -> None:
    text = "def main(argv):\n    return 0\n"
    assert bpe.decode(bpe.encode(text).ids) == text  # byte-level BPE is lossless
    assert bpe.get_vocab_size() == 1024
    bpe.save(str(tmp_path / "tok.json"))
    again = load_tokenizer(tmp_path / "tok.json")
    assert again.encode(text).ids == bpe.encode(text).ids
    assert special_ids(again, "bpe")["eos"] == bpe.token_to_id(SPECIALS["bpe"]["eos"])


def test_wordpiece_has_bert_specials(stdlib_docs) -> None:
    wp = train_tokenizer(iter(stdlib_docs[:50]), "wordpiece", 600)
    ids = special_ids(wp, "wordpiece")
    assert set(ids) == {"pad", "unk", "cls", "sep", "mask"} and len(set(ids.values())) == 5


def test_bad_tokenizer_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path / "bad.json")


def test_packing_keeps_every_token_in_order() -> None:
    docs = [list(range(i * 100, i * 100 + n)) for i, n in enumerate([5, 17, 3, 40, 9])]
    blocks = list(pack_documents(docs, block_len=8, sep_id=-1))
    stream = [t for d in docs for t in d + [-1]]
    assert all(len(b) == 8 for b in blocks)
    assert np.concatenate(blocks).tolist() == stream[: 8 * len(blocks)]
    assert len(stream) - 8 * len(blocks) < 8  # only a partial tail is held back


def test_bert_blocks_are_framed() -> None:
    p = Packer(Frame(4, sep_id=3, prefix=(2,), suffix=(3,)))
    blocks = list(p.add(list(range(10, 20))))
    assert [b.tolist() for b in blocks] == [[2, 10, 11, 12, 13, 3], [2, 14, 15, 16, 17, 3]]
    assert p.carry == [18, 19, 3]


def test_mlm_masking_rates() -> None:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, 1000, (64, 512))
    ids[:, 0], ids[:, -1] = 2, 3
    out = mask_tokens(ids, gen, mask_id=4, vocab_size=1000, special_ids=[2, 3], probability=0.15)
    picked = out["labels"] != -100
    assert picked[:, [0, -1]].sum() == 0  # specials are never picked
    assert abs(picked[:, 1:-1].float().mean().item() - 0.15) < 0.01
    assert torch.equal(out["labels"][picked], ids[picked])
    masked = (out["input_ids"] == 4) & picked
    kept = (out["input_ids"] == ids) & picked
    n = picked.sum().item()
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.02  # (random tokens rarely equal the original)
    assert torch.equal(out["input_ids"][~picked], ids[~picked])


def _loader(ds, tok, rank=0, world=1, split="train", arch="gpt", seq_len=32, seed=0):
    cfg = DataConfig(seq_len=seq_len, val_percent=2.0)
    return BlockLoader(ds, tok, arch, cfg, 4, rank, world, seed, split)


def test_gpt_batches_are_shifted(bpe) -> None:
    ds, _ = load_stream(DataConfig())
    b = next(_loader(ds, bpe))
    assert b["input_ids"].shape == b["labels"].shape == (4, 32)
    assert torch.equal(b["input_ids"][:, 1:], b["labels"][:, :-1])


def test_ranks_read_disjoint_documents_covering_the_split(text_corpus: Path, bpe) -> None:
    ds, _ = load_stream(DataConfig(source="files", paths=[str(text_corpus)]))
    seen = []
    for rank in range(2):
        loader = _loader(ds, bpe, rank, 2)
        seen.append({i for i, _ in loader.documents()})
    all_docs = {i for i, _ in iter_documents(ds.shuffle(seed=0, buffer_size=1), "train", 2.0)}
    assert not seen[0] & seen[1] and seen[0] | seen[1] == all_docs
    assert abs(len(seen[0]) - len(seen[1])) <= 1


def test_loader_state_roundtrip_gives_identical_batches(bpe, tmp_path) -> None:
    ds, _ = load_stream(DataConfig())
    for arch, tok in [("gpt", bpe)]:
        a = _loader(ds, tok, arch=arch)
        for _ in range(7):
            next(a)
        state = saved_and_loaded(a.state_dict(), tmp_path)  # as a checkpoint stores it
        expected = [next(a) for _ in range(4)]
        b = _loader(ds, tok, arch=arch)
        b.load_state_dict(state)
        for want, got in zip(expected, [next(b) for _ in range(4)]):
            assert all(torch.equal(want[k], got[k]) for k in want)
        assert same_state(a.state_dict(), b.state_dict())


def saved_and_loaded(state: dict, tmp_path) -> dict:
    torch.save(state, tmp_path / "state.pt")
    return torch.load(tmp_path / "state.pt", weights_only=True)


def test_bert_loader_state_roundtrip_includes_masks(stdlib_docs) -> None:
    wp = train_tokenizer(iter(stdlib_docs[:100]), "wordpiece", 800)
    ds, _ = load_stream(DataConfig())
    a = _loader(ds, wp, arch="bert")
    for _ in range(3):
        next(a)
    state = a.state_dict()
    expected = next(a)
    b = _loader(ds, wp, arch="bert")
    b.load_state_dict(state)
    got = next(b)
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert (got["input_ids"][:, 0] == wp.token_to_id("[CLS]")).all()


def test_epochs_reshuffle_document_order(tmp_path: Path, bpe) -> None:
    for i in range(8):
        (tmp_path / f"part{i}.txt").write_text(f"document number {i}")
    ds, _ = load_stream(DataConfig(source="files", paths=[str(tmp_path / "*.txt")]))
    loader = _loader(ds, bpe)
    orders = []
    for epoch in range(3):
        loader.epoch = epoch
        orders.append([t for _, t in loader.documents()])
    assert all(sorted(o) == sorted(orders[0]) for o in orders)  # same documents...
    assert len({tuple(o) for o in orders}) == 3  # ...in a new order each epoch
    loader.epoch = 1
    assert [t for _, t in loader.documents()] == orders[1]  # reproducibly


def test_local_formats_load(tmp_path: Path, text_corpus: Path) -> None:
    rows = [json.loads(l) for l in text_corpus.read_text().splitlines()]
    pq.write_table(pa.table({"body": [r["text"] for r in rows]}), tmp_path / "c.parquet")
    (tmp_path / "c.txt").write_text(rows[0]["text"])
    for paths, field in [([str(text_corpus)], "text"), ([str(tmp_path / "*.parquet")], "body"),
                         ([str(tmp_path / "c.txt")], "text")]:
        ds, info = load_stream(DataConfig(source="files", paths=paths, text_field=field))
        docs = [d for _, d in iter_documents(ds, "train", 0.0)]
        assert docs[0] == rows[0]["text"], info


def test_missing_files_are_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="matches no file"):
        load_stream(DataConfig(source="files", paths=[str(tmp_path / "nope*.jsonl")]))
    cfg = compose(["data=files", f"data.paths=[{tmp_path}/a.txt,{tmp_path}/b.jsonl]"])
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "b.jsonl").write_text('{"text": "y"}\n')
    with pytest.raises(ConfigError, match="mixes formats"):
        load_stream(cfg.data)


def test_wordpiece_training_gives_the_same_ids_every_time(tmp_path: Path) -> None:
    """The WordPiece trainer numbers its vocabulary in hash-map order, a different one in
    every process: lmforge reassigns the ids, so the same corpus gives the same file."""
    import subprocess
    import sys

    code = ("import sys; from lmforge.data.sources import embedded_corpus_files; "
            "from lmforge.data.tokenizer import train_tokenizer, save_tokenizer; "
            "texts = [f.read_text(errors='replace') for f in embedded_corpus_files()[:60]]; "
            "save_tokenizer(train_tokenizer(iter(texts), 'wordpiece', 800, 500_000), sys.argv[1])")
    files = [tmp_path / f"wp{i}.json" for i in range(3)]
    for f in files:
        subprocess.run([sys.executable, "-c", code, str(f)], check=True, timeout=120)
    texts = {f.read_text() for f in files}
    assert len(texts) == 1
    tok = load_tokenizer(files[0])
    assert [tok.token_to_id(t) for t in SPECIALS["wordpiece"].values()] == \
        list(range(len(SPECIALS["wordpiece"])))
    # The post-processor's [CLS]/[SEP] ids are the vocabulary's.
    enc = tok.encode("def f(x): return x")
    assert enc.ids[0] == tok.token_to_id("[CLS]") and enc.ids[-1] == tok.token_to_id("[SEP]")
