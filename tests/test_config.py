"""Config tree: every shipped file composes and validates; bad input is one clear line."""
from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from conftest import CONF, REPO, compose
from lmforge.config import ConfigError, known_keys

GROUPS = ["model", "data", "tokenizer", "optim", "parallel", "precision", "logging"]


@pytest.mark.parametrize("group,name", [(g, p.stem) for g in GROUPS
                                        for p in sorted((CONF / g).glob("*.yaml"))])
def test_every_group_option_composes(group: str, name: str) -> None:
    extra = ["data.hub_name=some/dataset"] if (group, name) == ("data", "hub") else []
    extra += ["data.paths=[x.txt]"] if (group, name) == ("data", "files") else []
    extra += ["data.shards_dir=shards"] if (group, name) == ("data", "shards") else []
    extra += ["data.sources=[{shards_dir: a, weight: 2}, {shards_dir: b}]"] \
        if (group, name) == ("data", "mixture") else []
    cfg = compose([f"{group}={name}", *extra])
    # Every key the file sets reaches the typed config (those given above aside).
    written = flat(OmegaConf.to_container(OmegaConf.load(CONF / group / f"{name}.yaml")), group)
    assert written, f"{group}/{name}.yaml sets nothing"
    given = {e.split("=")[0] for e in extra}
    got = flat(dataclasses.asdict(cfg))
    assert {k: got[k] for k in written if k not in given} == \
        {k: v for k, v in written.items() if k not in given}


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF / "experiment").glob("*.yaml")))
def test_every_experiment_composes(name: str) -> None:
    """An experiment is exactly its group choices plus its own keys: nothing of it is lost
    (a missing `# @package _global_` would nest it under `experiment.`), nothing else moves."""
    recipe = OmegaConf.to_container(OmegaConf.load(CONF / "experiment" / f"{name}.yaml"))
    choices = [f"{k.removeprefix('override /')}={v}" for d in recipe.pop("defaults", [])
               for k, v in d.items()]
    cfg = compose([f"experiment={name}"])
    want = {**flat(dataclasses.asdict(compose(choices))), **flat(recipe)}
    assert flat(dataclasses.asdict(cfg)) == want
    assert recipe  # the comparison above saw keys of the recipe itself


def flat(tree: dict, prefix: str = "") -> dict:
    """{"a.b": leaf} for a nested dict (lists are leaves)."""
    out = {}
    for k, v in tree.items():
        key = f"{prefix}.{k}" if prefix else k
        out.update(flat(v, key) if isinstance(v, dict) else {key: v})
    return out


@pytest.mark.parametrize("sources,msg", [
    ("[]", "data.source=mixture needs data.sources"),
    ("[{shards_dir: a, paths: [x.txt]}]", "data.sources[0] must set exactly one of"),
    ("[{shards_dir: a, weight: 0}]", "data.sources[0].weight=0.0 must be > 0"),
    ("[{shards_dir: a}, {paths: [x.txt]}]", "mixes shards with on-the-fly sources")])
def test_bad_mixtures_are_one_line_errors(sources: str, msg: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(msg)):
        compose(["data=mixture", f"data.sources={sources}"])


def test_defaults() -> None:
    cfg = compose()
    assert (cfg.model.arch, cfg.data.source, cfg.parallel.zero_stage, cfg.precision.dtype) == \
        ("gpt", "embedded", 0, "fp32")
    assert cfg.model.vocab_size is None  # comes from the tokenizer


def test_experiment_overrides_groups() -> None:
    cfg = compose(["experiment=gpt2_124m_gpu"])
    assert (cfg.model.d_model, cfg.parallel.zero_stage, cfg.precision.dtype) == (768, 2, "bf16")


@pytest.mark.parametrize("override,needle", [
    ("model.arch=rnn", "model.arch='rnn' is not allowed; choose one of ['gpt', 'bert']"),
    ("parallel.zero_stage=4", "parallel.zero_stage=4 is not allowed"),
    ("model.n_heads=3", "divisible by model.n_heads=3"),
    ("data.seq_len=4096", "exceeds model.max_seq_len"),
    ("trainer.micro_batch_size=0", "trainer.micro_batch_size=0 must be > 0"),
    ("parallel.offload_params=true", "needs parallel.zero_stage=3"),
    ("data=files", "needs data.paths"),
    ("logging.wandb.mode=maybe", "logging.wandb.mode='maybe' is not allowed"),
])
def test_validation_errors(override: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=None) as e:
        compose([override])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_known_keys() -> None:
    assert "max_steps" in known_keys("trainer")
    assert "mode" in known_keys("logging.wandb")


@pytest.mark.parametrize("args,needle", [
    (["trainer.max_stepz=5"], "max_stepz"),
    (["model=gpt_huge"], "gpt_huge"),
    (["trainer.max_steps=abc"], "trainer.max_steps=abc"),
    (["model.arch=rnn"], "choose one of"),
])
def test_cli_bad_input_is_one_line(args: list[str], needle: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "lmforge.train", *args], capture_output=True,
                          text=True, cwd=REPO, timeout=120)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0] and lines[0].startswith("lmforge-train: config error")
