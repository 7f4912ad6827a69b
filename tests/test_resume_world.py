"""Resuming with another number of ranks. Pre-tokenized shards are read by global sample
index, so a run stopped on 1 rank and continued on 2 (and back on 1), with the same global
batch, trains on exactly the samples of an uninterrupted run and logs the same losses, under
ZeRO-0 (whole state in one file) and ZeRO-2/3 (partitioned optimizer state, converted to a
DeepSpeed universal checkpoint on the way; the checkpoint resumed is never modified).
On-the-fly data has a per-rank position: resuming it on another number of ranks is refused."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import TINY, prepare_shards, random_corpus, read_metrics
from lmforge.checkpoint import verify
from test_multiproc import run_ranks, spawn_ranks, wait_all

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

GLOBAL_BATCH = 8


@pytest.fixture(scope="module")
def shards(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("shards")
    return prepare_shards(random_corpus(root / "corpus.jsonl", 300, seed=7, lengths=(5, 60)),
                          root / "gpt", "tokenizer.vocab_size=256")


def args(shards: Path, stage: int) -> list[str]:
    # fp32; the warmup (20 steps) outlasts the run, so the LR does not depend on max_steps.
    return ["logging=quiet", "data=shards", f"data.shards_dir={shards}", "data.seq_len=32",
            "model.n_layers=2", "model.d_model=64", "model.n_heads=2", "trainer.log_every=1",
            "trainer.eval_every=0", "trainer.sample_tokens=0", "trainer.save_every=3",
            "trainer.keep_last=0", f"parallel=zero{stage}"]


def ranks(n: int) -> list[str]:
    """n ranks with the same global batch."""
    return [f"trainer.micro_batch_size={GLOBAL_BATCH // n}"]


def fingerprint(ckpt: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(ckpt.iterdir()) if p.is_file()}


def adam_state(ckpt: Path) -> tuple[list, list]:
    """ZeRO-3, rank 0's partition: (weight decay of each parameter group, Adam step of each
    sub-group)."""
    sd = torch.load(ckpt / "zero_pp_rank_0_mp_rank_00_optim_states.pt", map_location="cpu",
                    weights_only=False)["optimizer_state_dict"]["optimizer_state_dict"]
    return ([g["weight_decay"] for g in sd["param_groups"]],
            [float(s["step"]) for s in sd["state"].values()])


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_one_rank_to_two_and_back_matches_an_uninterrupted_run(
        tmp_path: Path, shards: Path, stage: int) -> None:
    a = args(shards, stage)
    straight, run = tmp_path / "straight", tmp_path / "run"
    run_ranks(straight, 1, *a, *ranks(1), "trainer.max_steps=9")
    run_ranks(run, 1, *a, *ranks(1), "trainer.max_steps=3")
    ckpts = run / "checkpoints"
    before = fingerprint(ckpts / "step_00000003")
    err = run_ranks(run, 2, *a, *ranks(2), "trainer.max_steps=6")
    assert "step_00000003 was written by 1 rank, this run has 2: the data continues at " \
           "global sample 24" in err, err[-3000:]
    assert ("converted to a DeepSpeed universal checkpoint" in err) == (stage > 0)
    # The checkpoint resumed is left as it was; the conversion's scratch space is gone.
    assert fingerprint(ckpts / "step_00000003") == before
    assert verify(ckpts / "step_00000003") is None
    assert sorted(p.name for p in ckpts.iterdir() if p.name.startswith(".")) == []
    assert sorted(p.name for p in (ckpts / "step_00000006").glob("trainer_rank*")) \
        == ["trainer_rank0.pt", "trainer_rank1.pt"]
    err = run_ranks(run, 1, *a, *ranks(1), "trainer.max_steps=9")
    assert "step_00000006 was written by 2 ranks, this run has 1" in err, err[-3000:]

    want = {r["step"]: r for r in read_metrics(straight)}
    got = {r["step"]: r for r in read_metrics(run)}
    assert sorted(want) == sorted(got) == list(range(1, 10))
    for step in range(1, 10):
        assert got[step]["tokens"] == want[step]["tokens"] == step * GLOBAL_BATCH * 32
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-5), step
    assert got[9]["loss"] < got[1]["loss"]
    for r in (straight, run):
        state = torch.load(r / "checkpoints/step_00000009/trainer_rank0.pt", weights_only=True)
        assert state["loader"]["consumed"] == 9 * GLOBAL_BATCH
    if stage == 3:  # DeepSpeed's ZeRO-3 universal load needs two corrections (checkpoint.py)
        assert adam_state(run / "checkpoints/step_00000009") \
            == adam_state(straight / "checkpoints/step_00000009") == ([0.1, 0.0], [9.0, 9.0])


def test_on_the_fly_data_refuses_another_number_of_ranks(tmp_path: Path) -> None:
    run = tmp_path / "run"
    a = [*TINY, "trainer.max_steps=2"]
    run_ranks(run, 1, *a)
    ckpt = run / "checkpoints/step_00000002"
    before = fingerprint(ckpt)
    codes, errs = wait_all(spawn_ranks(run, 2, *a, "trainer.max_steps=4"))
    assert codes == [2, 2], errs[0][-3000:]
    want = (f"lmforge-train: config error: {ckpt} was written by 1 rank, this run has 2: "
            "on-the-fly data resumes only with the same number of ranks (1); data=shards "
            "resumes with any")
    for err in errs:
        assert "Traceback" not in err
        assert [ln for ln in err.splitlines() if "error" in ln.lower()] == [want]
    assert fingerprint(ckpt) == before
    assert sorted(p.name for p in (run / "checkpoints").glob("step_*")) == ["step_00000002"]
