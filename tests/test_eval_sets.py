"""Per-source validation and trainer.eval_sets: a mixture run logs val/<name>_loss per source
next to an unchanged val_loss, an eval set logs its own, each equal to what lmforge-eval
reports for the final checkpoint; bad eval sets are one line and exit 2."""
from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import (TINY, compose, random_corpus, read_metrics, run_distributed, run_train,
                      train_runs)
from lmforge.config import ConfigError, SourceConfig, one_line, source_names
from lmforge.data.loader import BlockLoader
from lmforge.data.sources import load_stream
from lmforge.eval import main as eval_main
from lmforge.weights import load_model

FRUIT = "apple banana cherry grape lemon mango melon peach pear plum".split()
METAL = "zinc xenon yttrium tungsten vanadium uranium thorium sodium".split()
MB, EVAL_BATCHES = 4, 2  # TINY's


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """4 steps on a 2-source on-the-fly mixture (one source named, one not) with one eval
    set, a plain text file."""
    root = tmp_path_factory.mktemp("evalsets")
    a = random_corpus(root / "a.jsonl", 200, seed=1, lengths=(20, 60), words=FRUIT)
    b = random_corpus(root / "b.jsonl", 200, seed=2, lengths=(20, 60), words=METAL)
    rng = random.Random(3)
    wiki = root / "wiki.txt"
    wiki.write_text(" ".join(rng.choice(FRUIT + METAL) for _ in range(1500)) + "\n")
    overrides = [*TINY, "data=mixture", "data.val_percent=20",
                 f"data.sources=[{{name: fruit, path: {a}, weight: 3}}, {{path: {b}}}]",
                 f"trainer.eval_sets=[{{name: wiki, paths: [{wiki}]}}]",
                 "trainer.max_steps=4", "trainer.eval_every=2", "trainer.log_every=2"]
    run_train(root / "run", *overrides)
    return SimpleNamespace(dir=root / "run", a=a, b=b, wiki=wiki, overrides=overrides)


def lmforge_eval(capsys: pytest.CaptureFixture, *argv: object) -> dict:
    code = eval_main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.splitlines()[-1])


@pytest.mark.slow
def test_each_source_and_eval_set_is_logged_at_every_eval(run: SimpleNamespace) -> None:
    keys = {"val_loss", "val/fruit_loss", "val/b_loss", "val/wiki_loss"}
    rows = read_metrics(run.dir)
    assert [r["step"] for r in rows] == [1, 2, 4]
    assert not keys & set(rows[0])  # step 1 logs, but does not evaluate
    for r in rows[1:]:
        assert keys <= set(r) and all(math.isfinite(r[k]) for k in keys), r
    # A text of both sources' words is unlike either: its loss is its own.
    assert len({rows[-1][k] for k in keys}) == 4


@pytest.mark.slow
def test_per_source_losses_are_lmforge_eval_on_the_final_checkpoint(
        run: SimpleNamespace, capsys: pytest.CaptureFixture) -> None:
    last = read_metrics(run.dir)[-1]
    bound = [f"trainer.micro_batch_size={MB}", f"trainer.eval_batches={EVAL_BATCHES}"]
    # The run's own data: each source's validation split, the same first batches.
    own = lmforge_eval(capsys, run.dir, *bound)["sources"]
    assert list(own) == ["fruit", str(run.b)]  # lmforge-eval labels an unnamed source by path
    assert abs(own["fruit"]["loss"] - last["val/fruit_loss"]) < 1e-4
    assert abs(own[str(run.b)]["loss"] - last["val/b_loss"]) < 1e-4
    # The eval set: a named source, read whole.
    wiki = lmforge_eval(capsys, run.dir, "data=files", f"data.paths=[{run.wiki}]",
                        "data.seq_len=64", *bound)
    assert wiki["split"] == "all" and wiki["tokens"] == EVAL_BATCHES * MB * 64
    assert abs(wiki["loss"] - last["val/wiki_loss"]) < 1e-4


@pytest.mark.slow
def test_val_loss_stays_the_mixtures_own_validation_batches(run: SimpleNamespace) -> None:
    """val_loss is measured as before, on the first batches of the mixed validation stream:
    not a mean of the per-source losses, which are each over that source's own batches."""
    cfg = compose(run.overrides)
    model, tok, _ = load_model(str(run.dir))
    val = BlockLoader(load_stream(cfg.data, cfg.trainer.seed)[0], tok, "gpt", cfg.data, MB,
                      seed=cfg.trainer.seed, split="validation")
    with torch.no_grad():
        losses = [model(b).item() for _, b in zip(range(EVAL_BATCHES), val)]
    assert len(losses) == EVAL_BATCHES
    assert abs(read_metrics(run.dir)[-1]["val_loss"] - sum(losses) / len(losses)) < 1e-5


def test_unnamed_sources_get_short_stable_names() -> None:
    sources = [SourceConfig(path="/d/web.jsonl"), SourceConfig(shards_dir="/s/code/"),
               SourceConfig(paths=["a/*.txt"]), SourceConfig(hub_name="org/stories"),
               SourceConfig(name="web", path="x.txt"), SourceConfig(path="/e/code")]
    assert source_names(sources) == ["web_0", "code", "source2", "stories", "web", "code_5"]


@pytest.mark.parametrize("override, msg", [
    ("trainer.eval_sets=[{paths: [x.txt]}]", "trainer.eval_sets[0] needs a name"),
    ("trainer.eval_sets=[{name: w}]", "trainer.eval_sets[0] must set exactly one of path, "
     "shards_dir, paths, hub_name (it sets none)"),
    ("trainer.eval_sets=[{name: w, kind: files, paths: [x.txt]}]",
     "Key 'kind' not in 'SourceConfig' (known keys: name, weight, path"),
    ("trainer.eval_sets=[{name: w, paths: [x]}, {name: w, path: y}]",
     "trainer.eval_sets[1].name='w' is used twice"),
    ("trainer.eval_sets=[{name: a/b, paths: [x]}]", "trainer.eval_sets[0].name='a/b' may hold"),
    ("trainer.eval_sets=[{name: w, paths: [x], weight: 2}]", "weight=2.0 is not read"),
    ("trainer.eval_sets=[{name: w, paths: [x], hub_split: test}]",
     "trainer.eval_sets[0] sets hub_split, which its files source does not read"),
    ("trainer.eval_sets=[{name: web, paths: [x]}]", "trainer.eval_sets[0].name='web' is also a "
     "data.sources name"),
])
def test_bad_eval_sets_are_one_line_errors(override: str, msg: str) -> None:
    mixture = ["data=mixture", "data.sources=[{path: web.jsonl}, {name: b, path: b.jsonl}]"]
    with pytest.raises(Exception) as e:
        compose([*mixture, override])
    assert msg in one_line(e.value) and "\n" not in one_line(e.value)


def test_duplicate_mixture_names_are_refused() -> None:
    with pytest.raises(ConfigError, match=r"data.sources\[1\].name='a' is used twice"):
        compose(["data=mixture", "data.sources=[{name: a, path: x}, {name: a, path: y}]"])


@pytest.mark.slow
def test_a_missing_eval_set_file_stops_the_run_with_one_line(tmp_path: Path) -> None:
    proc = run_train(tmp_path / "run", *TINY, "trainer.max_steps=2",
                     f"trainer.eval_sets=[{{name: wiki, paths: [{tmp_path}/nope.txt]}}]",
                     check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        f"lmforge-train: config error: trainer.eval_sets[0].paths entry "
        f"'{tmp_path}/nope.txt' matches no file; check the path or glob")


def test_renaming_a_mixture_source_still_resumes() -> None:
    """A name only labels val/<name>_loss: the resume guard does not record it."""
    from lmforge.trainer import Trainer

    def guard(sources: str) -> dict:
        return Trainer.guard(SimpleNamespace(cfg=compose(["data=mixture", sources]), summary={}))

    assert guard("data.sources=[{path: a.jsonl}]") == \
        guard("data.sources=[{name: a, path: a.jsonl}]")


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_evaluate_only_what_both_can_read(tmp_path: Path) -> None:
    """Each set is cut to the batches every rank has (ZeRO-3 forwards are collectives): a set
    of one document, which only rank 0 reads, is not logged, and nothing waits on it."""
    many = random_corpus(tmp_path / "many.jsonl", 60, seed=4, lengths=(40, 80), words=FRUIT)
    one = random_corpus(tmp_path / "one.jsonl", 1, seed=5, lengths=(2000, 2000), words=METAL)
    run = tmp_path / "run"
    logs = run_distributed(train_runs, 2, [(run, [
        *TINY, "parallel=zero3", "trainer.max_steps=2", "trainer.log_every=1",
        f"trainer.eval_sets=[{{name: many, path: {many}}}, {{name: one, path: {one}}}]"])])
    last = read_metrics(run)[-1]
    assert math.isfinite(last["val/many_loss"]) and math.isfinite(last["val_loss"])
    assert "val/one_loss" not in last
    assert any("val/one_loss is not logged" in line for line in logs[0][0])
