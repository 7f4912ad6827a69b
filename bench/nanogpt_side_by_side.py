"""lmforge-train vs karpathy/nanoGPT's own train.py on this CPU: the same GPT shape (6 layers,
6 heads, d 384, seq 256, micro batch 8, vocab 8192, biases, tied head), the same tokens
(the embedded corpus through one lmforge tokenizer), run as each user would (a process
per run), interleaved round by round so both see the same machine load. Tokens/s is the
median step time of the steps after warm-up, read from each tool's own log.

  .venv/bin/python bench/nanogpt_side_by_side.py --nanogpt DIR   # DIR: a nanoGPT checkout
  .venv/bin/python bench/nanogpt_side_by_side.py --quick          # tiny shapes, no nanoGPT

nanoGPT's train.py runs unmodified from DIR (its data dir gets one prepared dataset). On
CPU it never autocasts (its `ctx` is a nullcontext there), so for its bf16 cells the
benchmark starts it with contextlib.nullcontext replaced by a bf16 CPU autocast, from the
outside; its fp32 cells run as shipped."""
from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "nanogpt_side_by_side.json"
FULL = {"n_layers": 6, "n_heads": 6, "d_model": 384, "seq": 256, "mb": 8, "vocab": 8192,
        "warmup": 3, "timed": 10, "train_max_chars": 20_000_000}
QUICK = {"n_layers": 2, "n_heads": 2, "d_model": 64, "seq": 64, "mb": 4, "vocab": 512,
         "warmup": 2, "timed": 3, "train_max_chars": 2_000_000}
# bf16 autocast for nanoGPT on CPU, set from outside its code (see the module docstring).
AUTOCAST = """
import contextlib, runpy, sys, torch
base = contextlib.nullcontext
class Null(base):  # train.py's `nullcontext()` becomes a bf16 autocast; anyone else's is not
    def __new__(cls, *a, **k):
        if cls is Null and sys._getframe(1).f_code.co_filename.endswith("train.py"):
            return torch.autocast("cpu", dtype=torch.bfloat16)
        return super().__new__(cls)
contextlib.nullcontext = Null
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def prepare(size: dict, work: Path) -> tuple[Path, Path]:
    """An lmforge tokenizer trained on the embedded corpus, and the corpus as nanoGPT's
    train.bin / val.bin (uint16 token ids) with meta.pkl."""
    import numpy as np

    from lmforge.data.sources import embedded_corpus_files
    from lmforge.data.tokenizer import save_tokenizer, train_tokenizer

    texts = [f.read_text(errors="replace") for f in embedded_corpus_files()]
    tok = train_tokenizer(iter(texts), "bpe", size["vocab"], size["train_max_chars"])
    tok_path = work / "tokenizer.json"
    save_tokenizer(tok, tok_path)
    data = work / "nanogpt_data"
    data.mkdir()
    ids = np.concatenate([np.asarray(e.ids, dtype=np.uint16)
                          for e in tok.encode_batch(texts[:400])])
    ids[: int(0.9 * len(ids))].tofile(data / "train.bin")
    ids[int(0.9 * len(ids)):].tofile(data / "val.bin")
    with open(data / "meta.pkl", "wb") as f:
        pickle.dump({"vocab_size": size["vocab"]}, f)
    return tok_path, data


def run_lmforge(size: dict, dtype: str, compile_: bool, tok: Path, run: Path) -> list[float]:
    steps = size["warmup"] + size["timed"]
    cmd = [sys.executable, "-m", "lmforge.train", f"hydra.run.dir={run}", "model=gpt_tiny",
           f"model.n_layers={size['n_layers']}", f"model.n_heads={size['n_heads']}",
           f"model.d_model={size['d_model']}", f"model.max_seq_len={size['seq']}",
           f"model.vocab_size={size['vocab']}", f"data.seq_len={size['seq']}",
           f"tokenizer.path={tok}", f"trainer.micro_batch_size={size['mb']}",
           f"precision={dtype}", "parallel=zero0", "logging=quiet", f"trainer.max_steps={steps}",
           "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1",
           "trainer.sample_tokens=0", "trainer.save_every_min=0", f"trainer.compile={compile_}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"lmforge-train failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step_time_s"] for r in rows if r["step"] > size["warmup"]]


def run_nanogpt(size: dict, dtype: str, compile_: bool, nanogpt: Path, out: Path) -> list[float]:
    steps = size["warmup"] + size["timed"]
    args = ["train.py", "--dataset=lmforge_bench", "--device=cpu", f"--compile={compile_}",
            "--dtype=" + {"fp32": "float32", "bf16": "bfloat16"}[dtype],
            f"--n_layer={size['n_layers']}", f"--n_head={size['n_heads']}",
            f"--n_embd={size['d_model']}", f"--block_size={size['seq']}",
            f"--batch_size={size['mb']}", "--gradient_accumulation_steps=1", "--bias=True",
            "--dropout=0.0", f"--max_iters={steps}", "--eval_interval=100000",
            "--eval_iters=1", "--log_interval=1", "--always_save_checkpoint=False",
            f"--out_dir={out}", "--wandb_log=False"]
    cmd = [sys.executable, "-c", AUTOCAST, *args] if dtype == "bf16" else [sys.executable, *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=nanogpt, timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"nanoGPT train.py failed:\n{proc.stderr[-3000:]}")
    times = {int(m[1]): float(m[2]) / 1000 for m in
             re.finditer(r"iter (\d+): loss [\d.]+, time ([\d.]+)ms", proc.stdout)}
    return [t for i, t in sorted(times.items()) if i >= size["warmup"]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--nanogpt", type=Path, help="a karpathy/nanoGPT checkout")
    ap.add_argument("--rounds", type=int, help="default 2 (--quick: 1)")
    ap.add_argument("--dtypes", help="default fp32,bf16 (--quick: fp32)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    if not a.quick and not a.nanogpt:
        ap.error("--nanogpt DIR is needed (or --quick)")
    a.rounds = a.rounds or (1 if a.quick else 2)
    a.dtypes = a.dtypes or ("fp32" if a.quick else "fp32,bf16")
    os.environ.update(WANDB_MODE="disabled", HF_DATASETS_OFFLINE="1", DS_ACCELERATOR="cpu",
                      TOKENIZERS_PARALLELISM="false")
    size = QUICK if a.quick else FULL
    work = Path(tempfile.mkdtemp(prefix="nanogpt_side_by_side-"))
    tok, data = prepare(size, work)
    if a.nanogpt:
        target = a.nanogpt / "data" / "lmforge_bench"
        target.mkdir(parents=True, exist_ok=True)
        for f in data.iterdir():
            (target / f.name).write_bytes(f.read_bytes())
    cells = [(tool, dtype, comp) for dtype in a.dtypes.split(",")
             for tool, comp in ([("nanogpt", False), ("nanogpt", True)] if a.nanogpt else [])
             + [("lmforge", False), ("lmforge", True)]]
    times: dict[str, list[float]] = {f"{t} {d} {'compiled' if c else 'eager'}": []
                                     for t, d, c in cells}
    from lmforge.metrics import cpu_kind

    cpu = cpu_kind()
    for r in range(a.rounds):  # interleaved: each round runs every cell once
        for tool, dtype, comp in cells:
            key = f"{tool} {dtype} {'compiled' if comp else 'eager'}"
            run = work / f"{key.replace(' ', '_')}_{r}"
            fn = run_lmforge if tool == "lmforge" else run_nanogpt
            times[key] += (fn(size, dtype, comp, tok, run) if tool == "lmforge"
                           else fn(size, dtype, comp, a.nanogpt, run))
            tps = size["mb"] * size["seq"] / statistics.median(times[key])
            print(f"round {r + 1}: {key:26s} {tps:8,.0f} tokens/s (median so far)", flush=True)
    tokens = size["mb"] * size["seq"]
    result = {k: tokens / statistics.median(v) for k, v in times.items() if v}
    if a.quick:
        print("QUICK MODE: tiny shapes, no nanoGPT; the numbers mean nothing")
    print(f"\nCPU: {cpu}, {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}; torch "
          f"{__import__('torch').__version__}")
    for k, v in result.items():
        print(f"{k:26s} {v:8,.0f} tokens/s")
    ratios = {}
    for dtype in a.dtypes.split(","):
        for theirs in ("eager", "compiled"):
            for ours in ("eager", "compiled"):
                a_, b_ = f"lmforge {dtype} {ours}", f"nanogpt {dtype} {theirs}"
                if a_ in result and b_ in result:
                    ratios[f"{dtype}: lmforge {ours} / nanoGPT {theirs}"] = result[a_] / result[b_]
        a_, b_ = f"lmforge {dtype} compiled", f"lmforge {dtype} eager"
        ratios[f"{dtype}: lmforge compiled / lmforge eager"] = result[a_] / result[b_]
    for k, v in ratios.items():
        print(f"{k:45s} {v:.2f}x")
    out = a.out or (work / "result.json" if a.quick else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": a.quick, "cpu": cpu, "cores": os.cpu_count(),
                               "size": size, "rounds": a.rounds, "tokens_per_s": result,
                               "ratios": ratios, "step_times_s": times}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
