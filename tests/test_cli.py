"""Hydra's own front doors on lmforge-train: -m sweeps, -sc shell completion, -cd a user's
config dir; keys the chosen groups would ignore; run-dir names made safe."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, TINY, compose
from lmforge.config import ConfigError, run_name

FAST = [o for o in TINY if not o.startswith("trainer.sample")] + ["trainer.max_steps=0"]


def lmforge_train(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    code = "import sys; from lmforge.train import cli; sys.argv[0] = 'lmforge-train'; cli()"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.slow
def test_multirun_sweep_runs_every_job(tmp_path: Path) -> None:
    proc = lmforge_train("-m", "model=gpt_tiny,bert_tiny", f"hydra.sweep.dir={tmp_path}",
                         *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summaries = sorted(tmp_path.glob("*/summary.json"))
    assert [p.parent.name.split("__")[0] for p in summaries] == ["bert_tiny", "gpt_tiny"]
    assert {json.loads(p.read_text())["n_params"] > 0 for p in summaries} == {True}


def test_a_bad_override_in_a_sweep_is_one_line(tmp_path: Path) -> None:
    proc = lmforge_train("-m", "optim.lr=1e-3,3e-4", "trainer.max_stepz=0", cwd=tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "max_stepz" in proc.stderr
    assert not (tmp_path / "multirun").exists()


def test_shell_completion_prints_a_script(tmp_path: Path) -> None:
    proc = lmforge_train("-sc", "install=bash", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "complete" in proc.stdout and "lmforge-train" in proc.stdout


@pytest.mark.slow
def test_config_dir_adds_a_users_experiment(tmp_path: Path) -> None:
    exp = tmp_path / "myconf" / "experiment"
    exp.mkdir(parents=True)
    (exp / "mine.yaml").write_text("# @package _global_\ntrainer:\n  seed: 7\n")
    run = tmp_path / "run"
    proc = lmforge_train("-cd", str(tmp_path / "myconf"), "experiment=mine",
                         f"hydra.run.dir={run}", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "seed: 7" in (run / "config.yaml").read_text()
    # Without -cd the experiment is unknown: one line, exit 2.
    proc = lmforge_train("experiment=mine", *FAST, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "mine" in proc.stderr


@pytest.mark.parametrize("overrides, needle", [
    (["data.sources=[{path: my.txt}]"], "data.sources is set but data.source=embedded"),
    (["data=files", "data.paths=[a.txt]", "data.hub_name=x"], "data.hub_name is set"),
    (["data.paths=[a.txt]"], "data.paths is set but data.source=embedded"),
    (["tokenizer.path=t.json", "tokenizer.vocab_size=100"], "tokenizer.vocab_size has no effect"),
    (["data=shards", "data.shards_dir=x", "data.val_percent=3"], "data.val_percent has no effect"),
    (["data.mlm_probability=0.3"], "model.arch=gpt does not mask"),
    (["model.rope_theta=500000"], "model.rope_theta is set but model.pos_emb=learned"),
    (["precision.initial_scale_power=8"], "scales fp16 losses only"),
    (["data=mixture", "data.sources=[{shards_dir: a, format: json}]"], "sets format"),
])
def test_a_key_the_chosen_groups_ignore_stops_the_run(overrides: list[str], needle: str) -> None:
    with pytest.raises(ConfigError, match=needle):
        compose(overrides)


def test_keys_that_take_effect_pass() -> None:
    assert compose(["model=bert_tiny", "data.mlm_probability=0.3"]).data.mlm_probability == 0.3
    assert compose(["model=llama_tiny", "model.rope_theta=500000"]).model.rope_theta == 500000
    assert compose(["experiment=gpt2_124m_gpu"]).tokenizer.vocab_size == 50257


def test_run_names_are_safe_short_and_stable() -> None:
    assert run_name("gpt_tiny", "") == "gpt_tiny"
    assert run_name("gpt_tiny", "trainer.seed=3") == "gpt_tiny__trainer.seed=3"
    name = run_name("gpt_tiny", "data.paths=[corpus/*.jsonl],data=files")
    assert not set("/[]*'\" ") & set(name)
    assert name == run_name("gpt_tiny", "data.paths=[corpus/*.jsonl],data=files")
    assert name != run_name("gpt_tiny", "data.paths=[corpus/*.json],data=files")
    assert len(run_name("gpt_tiny", "x=" + "a" * 5000)) < 120


@pytest.mark.slow
def test_a_glob_override_makes_one_flat_run_dir(tmp_path: Path, text_corpus: Path) -> None:
    (tmp_path / "corpus").mkdir()
    text_corpus.rename(tmp_path / "corpus" / "c.jsonl")
    proc = lmforge_train("data=files", "data.paths=[corpus/*.jsonl]", *FAST, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    runs = [p for p in (tmp_path / "outputs").iterdir()]
    assert len(runs) == 1 and (runs[0] / "summary.json").is_file()
    assert runs[0].name.startswith("gpt_tiny__") and "[" not in runs[0].name


def test_the_package_finds_its_configs() -> None:
    from lmforge.config import conf_dir

    assert (conf_dir() / "train.yaml").is_file() and conf_dir() == REPO / "conf"


def test_cuda_requested_without_cuda_is_one_line(tmp_path: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = lmforge_train("trainer.device=cuda", f"hydra.run.dir={tmp_path / 'r'}", *FAST,
                         cwd=tmp_path)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr[-2000:]
    assert "trainer.device=cuda but CUDA is not usable" in proc.stderr
