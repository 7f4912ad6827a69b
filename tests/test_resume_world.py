"""Resuming with another number of ranks. Pre-tokenized shards are read by global sample
index, so a run stopped on 1 rank and continued on 2 (and back on 1), with the same global
batch, trains on exactly the samples of an uninterrupted run and logs the same losses, under
ZeRO-0 (whole state in one file) and ZeRO-2/3 (partitioned optimizer state, converted to a
DeepSpeed universal checkpoint on the way; the checkpoint resumed is never modified).
On-the-fly data has a per-rank position: resuming it on another number of ranks is refused.

The resumes train in `run_distributed` worlds of 1, 2 and 1 ranks, each going through every
ZeRO stage in turn; the refusal, an exit code and one line, goes through `lmforge-train`."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import (TINY, prepare_shards, random_corpus, read_metrics, run_distributed,
                      train_runs)
from lmforge.checkpoint import verify
from test_multiproc import run_ranks, spawn_ranks, wait_all

pytestmark = [pytest.mark.slow, pytest.mark.multiproc]

GLOBAL_BATCH = 8
STAGES = [0, 2, 3]


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


@pytest.fixture(scope="module")
def regrid(shards: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[int, SimpleNamespace]:
    """Per ZeRO stage: `straight`, 9 steps on 1 rank; `run`, 3 steps on 1 rank, then on 2
    ranks to step 6, then on 1 rank to step 9. Also what the checkpoints looked like and
    what rank 0 logged right after each resume."""
    root = tmp_path_factory.mktemp("regrid")
    runs = {s: root / f"zero{s}" / "run" for s in STAGES}

    def train(n: int, *jobs: tuple[str, int]) -> list[list[str]]:
        """Each (run name, max_steps) job of every stage in one world of n ranks; rank 0's
        log of each, in that order."""
        return run_distributed(train_runs, n, [
            (root / f"zero{s}" / name, [*args(shards, s), *ranks(n), f"trainer.max_steps={steps}"])
            for name, steps in jobs for s in STAGES])[0]

    train(1, ("straight", 9), ("run", 3))
    before = {s: fingerprint(runs[s] / "checkpoints/step_00000003") for s in STAGES}
    to_two = train(2, ("run", 6))
    ckpts = {s: runs[s] / "checkpoints" for s in STAGES}
    after_two = {s: SimpleNamespace(
        step3=fingerprint(ckpts[s] / "step_00000003"),
        verify3=verify(ckpts[s] / "step_00000003"),
        hidden=sorted(p.name for p in ckpts[s].iterdir() if p.name.startswith(".")),
        step6_ranks=sorted(p.name for p in (ckpts[s] / "step_00000006").glob("trainer_rank*")))
        for s in STAGES}
    back = train(1, ("run", 9))
    return {s: SimpleNamespace(straight=root / f"zero{s}" / "straight", run=runs[s],
                               before=before[s], to_two="\n".join(to_two[i]),
                               after_two=after_two[s], back="\n".join(back[i]))
            for i, s in enumerate(STAGES)}


@pytest.mark.parametrize("stage", STAGES)
def test_one_rank_to_two_and_back_matches_an_uninterrupted_run(
        regrid: dict[int, SimpleNamespace], stage: int) -> None:
    res = regrid[stage]
    straight, run = res.straight, res.run
    err = res.to_two
    assert "step_00000003 was written by 1 rank, this run has 2: the data continues at " \
           "global sample 24" in err, err[-3000:]
    assert ("converted to a DeepSpeed universal checkpoint" in err) == (stage > 0)
    # The checkpoint resumed is left as it was; the conversion's scratch space is gone.
    assert res.after_two.step3 == res.before
    assert res.after_two.verify3 is None
    assert res.after_two.hidden == []
    assert res.after_two.step6_ranks == ["trainer_rank0.pt", "trainer_rank1.pt"]
    err = res.back
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
