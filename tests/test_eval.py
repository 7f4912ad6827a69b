"""lmforge-eval: an export's loss on a text is transformers' mean loss on the same blocks; a
run's default is its validation split as training reads it; bits per byte is the NLL over the
bytes the evaluated tokens encode; 2 ranks give the 1-rank sums; BERT's seeded masks give the
same loss on every run; bad input is one line and exit 2."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, TINY, random_corpus, run_train
from hf_models import corpus_text, hf_model, tiny_hf
from lmforge.config import DataConfig
from lmforge.data.loader import BlockLoader
from lmforge.data.packing import bert_batch_seeded
from lmforge.data.sources import load_stream
from lmforge.data.tokenizer import train_tokenizer
from lmforge.eval import main, token_bytes
from lmforge.export import main as export_main
from lmforge.weights import load_model

SEQ = 64


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A gpt_tiny run (2 steps) on a local corpus with 20% held out, and its export."""
    root = tmp_path_factory.mktemp("eval")
    corpus = random_corpus(root / "corpus.jsonl", 150, seed=1)
    run = root / "run"
    run_train(run, *TINY, "data=files", f"data.paths=[{corpus}]", "data.val_percent=20",
              "trainer.max_steps=2", "model.n_layers=2")
    assert export_main([str(run), str(root / "hf")]) == 0
    texts = [random_corpus(root / f"text{i}.jsonl", 30, seed=5 + i) for i in range(2)]
    return SimpleNamespace(run=run, export=root / "hf", texts=texts, root=root)


def evaluate(capsys: pytest.CaptureFixture, *argv: object) -> dict:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code == 0, err
    return json.loads(out.splitlines()[-1])


def gpt_blocks(tok, texts: list[str], eos: int) -> torch.Tensor:
    """Documents each followed by end-of-text, cut into blocks of SEQ+1 (the tail dropped)."""
    stream = [t for text in texts for t in [*tok(text, add_special_tokens=False)["input_ids"],
                                             eos]]
    n = len(stream) // (SEQ + 1)
    return torch.tensor(stream[:n * (SEQ + 1)]).view(n, SEQ + 1)


def docs(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_hf(tmp_path_factory.mktemp("hf"), "gpt2")


@pytest.mark.slow
def test_export_loss_is_transformers_loss_on_the_same_blocks(
        trained: SimpleNamespace, capsys: pytest.CaptureFixture) -> None:
    transformers = pytest.importorskip("transformers")
    text = trained.texts[0]
    got = evaluate(capsys, trained.export, "data=files", f"data.paths=[{text}]",
                   f"data.seq_len={SEQ}")
    tok = transformers.AutoTokenizer.from_pretrained(trained.export)
    x = gpt_blocks(tok, docs(text), tok.eos_token_id)
    with torch.no_grad():
        logits = hf_model(trained.export)(input_ids=x[:, :-1]).logits
    want = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item()
    assert got["split"] == "all" and got["tokens"] == x[:, 1:].numel() > 10 * SEQ
    assert abs(got["loss"] - want) < 1e-4 and got["loss"] > 3  # a barely trained model
    assert got["ppl"] == pytest.approx(math.exp(got["loss"]), rel=1e-12)
    # The run and its checkpoint are the same model.
    for path in (trained.run, trained.run / "checkpoints" / "step_00000002"):
        same = evaluate(capsys, path, "data=files", f"data.paths=[{text}]", f"data.seq_len={SEQ}")
        assert abs(same["loss"] - got["loss"]) < 1e-6 and same["tokens"] == got["tokens"]

    # bits per byte by hand: these texts are ASCII, so each token's text is one decode.
    eos = tok.eos_token_id
    n_bytes = sum(len(tok.decode([t])) for t in x[:, 1:].flatten().tolist() if t != eos)
    assert got["bytes"] == n_bytes
    assert got["bits_per_byte"] == pytest.approx(
        got["loss"] * got["tokens"] / math.log(2) / n_bytes, rel=1e-12)


def test_a_llama_tokenizer_ending_documents_with_s_evaluates_as_transformers(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Pretrained Llama tokenizers end documents with </s>, not <|endoftext|>."""
    transformers = pytest.importorskip("transformers")
    llama = tiny_hf(tmp_path, "llama")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        path = llama / name
        path.write_text(path.read_text().replace("<|endoftext|>", "</s>"))
    text = random_corpus(tmp_path / "text.jsonl", 20, seed=2)
    got = evaluate(capsys, llama, "data=files", f"data.paths=[{text}]", f"data.seq_len={SEQ}")
    tok = transformers.AutoTokenizer.from_pretrained(llama)
    assert tok.convert_tokens_to_ids("</s>") == 0
    x = gpt_blocks(tok, docs(text), 0)
    with torch.no_grad():
        logits = hf_model(llama)(input_ids=x[:, :-1]).logits
    want = F.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten()).item()
    assert got["tokens"] == x[:, 1:].numel() and abs(got["loss"] - want) < 1e-4


def test_token_bytes_are_the_utf8_bytes_of_the_text(gpt2_dir: Path, tmp_path: Path) -> None:
    _, tok, _ = load_model(str(gpt2_dir))
    text = "def f(x):\n    return 'héllo wörld — 数据 🙂'  # ünïcode\t\n"
    ids = tok.encode(text, add_special_tokens=False).ids
    assert len(ids) < len(text.encode())  # merges happened: tokens span several bytes
    assert int(token_bytes(tok)[ids].sum()) == len(text.encode())
    assert token_bytes(tok)[tok.token_to_id("<|endoftext|>")] == 0
    _, wp, _ = load_model(str(tiny_hf(tmp_path, "bert")))
    table = token_bytes(wp)
    ids = wp.encode("the model reads", add_special_tokens=False).ids
    assert int(table[ids].sum()) == len("themodelreads")  # WordPiece: spaces are not tokens
    assert table[wp.token_to_id("[MASK]")] == 0


@pytest.mark.slow
def test_a_run_is_evaluated_on_its_validation_split_as_training_reads_it(
        trained: SimpleNamespace, capsys: pytest.CaptureFixture) -> None:
    got = evaluate(capsys, trained.run)
    model, tok, src = load_model(str(trained.run))
    data = DataConfig(source="files", paths=[str(trained.root / "corpus.jsonl")],
                      val_percent=20.0, seq_len=SEQ)
    val = BlockLoader(load_stream(data)[0], tok, "gpt", data, 1, split="validation")
    with torch.no_grad():
        losses = [model(b).item() for b in val]
    assert got["split"] == "validation" and got["seq_len"] == SEQ
    assert got["tokens"] == len(losses) * SEQ and len(losses) >= 5
    assert abs(got["loss"] - sum(losses) / len(losses)) < 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.multiproc
def test_two_ranks_give_the_one_rank_sums_per_source(trained: SimpleNamespace,
                                                     capsys: pytest.CaptureFixture) -> None:
    args = [str(trained.export), "data=mixture",
            f"data.sources=[{{path: {trained.texts[0]}}}, {{path: {trained.texts[1]}}}]",
            f"data.seq_len={SEQ}", "trainer.micro_batch_size=3"]
    one = evaluate(capsys, *args)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                           "2", "--master_port", str(free_port()), "-m", "lmforge.eval", *args],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(proc.stdout.splitlines()[-1])
    assert sum(line.startswith("{") for line in proc.stdout.splitlines()) == 1  # rank 0 alone
    assert list(one["sources"]) == [str(t) for t in trained.texts]
    for a, b in [(one, two), *zip(one["sources"].values(), two["sources"].values())]:
        assert (a["tokens"], a["bytes"]) == (b["tokens"], b["bytes"])
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    parts = list(one["sources"].values())
    assert one["tokens"] == sum(p["tokens"] for p in parts)
    assert one["loss"] == pytest.approx(sum(p["loss"] * p["tokens"] for p in parts)
                                        / one["tokens"], rel=1e-12)
    # Each source alone is its entry of the mixture.
    alone = evaluate(capsys, trained.export, "data=files", f"data.paths=[{trained.texts[1]}]",
                     f"data.seq_len={SEQ}")
    assert alone["loss"] == pytest.approx(parts[1]["loss"], rel=1e-6)


@pytest.mark.slow
def test_shards_are_evaluated_by_their_validation_split(gpt2_dir: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture) -> None:
    corpus = random_corpus(tmp_path / "corpus.jsonl", 200, seed=4)
    shards = tmp_path / "shards"
    subprocess.run([sys.executable, "-m", "lmforge.prepare", "shards", "--out", str(shards),
                    "--tokenizer", str(gpt2_dir / "tokenizer.json"), "data=files",
                    f"data.paths=[{corpus}]", "data.val_percent=20"],
                   cwd=REPO, check=True, capture_output=True)
    got = evaluate(capsys, gpt2_dir, "data=shards", f"data.shards_dir={shards}",
                   f"data.seq_len={SEQ}")
    # The same documents held out by content hash, packed the same way, read on the fly.
    same = evaluate(capsys, gpt2_dir, "data=files", f"data.paths=[{corpus}]",
                    "data.val_percent=20", f"data.seq_len={SEQ}")
    held_out = json.loads((shards / "manifest.json").read_text())["splits"]["validation"]
    assert got["split"] == same["split"] == "validation"
    assert got["tokens"] == held_out["tokens"] // (SEQ + 1) * SEQ == same["tokens"] > 0
    assert got["loss"] == pytest.approx(same["loss"], rel=1e-6)
    other = tiny_hf(tmp_path, "llama")
    train_tokenizer(corpus_text(200), "bpe", 280).save(str(other / "tokenizer.json"))
    assert main([str(other), "data=shards", f"data.shards_dir={shards}"]) == 2
    assert "were made with another tokenizer" in capsys.readouterr().err


def test_bert_masks_are_seeded_so_runs_agree_and_match_transformers(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bert = tiny_hf(tmp_path, "bert")
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in corpus_text(20, seed=3)))
    args = [bert, "data=files", f"data.paths=[{text}]", "data.seq_len=32"]
    first, again = evaluate(capsys, *args), evaluate(capsys, *args)
    other = evaluate(capsys, *args, "trainer.seed=7")
    assert first == again and first["tokens"] > 30
    assert other["loss"] != first["loss"]  # the masks come from the seed

    _, tok, _ = load_model(str(bert))
    ids = [i for t in corpus_text(20, seed=3) for i in
           [*tok.encode(t, add_special_tokens=False).ids, tok.token_to_id("[SEP]")]]
    s = {k: tok.token_to_id(f"[{k.upper()}]") for k in ("cls", "sep", "pad", "mask")}
    blocks = [[s["cls"], *ids[i:i + 30], s["sep"]] for i in range(0, len(ids) - 29, 30)]
    import numpy as np

    batch = bert_batch_seeded([np.array(b) for b in blocks],
                              [(1337, j) for j in range(len(blocks))], s["mask"],
                              tok.get_vocab_size(), [s["cls"], s["sep"], s["pad"]], 0.15)
    with torch.no_grad():
        logits = hf_model(bert)(input_ids=batch["input_ids"]).logits
    want = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert first["tokens"] == int((batch["labels"] != -100).sum())
    assert abs(first["loss"] - want.item()) < 1e-4


@pytest.mark.parametrize("args, message", [
    (["model.n_layers=3"], "lmforge-eval takes data.* and trainer.eval_batches, "
     "trainer.micro_batch_size, trainer.seed overrides, not 'model.n_layers=3'"),
    (["data=files", "data.paths=[/nonexistent/*.txt]"], "matches no file"),
    (["data.seq_len=4096"], "data.seq_len=4096 exceeds model.max_seq_len=128"),
])
def test_bad_input_is_one_line_and_exit_2(gpt2_dir: Path, args: list[str], message: str,
                                          capsys: pytest.CaptureFixture) -> None:
    assert main([str(gpt2_dir), *args]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1
    assert err.startswith("lmforge-eval: error: ") and message in err
