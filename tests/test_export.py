"""lmforge-export: ZeRO checkpoints of GPT-2, Llama and BERT runs become HF directories whose
Auto* models give lmforge's logits and whose tokenizer encodes as the run's; bad input is
one line and exit code 2; a checkpoint is never unpickled beyond tensors."""
from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open
from tokenizers import Tokenizer, models

from conftest import REPO, TINY, Payload, run_distributed, train_runs
from lmforge.config import ModelConfig
from lmforge.consolidate import consolidate, resolve, run_model_config
from lmforge.export import TIED_COPIES, main
from lmforge.models import build_model

SAMPLE = "def main(argv):\n    return sorted(set(argv))  # héllo, wörld <|endoftext|>"


def export_ok(src: Path, out: Path, capsys: pytest.CaptureFixture) -> None:
    code = main([str(src), str(out)])
    assert code == 0, capsys.readouterr().err


ROUND_TRIPS = [("gpt_tiny", "zero0"), ("gpt_tiny", "zero1"), ("gpt_tiny", "zero3"),
               ("llama_tiny", "zero1"), ("llama_tiny", "zero3"), ("bert_tiny", "zero1"),
               ("bert_tiny", "zero3")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 3-step run of each (model, parallel) in root/model-parallel, trained one after
    another in one process (what is tested here is the export of their checkpoints)."""
    pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("trained")
    run_distributed(train_runs, 1, [(root / f"{m}-{p}", [
        *TINY, f"model={m}", f"parallel={p}", "trainer.max_steps=3"]) for m, p in ROUND_TRIPS])
    return root


@pytest.mark.slow
@pytest.mark.parametrize("model, parallel", ROUND_TRIPS)
def test_round_trip_through_transformers(trained: Path, tmp_path: Path, model: str,
                                         parallel: str, capsys: pytest.CaptureFixture) -> None:
    transformers = pytest.importorskip("transformers")
    run, out = trained / f"{model}-{parallel}", tmp_path / "hf"
    # Both forms of the input: a run directory and one of its checkpoints.
    src = run if parallel != "zero3" else run / "checkpoints" / "step_00000003"
    export_ok(src, out, capsys)

    ref_tok = Tokenizer.from_file(str(run / "tokenizer.json"))
    _, ckpt = resolve(run)
    cfg = run_model_config(run, ckpt, ref_tok.get_vocab_size())
    sd = consolidate(ckpt)
    if parallel == "zero1":  # ZeRO-1 also keeps whole fp32 weights: the merge must give them
        module = torch.load(ckpt / "mp_rank_00_model_states.pt", weights_only=True)["module"]
        assert all(torch.equal(sd[k], v) for k, v in module.items()) and sd.keys() == module.keys()
    ours = build_model(cfg)
    ours.load_state_dict(sd, strict=True)
    ours.eval()
    # The trained weights: each tensor moved from the seed's init by about the summed
    # learning rate of 3 Adam steps (1.2e-3), so neither the init nor another model's.
    torch.manual_seed(yaml.safe_load((run / "config.yaml").read_text())["trainer"]["seed"])
    init = build_model(cfg).state_dict()
    for k, v in ours.state_dict().items():
        assert 1e-4 < (v - init[k]).abs().max() < 1e-2, k

    auto = (transformers.AutoModelForMaskedLM if cfg.arch == "bert"
            else transformers.AutoModelForCausalLM)
    hf, info = auto.from_pretrained(out, output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert hf.dtype == torch.float32
    ids = torch.tensor([ref_tok.encode(SAMPLE).ids[:48]])
    with torch.no_grad():
        expected, got = ours.logits(ids), hf(input_ids=ids).logits
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        stored = set(f.keys())
    if cfg.tie_embeddings:  # stored once, tied again by from_pretrained
        assert not stored & set(TIED_COPIES)
        assert hf.get_output_embeddings().weight.data_ptr() == \
            hf.get_input_embeddings().weight.data_ptr()
    else:
        assert "lm_head.weight" in stored

    tok = transformers.AutoTokenizer.from_pretrained(out)
    assert tok(SAMPLE)["input_ids"] == ref_tok.encode(SAMPLE).ids
    assert tok.decode(ids[0]) == ref_tok.decode(ids[0].tolist(), skip_special_tokens=False)
    if cfg.arch == "bert":
        assert [tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token] == \
            ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        assert hf.config.pad_token_id == tok.pad_token_id == ref_tok.token_to_id("[PAD]")
    else:
        assert tok.eos_token == tok.bos_token == "<|endoftext|>"
        assert hf.config.eos_token_id == hf.config.bos_token_id == tok.eos_token_id \
            == ref_tok.token_to_id("<|endoftext|>")


# ------------------------------------------------------------------------- bad input

GPT = {"arch": "gpt", "n_layers": 1, "n_heads": 2, "d_model": 8, "max_seq_len": 16}


def fake_run(root: Path, model: dict, checkpoint: bool = True) -> Path:
    """A run directory with config.yaml, a tokenizer and (a placeholder) checkpoint."""
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"model": model, "trainer": {"seed": 1}}))
    vocab = {"<|endoftext|>": 0, "a": 1, "b": 2}
    Tokenizer(models.WordLevel(vocab, unk_token="a")).save(str(root / "tokenizer.json"))
    if checkpoint:
        ckpt = root / "checkpoints" / "step_00000001"
        ckpt.mkdir(parents=True)
        (ckpt / "mp_rank_00_model_states.pt").write_bytes(b"")
        (root / "checkpoints" / "latest").write_text("step_00000001\n")
    return root




def poisoned_run(tmp_path: Path, sharded: bool) -> Path:
    """Stage 0 is read by lmforge; with an *_optim_states.pt by DeepSpeed's zero_to_fp32,
    which asks torch.load for weights_only=False."""
    ckpt = fake_run(tmp_path / "run", GPT) / "checkpoints" / "step_00000001"
    names = ["mp_rank_00_model_states.pt"]
    names += ["zero_pp_rank_0_mp_rank_00_optim_states.pt"] if sharded else []
    for name in names:
        torch.save({"module": Payload(tmp_path / "pwned")}, ckpt / name)
    return ckpt.parent.parent


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"),
    ("no_checkpoint", "has no checkpoint yet"),
    ("not_a_run", "is neither a run directory"),
    ("no_config", "config.yaml is missing"),
    ("dangling_latest", "names 'step_00000009', which is not in"),
    ("not_hf", "cannot export to HF gpt2: it needs model.norm=layernorm"),
    ("stale_config", "has model.n_layers=1 but step_00000001 was trained with 2"),
    ("other_weights", "the checkpoint misses ['blocks.0.attn.proj.bias'"),
    ("poisoned_stage0", "io.open, which is neither a tensor nor an allow-listed"),
    ("poisoned_zero", "io.open, which is neither a tensor nor an allow-listed"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, case: str, message: str,
                                          capsys: pytest.CaptureFixture) -> None:
    src = tmp_path / "run"
    if case == "no_checkpoint":
        fake_run(src, GPT, checkpoint=False)
    elif case == "not_a_run":
        src.mkdir()
    elif case == "no_config":
        (fake_run(src, GPT) / "config.yaml").unlink()
        src = src / "checkpoints" / "step_00000001"
    elif case == "dangling_latest":
        (fake_run(src, GPT) / "checkpoints" / "latest").write_text("step_00000009\n")
    elif case == "not_hf":
        fake_run(src, {**GPT, "norm": "rmsnorm"})
    elif case in ("stale_config", "other_weights"):
        ckpt = fake_run(src, GPT) / "checkpoints" / "step_00000001"
        trained = {**dataclasses.asdict(ModelConfig(**GPT, vocab_size=3)), "n_layers": 2}
        if case == "stale_config":
            torch.save({"step": 1, "model": trained}, ckpt / "trainer_rank0.pt")
        else:
            torch.save({"module": {"tok_emb.weight": torch.zeros(3, 8)}},
                       ckpt / "mp_rank_00_model_states.pt")
    elif case.startswith("poisoned"):
        poisoned_run(tmp_path, sharded=case == "poisoned_zero")
    assert main([str(src), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("lmforge-export: error: ")
    assert message in err
    assert not (tmp_path / "out").exists() and not (tmp_path / "pwned").exists()


def test_the_poisoned_checkpoint_would_run_code_if_unpickled(tmp_path: Path) -> None:
    """The payload above is live: a plain torch.load runs it (so its refusal means something)."""
    run = poisoned_run(tmp_path, sharded=False)
    torch.load(run / "checkpoints" / "step_00000001" / "mp_rank_00_model_states.pt",
               weights_only=False)
    assert (tmp_path / "pwned").exists()


def test_console_script_exit_code(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lmforge.export", str(tmp_path / "nope"),
                           str(tmp_path / "out")], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == f"lmforge-export: error: {tmp_path / 'nope'} does not exist"
