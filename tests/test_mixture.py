"""Data mixtures: shard sources mixed per sample (exact weights, layout-free, resumable),
on-the-fly sources mixed per document (seeded), and a mixture run end to end."""
from __future__ import annotations

import json
import subprocess
from collections import Counter
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, random_corpus, read_metrics, run_train
from lmforge.config import ConfigError, DataConfig, SourceConfig
from lmforge.data.shards import ShardLoader, ShardSet
from lmforge.data.sources import iter_documents, load_stream
from lmforge.data.tokenizer import load_tokenizer, special_ids

WORDS = {"a": "apple banana cherry grape lemon mango melon peach pear plum".split(),
         "b": "zinc xenon yttrium tungsten vanadium uranium thorium sodium".split()}


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shards of two corpora with disjoint words, made with one tokenizer."""
    root = tmp_path_factory.mktemp("mix")
    both = root / "both.jsonl"
    a = random_corpus(root / "a.jsonl", 400, seed=1, lengths=(8, 40), words=WORDS["a"])
    b = random_corpus(root / "b.jsonl", 400, seed=2, lengths=(8, 40), words=WORDS["b"])
    both.write_text(a.read_text() + b.read_text())
    prep = [sys.executable, "-m", "lmforge.prepare"]
    subprocess.run([*prep, "tokenizer", "--out", str(root / "tok.json"), "data=files",
                    f"data.paths=[{both}]", "tokenizer.vocab_size=300"], cwd=REPO, check=True,
                   capture_output=True)
    for name in "ab":
        subprocess.run([*prep, "shards", "--out", str(root / name), "--tokenizer",
                        str(root / "tok.json"), "data=files", f"data.paths=[{root / name}.jsonl]"],
                       cwd=REPO, check=True, capture_output=True)
    return root


def loader(root: Path, weights: list[float], rank: int = 0, world: int = 1, mb: int = 8,
           seed: int = 0) -> ShardLoader:
    tok = load_tokenizer(root / "a/tokenizer.json")
    return ShardLoader([ShardSet(root / "a", "train"), ShardSet(root / "b", "train")], "gpt",
                       special_ids(tok, "bpe"), 16, mb, rank, world, seed, weights=weights)


def vocab_of(root: Path) -> set[int]:
    return set(np.fromfile(root / "train-00000.bin", dtype=np.uint16).tolist())


def source_of(vocabs: dict[str, set[int]], ids: torch.Tensor) -> str:
    kinds = [k for k, v in vocabs.items() if set(ids.tolist()) <= v]
    assert len(kinds) == 1, ids  # a block never spans two sources
    return kinds[0]


def test_shard_mixture_matches_its_weights_over_10k_samples(two: Path) -> None:
    vocabs = {k: vocab_of(two / k) for k in "ab"}
    mix = loader(two, [0.7, 0.3])
    seen = []
    for _ in range(10_000 // 8):
        seen += [source_of(vocabs, row) for row in next(mix)["input_ids"]]
    share_a = seen.count("a") / len(seen)
    assert share_a == pytest.approx(0.7, rel=0.02)
    assert abs(seen.count("a") - 7000) <= 1  # the greedy schedule is exact to one sample
    assert mix.state_dict()["counts"] == [seen.count("a"), seen.count("b")]
    # Each source is far smaller than its share of 10k samples: both went through epochs.
    assert all(c > n for c, n in zip(mix.counts, mix.blocks))


def test_shard_mixture_is_deterministic_layout_free_and_resumable(two: Path) -> None:
    one = loader(two, [2, 1])
    want = [next(one)["input_ids"] for _ in range(12)]
    again = loader(two, [2, 1])
    assert all(torch.equal(a, next(again)["input_ids"]) for a in want)
    ranks = [loader(two, [2, 1], r, 2, mb=4) for r in (0, 1)]
    for a in want:
        assert torch.equal(a, torch.cat([next(r)["input_ids"] for r in ranks]))
    mid = loader(two, [2, 1])
    for _ in range(5):
        next(mid)
    resumed = loader(two, [2, 1], 1, 2, mb=4)  # another rank layout continues the same run
    resumed.load_state_dict(json.loads(json.dumps(mid.state_dict())))
    other = loader(two, [2, 1], 0, 2, mb=4)
    other.load_state_dict(mid.state_dict())
    for a in want[5:]:
        assert torch.equal(a, torch.cat([next(other)["input_ids"], next(resumed)["input_ids"]]))
    assert not torch.equal(want[0], next(iter(loader(two, [2, 1], seed=1)))["input_ids"])


def test_on_the_fly_mixture_interleaves_documents_by_weight(two: Path) -> None:
    cfg = DataConfig(source="mixture", val_percent=0.0, sources=[
        SourceConfig(path=str(two / "a.jsonl"), weight=0.25),
        SourceConfig(paths=[str(two / "b.jsonl")], weight=0.75)])
    ds, info = load_stream(cfg, seed=3)
    assert info["weights"] == [0.25, 0.75] and len(info["parts"]) == 2
    texts = [t for _, t in zip(range(400), (d for _, d in iter_documents(ds, "train", 0.0)))]
    share_a = np.mean([t.split()[0] in WORDS["a"] for t in texts])
    assert abs(share_a - 0.25) < 0.05  # seeded draws: binomial noise on 400 documents
    again, _ = load_stream(cfg, seed=3)
    assert texts == [t for _, t in zip(range(400), (d for _, d in iter_documents(again, "train", 0.0)))]


def test_training_on_a_shard_mixture(two: Path, tmp_path: Path) -> None:
    run_train(tmp_path, "logging=quiet", "data=mixture",
              # `path` finds the shards by their manifest; shards_dir names them outright.
              f"data.sources=[{{path: {two / 'a'}, weight: 3}}, {{shards_dir: {two / 'b'}}}]",
              "data.seq_len=16", "model.n_layers=1", "model.d_model=32", "model.n_heads=2",
              "trainer.micro_batch_size=4", "trainer.max_steps=3", "trainer.log_every=1",
              "trainer.eval_every=3", "trainer.sample_tokens=0")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [p["weight"] for p in summary["corpus"]["parts"]] == [3.0, 1.0]
    assert [r["step"] for r in read_metrics(tmp_path)] == [1, 2, 3]
    assert "val_loss" in read_metrics(tmp_path)[-1]
    # Each source's own validation loss, named after its directory.
    assert {"val/a_loss", "val/b_loss"} <= set(read_metrics(tmp_path)[-1])


def test_a_source_without_a_usable_document_is_refused(tmp_path: Path) -> None:
    """Its share would silently go to the other sources: one line instead, naming it."""
    good = random_corpus(tmp_path / "good.jsonl", 20, seed=1)
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"body": f"text {i}"}) + "\n" for i in range(5)))
    cfg = DataConfig(source="mixture", sources=[SourceConfig(path=str(good)),
                                                SourceConfig(path=str(bad))])
    with pytest.raises(ConfigError) as e:
        load_stream(cfg)
    assert str(e.value) == (f"data.sources[1] ({bad}) has no usable document (5 skipped: "
                            "{'no_text_field': 5}); check its path(s), format and text_field")
    load_stream(DataConfig(source="mixture", sources=[SourceConfig(path=str(good))] * 2))


def test_a_mixture_counts_each_skip_by_its_reason(tmp_path: Path) -> None:
    """A JSON Lines source's unusable lines are counted by reason (not all as "empty"),
    also beside a hub dataset (a local dataset directory), whose rows carry no reason."""
    lines = ['{"text": "one good line"}', '{"body": "no text field"}', "not json",
             '{"text": "two good lines"}']
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n")
    hub = tmp_path / "hub"
    hub.mkdir()
    (hub / "train.jsonl").write_text("".join(json.dumps({"text": f"hub row {i}"}) + "\n"
                                             for i in range(3)))
    cfg = DataConfig(source="mixture", sources=[
        SourceConfig(path=str(tmp_path / "a.jsonl")), SourceConfig(hub_name=str(hub))])
    skipped: Counter[str] = Counter()
    docs = [t for _, t in iter_documents(load_stream(cfg)[0], "train", 0.0, skipped=skipped)]
    assert dict(skipped) == {"no_text_field": 1, "bad_json": 1}
    assert {"one good line", "two good lines", "hub row 0", "hub row 2"} <= set(docs)
