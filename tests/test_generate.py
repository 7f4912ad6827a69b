"""lmforge-generate: seeded sampling is reproducible, stops at --max-new-tokens, top-k 1 and a
tiny top-p are transformers' greedy decoding; the streamed text is the decoded tokens; a run,
its checkpoint and its export continue alike; BERT fills [MASK] with transformers' choices."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY, run_train
from hf_models import hf_model, tiny_hf
from lmforge.export import main as export_main
from lmforge.generate import main, pick, sample
from lmforge.weights import load_model

PROMPT = "the model reads a token"


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("hf"), "gpt2")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Random tied GPT-2 weights repeat one token greedily; random Llama ones do not."""
    return tiny_hf(tmp_path_factory.mktemp("hf"), "llama")


def generate(capsys: pytest.CaptureFixture, path: Path, *args: str) -> tuple[str, str]:
    assert main([str(path), *args]) == 0, capsys.readouterr().err
    out, err = capsys.readouterr()
    assert out.endswith("\n")
    return out[:-1], err


def test_seeded_sampling_is_reproducible(gpt2_dir: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--prompt", PROMPT, "--max-new-tokens", "24", "--temperature", "1.0"]
    first, _ = generate(capsys, gpt2_dir, *args, "--seed", "1")
    again, _ = generate(capsys, gpt2_dir, *args, "--seed", "1")
    other, _ = generate(capsys, gpt2_dir, *args, "--seed", "2")
    assert first == again and len(first) > 24
    assert other != first


def test_stops_at_max_new_tokens_and_streams_the_decoded_tokens(
        gpt2_dir: Path, capsys: pytest.CaptureFixture) -> None:
    model, tok, _ = load_model(str(gpt2_dir))
    ids = tok.encode(PROMPT).ids
    for n in (0, 1, 13):
        tokens = list(sample(model, ids, n, temperature=0.8, top_k=50, seed=7))
        assert len(tokens) == n
        out, err = generate(capsys, gpt2_dir, "--prompt", PROMPT, "--max-new-tokens", str(n),
                            "--temperature", "0.8", "--top-k", "50", "--seed", "7")
        assert out == tok.decode(tokens, skip_special_tokens=False)
        assert err.startswith(f"generated {n} tokens in ")


@pytest.mark.parametrize("how", [["--top-k", "1"], ["--temperature", "0"],
                                 ["--top-p", "1e-6"]])
def test_greedy_equals_transformers_greedy(llama_dir: Path, how: list[str],
                                           capsys: pytest.CaptureFixture) -> None:
    model, tok, _ = load_model(str(llama_dir))
    ids = tok.encode(PROMPT).ids
    hf = hf_model(llama_dir)
    hf.generation_config.eos_token_id = None  # greedy through an end of text, as lmforge is
    want = hf.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=20,
                       pad_token_id=0)[0, len(ids):].tolist()
    flags = {"--top-k": "top_k", "--temperature": "temperature", "--top-p": "top_p"}
    value = float(how[1]) if how[0] != "--top-k" else int(how[1])
    got = list(sample(model, ids, 20, seed=3, **{flags[how[0]]: value}))
    assert got == want
    assert len(set(want)) > 3  # a real continuation, not one token repeated
    out, _ = generate(capsys, llama_dir, "--prompt", PROMPT, "--max-new-tokens", "20",
                      "--seed", "5", *how)
    assert out == tok.decode(want, skip_special_tokens=False)


def test_top_k_and_top_p_keep_the_right_tokens_with_renormalised_odds() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    g = torch.Generator().manual_seed(0)
    # top_p=0.7: token 2 goes (0.5 + 0.3 ranked above it reach 0.7); 0 and 1 keep 5:3 odds.
    for kw in ({"top_p": 0.7}, {"top_k": 2}, {"top_k": 3, "top_p": 0.7}):
        draws = torch.tensor([pick(logits, 1.0, generator=g, **{"top_k": None, "top_p": None,
                                                                  **kw}) for _ in range(4000)])
        assert set(draws.tolist()) == {0, 1}
        assert (draws == 0).float().mean().item() == pytest.approx(0.625, abs=0.03)
    draws = [pick(logits, 1.0, None, 0.9, g) for _ in range(2000)]
    assert set(draws) == {0, 1, 2}


def test_bert_fills_masks_with_transformers_choices(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture) -> None:
    bert = tiny_hf(tmp_path, "bert")
    prompt = "the model [MASK] a token stream and [MASK] which word"
    out, _ = generate(capsys, bert, "--prompt", prompt, "--top-k", "3")
    filled, *lines = out.splitlines()
    _, tok, _ = load_model(str(bert))
    ids = tok.encode(prompt).ids  # [CLS] ... [SEP], as transformers' tokenizer frames it
    where = [i for i, t in enumerate(ids) if t == tok.token_to_id("[MASK]")]
    with torch.no_grad():
        probs = torch.softmax(hf_model(bert)(input_ids=torch.tensor([ids])).logits[0, where], -1)
    top = torch.topk(probs, 3, dim=-1)
    assert len(lines) == len(where) == 2
    for line, (k, (ps, idx)) in zip(lines, enumerate(zip(top.values, top.indices), 1)):
        words = line.split()
        assert words[:2] == ["[MASK]", f"{k}:"]
        assert words[2::2] == [tok.id_to_token(int(i)) for i in idx]
        assert [float(p) for p in words[3::2]] == pytest.approx(ps.tolist(), abs=1e-4)
    for pos, i in zip(where, top.indices[:, 0]):
        ids[pos] = int(i)
    assert filled == tok.decode(ids[1:-1]) and "[MASK]" not in filled


@pytest.mark.slow
def test_run_checkpoint_and_export_continue_alike(tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    run_train(run, *TINY, "trainer.max_steps=2", "model.n_layers=1")
    assert export_main([str(run), str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    # Sampled (seeded): another model's probabilities would draw other tokens.
    args = ["--prompt", "def main(", "--max-new-tokens", "24", "--seed", "3"]
    outs = [generate(capsys, p, *args)[0]
            for p in (run, run / "checkpoints" / "step_00000002", tmp_path / "hf")]
    assert outs[0] == outs[1] == outs[2] and len(set(outs[0])) > 5


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "lmforge.generate", str(tmp_path / "nope"),
                           "--prompt", "x"], capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"lmforge-generate: error: {tmp_path / 'nope'} does not exist; pass an HF model "
        "directory (config.json), an lmforge export, a run directory (config.yaml, "
        "checkpoints/latest), a checkpoint directory (*_model_states.pt) or a hub name"]
