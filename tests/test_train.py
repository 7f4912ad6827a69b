"""End-to-end runs of `lmforge-train` on one CPU process, checked by their outputs."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from conftest import TINY, read_metrics, run_train, same_state
from lmforge.checkpoint import write_latest

pytestmark = pytest.mark.slow

KEYS = {"step", "loss", "lr", "grad_norm", "tokens", "tokens_per_s", "tflops", "mfu",
        "data_wait_frac", "mem_rss_gb", "samples_per_s", "step_time_s"}


def test_gpt_run_trains_and_writes_the_run_directory(tmp_path: Path) -> None:
    run = tmp_path / "gpt"
    run_train(run, *TINY, "trainer.max_steps=40", "trainer.log_every=10",
              "trainer.eval_every=20", "optim.lr=3e-3")
    for name in ["config.yaml", "metrics.jsonl", "tokenizer.json", "summary.json",
                 "ds_config.json", "sample.txt", "checkpoints/latest", "report.png"]:
        assert (run / name).is_file(), name
    rows = read_metrics(run)
    assert [r["step"] for r in rows] == [1, 10, 20, 30, 40]
    assert KEYS <= set(rows[-1]) and "val_loss" in rows[-1]
    assert rows[-1]["loss"] < 0.9 * rows[0]["loss"]
    assert 0 < rows[-1]["mfu"] < 1 and rows[-1]["tokens"] == 40 * 4 * 64
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["trainer"]["max_steps"] == 40 and cfg["data"]["seq_len"] == 64
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_loss"] == rows[-1]["loss"] and summary["tokens"] == 40 * 256
    assert summary["vocab_size"] == 512 and summary["world_size"] == 1
    tag = (run / "checkpoints/latest").read_text().strip()
    assert tag == "step_00000040" and (run / "checkpoints" / tag / "trainer_rank0.pt").is_file()


def test_bert_mlm_trains(tmp_path: Path) -> None:
    run = tmp_path / "bert"
    run_train(run, *TINY, "model=bert_tiny", "trainer.max_steps=60", "trainer.log_every=10",
              "trainer.micro_batch_size=16", "optim.lr=3e-3")
    rows = read_metrics(run)
    assert rows[-1]["loss"] < rows[0]["loss"] - 0.5
    assert not (run / "sample.txt").exists()  # no text sample for an encoder


@pytest.mark.parametrize("model,vocab,n_params", [("gpt2_124m", 50257, 124_439_808),
                                                 ("bert_base", 30522, 109_514_298)])
def test_dry_run_writes_summary_only(tmp_path: Path, model: str, vocab: int, n_params: int) -> None:
    run = tmp_path / model
    run_train(run, *TINY, f"model={model}", f"model.vocab_size={vocab}", "trainer.max_steps=0")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["n_params"] == n_params and summary["vocab_size"] == vocab
    assert summary["flops_per_token"] > 6 * summary["n_params_non_embedding"]
    assert not (run / "checkpoints").exists()


def test_zero2_bf16_runs(tmp_path: Path) -> None:
    run = tmp_path / "z2"
    run_train(run, *TINY, "parallel=zero2", "precision=bf16", "trainer.max_steps=10",
              "trainer.log_every=5")
    rows = read_metrics(run)
    assert len(rows) == 3 and all(r["grad_norm"] > 0 for r in rows)
    assert json.loads((run / "ds_config.json").read_text())["bf16"]["enabled"]


def test_resume_continues_exactly(tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    args = [*TINY, "trainer.max_steps=8", "trainer.log_every=1", "trainer.save_every=4",
            "trainer.keep_last=0", "trainer.eval_every=0"]
    run_train(straight, *args)
    # Rewind a copy to the step-4 checkpoint and run the same command in it again.
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    shutil.rmtree(resumed / "checkpoints" / "step_00000008")
    write_latest(resumed / "checkpoints", "step_00000004")
    (resumed / "metrics.jsonl").unlink()
    proc = run_train(resumed, *args)
    assert "resumed from" in proc.stderr
    want = {r["step"]: r["loss"] for r in read_metrics(straight)}
    got = {r["step"]: r["loss"] for r in read_metrics(resumed)}
    assert sorted(got) == [5, 6, 7, 8]
    assert all(got[s] == want[s] for s in got), (got, want)
    a = torch.load(straight / "checkpoints/step_00000008/trainer_rank0.pt", weights_only=True)
    b = torch.load(resumed / "checkpoints/step_00000008/trainer_rank0.pt", weights_only=True)
    assert same_state(a["loader"], b["loader"]) and a["tokens"] == b["tokens"]


def test_rerun_of_a_finished_run_does_nothing(tmp_path: Path) -> None:
    run = tmp_path / "done"
    run_train(run, *TINY, "trainer.max_steps=3")
    before = (run / "metrics.jsonl").read_text()
    proc = run_train(run, *TINY, "trainer.max_steps=3")
    assert "nothing to do" in proc.stderr and (run / "metrics.jsonl").read_text() == before


def test_model_vocab_smaller_than_tokenizer_is_an_error(tmp_path: Path) -> None:
    proc = run_train(tmp_path / "v", *TINY, "model.vocab_size=100", "trainer.max_steps=1",
                     check=False)
    assert proc.returncode == 2
    assert "model.vocab_size=100 is smaller than the tokenizer's 512" in proc.stderr


def test_grad_accumulation_equals_a_bigger_micro_batch(tmp_path: Path) -> None:
    common = [*TINY, "trainer.max_steps=4", "trainer.log_every=1", "trainer.eval_every=0"]
    run_train(tmp_path / "mb4", *common, "trainer.micro_batch_size=4")
    run_train(tmp_path / "mb2x2", *common, "trainer.micro_batch_size=2",
              "trainer.grad_accum_steps=2")
    a, b = read_metrics(tmp_path / "mb4"), read_metrics(tmp_path / "mb2x2")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    for ra, rb in zip(a, b):
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
        assert ra["grad_norm"] == pytest.approx(rb["grad_norm"], rel=1e-4)


def test_wandb_without_a_key_logs_offline(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(WANDB_CONFIG_DIR=str(tmp_path / "wandb-config"), NETRC=str(tmp_path / "none"))
    run = tmp_path / "run"
    proc = run_train(run, *TINY, "logging.wandb.mode=online", "trainer.max_steps=3", env=env)
    assert "logging offline" in proc.stderr
    runs = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    # The offline run holds the same metrics as metrics.jsonl, step for step.
    history = wandb_history(runs[0])
    jsonl = read_metrics(run)
    assert [h["_step"] for h in history] == [r["step"] for r in jsonl]
    for h, r in zip(history, jsonl):
        for key in ("loss", "lr", "grad_norm", "tokens_per_s", "mfu", "data_wait_frac"):
            assert h[key] == pytest.approx(r[key], rel=1e-6), key


def wandb_history(path: Path) -> list[dict]:
    """History rows of an offline .wandb file. wandb ships no reader for it (an open
    feature request upstream), so this follows its documented layout: a 7-byte ':W&B'
    header, then LevelDB-log records (crc32, length, type; 32 KiB blocks) of protobufs."""
    import struct

    from wandb.proto import wandb_internal_pb2

    data, rows, pos, parts = path.read_bytes(), [], 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a header: zero padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        parts += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(parts)
            parts = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                             for i in rec.history.item})
    return rows
