"""Data parallelism changes nothing but speed: the same tiny GPT, shards and seed give the
same per-step losses on 1 rank x micro batch 8, 1 rank x (2 x micro batch 4) accumulated,
and 2 ranks x micro batch 4 under ZeRO 0-3; and the ZeRO stages really shard.

The 1-rank runs go through `lmforge-train`; the 2-rank runs train in one `run_distributed`
world, stage after stage (the launchers' own tests start 2-rank runs through the CLI)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import (prepare_shards, random_corpus, read_metrics, run_distributed, run_train,
                      train_runs)

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

STEPS = 6
STAGES = [0, 1, 2, 3]


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("parity")
    return prepare_shards(random_corpus(root / "corpus.jsonl", 300, seed=1), root / "shards",
                          "tokenizer.vocab_size=256")


def common(shards: Path) -> list[str]:
    return ["logging=quiet", "data=shards", f"data.shards_dir={shards}", "data.seq_len=32",
            "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "optim.warmup_steps=2",
            f"trainer.max_steps={STEPS}", "trainer.log_every=1", "trainer.eval_every=0",
            "trainer.sample_tokens=0"]


def losses(run: Path) -> list[float]:
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == list(range(1, STEPS + 1))
    return [r["loss"] for r in rows]


@pytest.fixture(scope="module")
def reference(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> list[float]:
    run = tmp_path_factory.mktemp("ref") / "run"
    run_train(run, *common(shards), "trainer.micro_batch_size=8")
    return losses(run)


def test_grad_accumulation_matches_the_bigger_micro_batch(shards: Path, reference: list[float],
                                                         tmp_path: Path) -> None:
    run_train(tmp_path, *common(shards), "trainer.micro_batch_size=4", "trainer.grad_accum_steps=2")
    assert losses(tmp_path) == pytest.approx(reference, rel=1e-5)
    assert reference[-1] < reference[0]


@pytest.fixture(scope="module")
def two_ranks(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-rank run per ZeRO stage (micro batch 4 each), in root/zero{stage}."""
    root = tmp_path_factory.mktemp("two_ranks")
    run_distributed(train_runs, 2, [(root / f"zero{stage}", [
        *common(shards), f"parallel=zero{stage}", "trainer.micro_batch_size=4"])
        for stage in STAGES])
    return root


@pytest.mark.parametrize("stage", STAGES)
def test_two_ranks_match_one_under_every_zero_stage(two_ranks: Path, reference: list[float],
                                                    stage: int) -> None:
    run = two_ranks / f"zero{stage}"
    assert losses(run) == pytest.approx(reference, rel=1e-5)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    frac = summary["shard_fractions"]
    # Measured from the engine's partitions on rank 0: ZeRO-1/2 halve the optimizer state,
    # ZeRO-3 also the parameters; stage 0 replicates both.
    want_opt, want_params = (1.0, 1.0) if stage == 0 else (0.5, 0.5 if stage == 3 else 1.0)
    assert frac["optimizer_state"] == pytest.approx(want_opt, rel=0.05)
    assert frac["params"] == pytest.approx(want_params, rel=0.05)
