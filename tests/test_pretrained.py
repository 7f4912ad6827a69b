"""model.init_from: HF GPT-2 / Llama / BERT directories (and lmforge exports, runs) become
lmforge models with transformers' logits; training from them logs transformers' first-step
loss and then lowers it, also under ZeRO-3; the architecture comes from the source, and a
command-line value contradicting it, or a source lmforge cannot use, is one line and exit 2."""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import save_file

from conftest import REPO, TINY, Payload, read_metrics, run_train
from hf_models import corpus_text, hf_model, tiny_hf
from lmforge.assembly import pretrained_loader
from lmforge.config import ConfigError, compose
from lmforge.consolidate import consolidate
from lmforge.data.loader import BlockLoader
from lmforge.data.sources import load_stream
from lmforge.distributed import DistInfo
from lmforge.engine import create_model
from lmforge.export import hf_config, safetensors_ready, to_hf_state_dict
from lmforge.models import build_model
from lmforge.pretrained import (ARCH_KEYS, effective, from_hf_config, read_tokenizer,
                                resolve_source)
from lmforge.weights import HFWeights, expected_shapes, load_weights
from test_models import BERT_TINY, GPT2_TINY, LLAMA_TINY, perturbed, preset

FAMILIES = ["gpt2", "llama", "bert"]
# The source brings its tokenizer: tokenizer.* settings would be refused as unused.
FAST = [a for a in TINY if not a.startswith("tokenizer.")]
CONFIGS = {"gpt2": GPT2_TINY, "llama": LLAMA_TINY, "bert": BERT_TINY,
           "bert_untied_no_types": dataclasses.replace(BERT_TINY, tie_embeddings=False,
                                                       type_vocab_size=0)}


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {f: tiny_hf(root, f) for f in FAMILIES}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_text(300, seed=9)))
    return path


@pytest.mark.parametrize("name", [*CONFIGS, "gpt2_124m", "llama_1b", "bert_base"])
def test_config_json_is_read_back_as_the_model_it_was_written_from(name: str) -> None:
    cfg = CONFIGS.get(name) or preset(name, 1000)
    back = from_hf_config(json.loads(json.dumps(hf_config(cfg))))
    want = {k: effective(cfg, k) for k in ARCH_KEYS}
    if cfg.arch == "bert":  # no token types are exported as one zero row: the same model
        want["type_vocab_size"] = max(cfg.type_vocab_size, 1)
    assert {k: effective(back, k) for k in ARCH_KEYS} == want


@pytest.mark.parametrize("name", CONFIGS)
def test_hf_weights_map_back_to_exactly_the_weights_exported(name: str, tmp_path: Path) -> None:
    cfg = CONFIGS[name]
    model = perturbed(cfg)
    save_file(safetensors_ready(to_hf_state_dict(cfg, model.state_dict())),
              str(tmp_path / "model.safetensors"))
    back = HFWeights(tmp_path, cfg, expected_shapes(cfg))
    named = dict(model.named_parameters())
    assert set(back) == set(named)
    for k, p in named.items():
        assert torch.equal(back[k], p.detach()), k


def first_batch(cfg, tok) -> dict[str, torch.Tensor]:
    """The first training batch of a run with data.shuffle_buffer=0, as its loader makes it."""
    d = cfg.data
    return next(iter(BlockLoader(load_stream(d, cfg.trainer.seed)[0], tok, cfg.model.arch, d,
                                 cfg.trainer.micro_batch_size, seed=cfg.trainer.seed)))


def hf_loss(hf: torch.nn.Module, batch: dict[str, torch.Tensor]) -> float:
    with torch.no_grad():
        kw = {"token_type_ids": batch["token_type_ids"]} if "token_type_ids" in batch else {}
        logits = hf(input_ids=batch["input_ids"], **kw).logits
    return F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(),
                           ignore_index=-100).item()


def train_args(src: Path, corpus: Path, *extra: str) -> list[str]:
    return [*FAST, f"model.init_from={src}", "data=files", f"data.paths=[{corpus}]",
            "data.shuffle_buffer=0", "trainer.log_every=1", *extra]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_training_starts_from_transformers_logits_and_lowers_the_loss(
        family: str, hf_dirs: dict[str, Path], corpus: Path, tmp_path: Path) -> None:
    src, hf = hf_dirs[family], hf_model(hf_dirs[family])
    args = train_args(src, corpus, "trainer.max_steps=5", "optim.lr=3e-3")
    if family == "bert":  # ~15% of tokens masked: a larger batch for a loss that shows a trend
        args += ["data.seq_len=32", "trainer.micro_batch_size=16"]
    cfg = compose(args)
    assert cfg.model.n_layers == 2 and cfg.model.d_model == 32  # from config.json
    assert cfg.tokenizer.path == str(src / "tokenizer.json")
    # The model as assembly.build creates it (stage 0): transformers' logits.
    model = create_model(lambda: build_model(cfg.model), {}, cfg.parallel, torch.device("cpu"),
                         pretrained_loader(cfg, DistInfo(0, 1, 0, torch.device("cpu"))))
    batch = first_batch(cfg, read_tokenizer(src / "tokenizer.json"))
    kw = {"token_type_ids": batch["token_type_ids"]} if family == "bert" else {}
    with torch.no_grad():
        ours, theirs = model.eval().logits(batch["input_ids"], **kw), \
            hf(input_ids=batch["input_ids"], **kw).logits
    assert theirs.abs().max() > 1 and (ours - theirs).abs().max() < 1e-5

    run = tmp_path / "run"
    run_train(run, *args)
    losses = [m["loss"] for m in read_metrics(run) if "loss" in m]
    assert len(losses) == 5
    assert abs(losses[0] - hf_loss(hf, batch)) < 1e-5  # step 1 is transformers' model
    assert losses[-1] < losses[0] - 0.1
    summary = json.loads((run / "summary.json").read_text())
    assert summary["init_from"] == {"path": str(src), "resolved": str(src), "kind": "hf",
                                    "family": family}
    assert (run / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    saved = yaml.safe_load((run / "config.yaml").read_text())["model"]
    assert saved["init_from"] == str(src) and saved["n_layers"] == 2


@pytest.mark.slow
def test_zero3_from_init_from_holds_exactly_the_source_weights(
        hf_dirs: dict[str, Path], corpus: Path, tmp_path: Path) -> None:
    src, run = hf_dirs["gpt2"], tmp_path / "run"
    # lr 1e-30: the one step moves no fp32 weight, so the checkpoint holds the loaded ones.
    args = train_args(src, corpus, "parallel=zero3", "trainer.max_steps=1", "optim.lr=1e-30")
    run_train(run, *args)
    sd = consolidate(run / "checkpoints" / "step_00000001")
    source = load_weights(resolve_source(str(src)))
    assert set(source) <= set(sd)
    for k in source:
        assert torch.equal(sd[k], source[k]), k
    batch = first_batch(compose(args), read_tokenizer(src / "tokenizer.json"))
    assert abs(read_metrics(run)[0]["loss"] - hf_loss(hf_model(src), batch)) < 1e-5


@pytest.mark.slow
def test_a_run_and_its_export_are_sources_too(tmp_path: Path, capsys) -> None:
    from lmforge.export import main as export_main

    run = tmp_path / "run"
    run_train(run, *TINY, "trainer.max_steps=1", "model.n_layers=1", "model.d_model=64")
    assert export_main([str(run), str(tmp_path / "hf")]) == 0
    ckpt = consolidate(run / "checkpoints" / "step_00000001")
    for path in (run, run / "checkpoints" / "step_00000001", tmp_path / "hf"):
        cfg = compose([*FAST, f"model.init_from={path}"])
        assert (cfg.model.n_layers, cfg.model.d_model) == (1, 64)
        weights = load_weights(resolve_source(str(path)))
        assert set(weights) <= set(ckpt)
        for k, v in weights.items():
            assert torch.equal(v, ckpt[k]), (path, k)


# ------------------------------------------------------- the architecture is the source's

def test_command_line_values_must_agree_with_the_source(hf_dirs: dict[str, Path]) -> None:
    src = hf_dirs["llama"]
    ok = compose([*FAST, f"model.init_from={src}", "model.n_layers=2", "model.d_ff=48",
                  "model.dropout=0.1"])
    assert (ok.model.n_kv_heads, ok.model.norm, ok.model.rope_theta) == (2, "rmsnorm", 500.0)
    assert ok.model.dropout == 0.1  # not architecture: stays the user's
    with pytest.raises(ConfigError, match=rf"^model.n_layers=3 contradicts model.init_from="
                       rf"{src}, whose model has n_layers=2; drop it"):
        compose([*FAST, f"model.init_from={src}", "model.n_layers=3"])
    with pytest.raises(ConfigError, match=r"^model=gpt_tiny \(its n_layers=4\) contradicts"):
        compose([*FAST, "model=gpt_tiny", f"model.init_from={src}"])
    with pytest.raises(ConfigError, match="^tokenizer.path=/x.json is set, but model.init_from "
                       "brings its own tokenizer"):
        compose([*FAST, f"model.init_from={src}", "tokenizer.path=/x.json"])


# The hub's openai-community/gpt2 config.json: written by an old transformers, it leaves out
# keys at their defaults (tie_word_embeddings, n_inner).
HUB_GPT2 = {"activation_function": "gelu_new", "architectures": ["GPT2LMHeadModel"],
            "attn_pdrop": 0.1, "bos_token_id": 50256, "embd_pdrop": 0.1, "eos_token_id": 50256,
            "initializer_range": 0.02, "layer_norm_epsilon": 1e-05, "model_type": "gpt2",
            "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12, "n_positions": 1024,
            "resid_pdrop": 0.1, "summary_activation": None, "summary_first_dropout": 0.1,
            "summary_proj_to_labels": True, "summary_type": "cls_index",
            "summary_use_proj": True, "vocab_size": 50257,
            "task_specific_params": {"text-generation": {"do_sample": True, "max_length": 50}}}


def test_the_hubs_gpt2_config_is_gpt2_124m(hf_dirs: dict[str, Path], tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps(HUB_GPT2))
    (tmp_path / "model.safetensors").write_bytes(b"")  # weights are not read here
    shutil.copy(hf_dirs["gpt2"] / "tokenizer.json", tmp_path)
    cfg = compose([*FAST, "model=gpt2_124m", f"model.init_from={tmp_path}"])
    with torch.device("meta"):
        assert build_model(cfg.model).num_params() == 124_439_808
    assert cfg.model.tie_embeddings and cfg.model.d_ff is None and cfg.model.dropout == 0.0
    with pytest.raises(ConfigError, match=r"^model=gpt_tiny \(its n_layers=4\)"):
        compose([*FAST, "model=gpt_tiny", f"model.init_from={tmp_path}"])


def test_a_contradicting_override_stops_training_in_one_line(hf_dirs: dict[str, Path],
                                                             tmp_path: Path) -> None:
    proc = run_train(tmp_path / "run", *FAST, f"model.init_from={hf_dirs['gpt2']}",
                     "model.n_layers=3", check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"lmforge-train: config error: model.n_layers=3 contradicts model.init_from="
        f"{hf_dirs['gpt2']}, whose model has n_layers=2; drop it (model.init_from sets the "
        "architecture)"]


# ------------------------------------------------------------------------------ bad input



def spoil(src: Path, tmp_path: Path, case: str) -> Path:
    """A copy of an HF directory made bad in one way."""
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    config = json.loads((bad / "config.json").read_text())
    if case == "family":
        config["model_type"] = "t5"
    elif case == "shapes":
        config["n_embd"] = 48
    elif case == "scaled_rope":
        config["rope_parameters"] = {"rope_type": "llama3", "rope_theta": 5e5}
    elif case == "no_tokenizer":
        (bad / "tokenizer.json").unlink()
    elif case == "no_weights":
        (bad / "model.safetensors").unlink()
    elif case == "pickle":
        (bad / "model.safetensors").unlink()
        torch.save({"transformer.wte.weight": Payload(tmp_path / "pwned")},
                   bad / "pytorch_model.bin")
    (bad / "config.json").write_text(json.dumps(config))
    return bad


@pytest.mark.parametrize("case, family, message", [
    ("missing", "gpt2", "does not exist; pass an HF model directory (config.json), an lmforge "
     "export, a run directory (config.yaml, checkpoints/latest), a checkpoint directory "
     "(*_model_states.pt) or a hub name"),
    ("empty_dir", "gpt2", "is none of an HF model directory"),
    ("family", "gpt2", "model_type='t5' is not a model family lmforge builds; supported: gpt2 "
     "(GPT2LMHeadModel), llama (LlamaForCausalLM), bert (BertForMaskedLM)"),
    ("scaled_rope", "llama", "rope type 'llama3' (scaled RoPE) is not part of the llama lmforge "
     "builds"),
    ("shapes", "gpt2", "do not match its config.json: tok_emb.weight (from "
     "transformer.wte.weight) has shape [300, 32], the config needs [300, 48]"),
    ("no_tokenizer", "gpt2", "has no tokenizer.json"),
    ("no_weights", "gpt2", "has a config.json but no weights"),
    ("pickle", "gpt2", "which is neither a tensor nor an allow-listed"),
])
def test_a_source_lmforge_cannot_use_is_one_line(case: str, family: str, message: str,
                                                 hf_dirs: dict[str, Path], tmp_path: Path,
                                                 capsys) -> None:
    from lmforge.eval import main as eval_main
    from lmforge.generate import main as generate_main

    path = tmp_path / "nothing"
    if case == "empty_dir":
        path.mkdir()
    elif case != "missing":
        path = spoil(hf_dirs[family], tmp_path, case)
    with pytest.raises(ConfigError) as e:
        load_weights(resolve_source(str(path)))
    assert message in str(e.value) and "\n" not in str(e.value)
    for cli, name in [(generate_main, "generate"), (eval_main, "eval")]:
        assert cli([str(path), *(["--prompt", "x"] if name == "generate" else [])]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith(f"lmforge-{name}: error: ")
        assert message in err
    assert not (tmp_path / "pwned").exists()


def test_a_hub_name_the_hub_cannot_give_is_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    proc = run_train(tmp_path / "run", *FAST, "model.init_from=gpt2", check=False, env=env)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "lmforge-train: config error: gpt2 is not a local path, and the hub did not give it (")
    proc = subprocess.run([sys.executable, "-m", "lmforge.generate", "gpt2", "--prompt", "x"],
                          capture_output=True, text=True, cwd=REPO, env=env)
    assert proc.returncode == 2 and "the hub did not give it" in proc.stderr
