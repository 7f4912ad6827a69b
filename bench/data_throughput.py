"""Can one data process keep a GPU fed? Tokens/s delivered by the tokenizer alone, the
on-the-fly loader and the shard loader (one process each, measured here), each divided by
what one H100 consumes training gpt2_124m at 50% MFU; then the time and peak RSS of
preparing a corpus of --prep-gb GB into shards.
Usage: .venv/bin/python bench/data_throughput.py [--quick] [--prep-gb 1] [--seconds 10]"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# One process, one thread: the per-process figure the issue asks for.
os.environ.update(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
                  RAYON_NUM_THREADS="1")

REPO = Path(__file__).resolve().parents[1]
SEQ_LEN, MB, VOCAB = 1024, 8, 8192
H100_BF16_TFLOPS, MFU = 989.0, 0.5
# --quick: the same code path, briefly: half-second rates, a tokenizer trained on 2 M chars,
# a 1 MB corpus to prepare. Its numbers mean nothing.
QUICK = {"seconds": 0.5, "prep_gb": 1 / 1024, "train_max_chars": 2_000_000}
QUICK_NOTE = ("QUICK MODE (--quick): short measurements on a tiny corpus; the numbers below are "
              "meaningless, this run only shows that the benchmark works")


def gpu_demand() -> float:
    """Tokens/s one H100 trains gpt2_124m (seq 1024, GPT-2 vocab) at 50% MFU."""
    from lmforge.config import compose
    from lmforge.metrics import flops_per_token

    cfg = compose(["model=gpt2_124m", "model.vocab_size=50257", f"data.seq_len={SEQ_LEN}"])
    return H100_BF16_TFLOPS * 1e12 * MFU / flops_per_token(cfg.model, SEQ_LEN)


def rate(batches, seconds: float) -> float:
    """Tokens/s of `batches` (an iterator of GPT micro-batches) over about `seconds`."""
    next(batches)  # warm-up: first file opened, first permutation drawn
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += next(batches)["input_ids"].numel()
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true",
                    help=f"checks that the benchmark runs ({QUICK}; numbers meaningless; "
                         "results go to a temporary directory, not bench/results/)")
    ap.add_argument("--prep-gb", type=float, help="default 1 (--quick: QUICK)")
    ap.add_argument("--seconds", type=float, help="default 10 (--quick: QUICK)")
    ap.add_argument("--out", help="the JSON results (default: bench/results/"
                                  "data_throughput.json; with --quick, a temporary file)")
    a = ap.parse_args()
    defaults = QUICK if a.quick else {"seconds": 10.0, "prep_gb": 1.0, "train_max_chars": None}
    seconds = defaults["seconds"] if a.seconds is None else a.seconds
    prep_gb = defaults["prep_gb"] if a.prep_gb is None else a.prep_gb
    tok_chars = ([f"tokenizer.train_max_chars={defaults['train_max_chars']}"]
                 if defaults["train_max_chars"] else [])

    from lmforge.config import DataConfig
    from lmforge.data.loader import BlockLoader
    from lmforge.data.shards import ShardLoader, ShardSet
    from lmforge.data.sources import embedded_corpus_files, iter_documents, load_stream
    from lmforge.data.tokenizer import load_tokenizer, special_ids

    if a.quick:
        print(QUICK_NOTE, flush=True)
    demand = gpu_demand()
    print(f"one H100, gpt2_124m at 50% MFU of {H100_BF16_TFLOPS:.0f} TFLOP/s: "
          f"{demand / 1e6:.3f} M tokens/s", flush=True)
    results: dict = {"h100_demand_tokens_per_s": demand, "seq_len": SEQ_LEN,
                     "micro_batch": MB, "vocab": VOCAB}
    prep = [sys.executable, "-m", "lmforge.prepare"]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([*prep, "shards", "--out", str(tmp / "shards"), "--threads", "1",
                        f"tokenizer.vocab_size={VOCAB}", *tok_chars], cwd=REPO, check=True,
                       capture_output=True)
        tok = load_tokenizer(tmp / "shards/tokenizer.json")

        cfg = DataConfig(seq_len=SEQ_LEN)
        stream, _ = load_stream(cfg)
        # Every document once (repeating a few would flatter the tokenizer's word cache), in
        # chunks as the loader encodes them, with the call the loader uses.
        docs = [t for _, t in iter_documents(stream, "train", 2.0)]
        n_tok, t0 = 0, time.perf_counter()
        for k in range(0, len(docs), 32):
            n_tok += sum(len(e.ids) for e in tok.encode_batch_fast(docs[k:k + 32],
                                                                   add_special_tokens=False))
            if time.perf_counter() - t0 > seconds:
                break
        results["tokenizer_encode"] = n_tok / (time.perf_counter() - t0)

        results["on_the_fly_loader"] = rate(iter(BlockLoader(stream, tok, "gpt", cfg, MB)),
                                            seconds)
        shards = ShardLoader(ShardSet(tmp / "shards", "train"), "gpt", special_ids(tok, "bpe"),
                             SEQ_LEN, MB)
        results["shard_loader"] = rate(iter(shards), seconds)
        for key in ("tokenizer_encode", "on_the_fly_loader", "shard_loader"):
            print(f"{key:>18}: {results[key] / 1e6:8.3f} M tokens/s = "
                  f"{results[key] / demand:7.2f}x one H100" +
                  ("   (quick: meaningless)" if a.quick else ""), flush=True)

        if prep_gb > 0:
            # A corpus of --prep-gb GB: the embedded corpus's files, concatenated over and over
            # (the last part stops once the corpus is big enough).
            corpus, target = tmp / "corpus", int(prep_gb * 2**30)
            corpus.mkdir()
            files, size, k = embedded_corpus_files(), 0, 0
            while size < target:
                f = corpus / f"part{k:04d}.txt"
                with open(f, "wb") as out:
                    for src in files:
                        out.write(src.read_bytes())
                        if size + out.tell() >= target:
                            break
                size, k = size + f.stat().st_size, k + 1
            t0 = time.perf_counter()
            subprocess.run([*prep, "shards", "--out", str(tmp / "big"), "--tokenizer",
                                   str(tmp / "shards/tokenizer.json"), "data=files",
                                   f"data.paths=[{corpus}/*.txt]"], cwd=REPO, check=True,
                                  capture_output=True, text=True,
                                  env={**os.environ, "RAYON_NUM_THREADS": str(os.cpu_count())})
            wall = time.perf_counter() - t0
            rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
            manifest = json.loads((tmp / "big/manifest.json").read_text())
            tokens = sum(s["tokens"] for s in manifest["splits"].values())
            results["prepare"] = {"corpus_bytes": size, "tokens": tokens, "wall_s": wall,
                                  "tokens_per_s": tokens / wall, "peak_rss_gb": rss,
                                  "threads": os.cpu_count()}
            print(f"prepare {size / 2**30:.3g} GB -> {tokens / 1e6:.3g} M tokens in {wall:.0f}s "
                  f"({tokens / wall / 1e6:.2f} M tokens/s, {os.cpu_count()} threads), "
                  f"peak RSS {rss:.2f} GB (largest child process)" +
                  ("   (quick: meaningless)" if a.quick else ""), flush=True)
        # A quick run never overwrites real results: its JSON goes away with `tmp`.
        out = Path(a.out) if a.out else (tmp / "data_throughput.json" if a.quick else
                                         REPO / "bench/results/data_throughput.json")
        results["quick"] = a.quick
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=2) + "\n")
        print(f"wrote {out}" + (" (temporary: deleted at exit)" if out.parent == tmp else ""))


if __name__ == "__main__":
    main()
