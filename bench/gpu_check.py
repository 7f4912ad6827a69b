"""One script for a lent GPU (H100/H200): what the machine has, which SDPA kernel each model
family gets, and short lmforge-train runs (gpt2_124m bf16 at ZeRO-1/2/3, trainer.compile on
and off, vocab 50257 vs 50304, llama_1b and bert_base steps, a SIGUSR1 + resume + export
from a GPU-written checkpoint, and the host-device syncs of each quiet step (CUDA's sync debug
mode; on CPU the host reads of tensor values)), printed as one table and written as JSON.
Everything runs from what the machine already has (no network).

  python bench/gpu_check.py                # on the GPU machine, ~6 min
  python bench/gpu_check.py --quick        # tiny models on this machine's device (CPU here)
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "gpu_check.json"
COMMON = ["logging=quiet", "trainer.eval_every=0", "trainer.sample_tokens=0",
          "trainer.log_every=5", "trainer.save_every_min=0"]


def environment() -> dict:
    import torch

    env = {"python": platform.python_version(), "torch": torch.__version__,
           "cuda_build": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    for mod in ("deepspeed", "transformers", "accelerate", "datasets", "tokenizers", "triton"):
        try:
            env[mod] = __import__(mod).__version__
        except Exception as e:  # what the machine lacks is a finding, not a crash
            env[mod] = f"missing ({type(e).__name__})"
    try:
        from deepspeed.accelerator import get_accelerator

        env["deepspeed_accelerator"] = get_accelerator().device_name()
    except Exception as e:
        env["deepspeed_accelerator"] = f"error ({type(e).__name__})"
    return env


def sdpa_kernels(device: str) -> dict[str, str]:
    """The first SDPA backend that accepts each family's attention call (bf16 on CUDA)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    shapes = {"gpt (causal)": (12, 12, True, None), "llama (GQA)": (32, 8, True, None),
              "bert (padding mask)": (12, 12, False, "mask")}
    out = {}
    for name, (heads, kv, causal, mask) in shapes.items():
        q = torch.randn(2, heads, 128, 64, device=device, dtype=dtype)
        k = v = torch.randn(2, kv, 128, 64, device=device, dtype=dtype)
        m = torch.ones(2, 1, 128, 128, device=device, dtype=torch.bool) if mask else None
        out[name] = "none"
        for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION,
                        SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH):
            try:
                with sdpa_kernel([backend]):
                    F.scaled_dot_product_attention(q, k, v, attn_mask=m, is_causal=causal,
                                                   enable_gqa=kv != heads)
                out[name] = backend.name
                break
            except RuntimeError:
                continue
    return out


def train(run: Path, overrides: list[str], timeout: float) -> dict:
    """One lmforge-train run; its last logged row and exit code."""
    cmd = [sys.executable, "-m", "lmforge.train", f"hydra.run.dir={run}", *COMMON, *overrides]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()] \
        if (run / "metrics.jsonl").is_file() else []
    last = rows[-1] if rows else {}
    return {"code": proc.returncode, "wall_s": round(time.time() - t0, 1),
            **{k: last.get(k) for k in ("step", "loss", "tokens_per_s", "mfu", "mem_alloc_gb")},
            "error": proc.stderr.strip().splitlines()[-1] if proc.returncode else None}


# lmforge-train in this process, counting per step (from the start of one train_step to the
# next) the synchronizing CUDA operations torch reports in sync debug mode, or on CPU the
# host reads of tensor values (aten::_local_scalar_dense: .item(), float(), bool()).
SYNC_PROBE = """
import json, sys, warnings, torch
from lmforge import engine, train
from lmforge.distributed import exit_process

steps, cuda = [], torch.cuda.is_available()
step = engine.Engine.train_step
def marked(self, micro):
    steps.append(0)
    return step(self, micro)
engine.Engine.train_step = marked
if cuda:
    shown = warnings.showwarning
    def count(message, *a, **k):
        if "synchronizing" in str(message) and steps:
            steps[-1] += 1
        else:
            shown(message, *a, **k)
    warnings.showwarning = count
    warnings.simplefilter("always")
    torch.cuda.set_sync_debug_mode("warn")
    probe = None
else:
    from torch.utils._python_dispatch import TorchDispatchMode
    class Reads(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default and steps:
                steps[-1] += 1
            return func(*args, **(kwargs or {}))
    probe = Reads()
sys.argv = ["lmforge-train", *sys.argv[1:]]
try:
    if probe is None:
        train.main()
    else:
        with probe:
            train.main()
except SystemExit as e:
    if e.code:
        raise
print("SYNCS " + json.dumps({"per_step": steps, "kind": "cuda" if cuda else "cpu reads"}),
      flush=True)
exit_process(0)
"""
QUIET = ["trainer.max_steps=12", "trainer.log_every=6", "trainer.check_every=6",
         "trainer.eval_every=0", "trainer.save_every=0", "trainer.save_every_min=0"]


def syncs_per_quiet_step(run: Path, overrides: list[str]) -> dict:
    """12 steps logging and checking at steps 6 and 12: the syncs of each quiet step (3-5,
    7-11; steps 1-2 warm up). lmforge's target is 0."""
    cmd = [sys.executable, "-c", SYNC_PROBE, f"hydra.run.dir={run}", *COMMON, *overrides,
           *QUIET]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    line = next((x for x in proc.stdout.splitlines() if x.startswith("SYNCS ")), None)
    if proc.returncode or line is None:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
    seen = json.loads(line[len("SYNCS "):])
    quiet = [n for i, n in enumerate(seen["per_step"], 1) if i not in (1, 2, 6, 12)]
    return {"kind": seen["kind"], "quiet_steps": quiet, "max": max(quiet),
            "per_step": seen["per_step"]}


def preempt_resume_export(run: Path, overrides: list[str], out: Path) -> dict:
    """SIGUSR1 mid-run -> exit 75; the re-run resumes; lmforge-export of what it wrote."""
    cmd = [sys.executable, "-m", "lmforge.train", f"hydra.run.dir={run}", *COMMON, *overrides]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    deadline = time.time() + 300
    while not (run / "metrics.jsonl").is_file() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    export = subprocess.run([sys.executable, "-m", "lmforge.export", str(run), str(out)],
                            cwd=REPO, capture_output=True, text=True, timeout=300)
    return {"signal_exit": proc.returncode, "resumed": "resumed from" in again.stderr,
            "rerun_exit": again.returncode, "export_exit": export.returncode,
            "exported": sorted(p.name for p in out.glob("*")) if out.is_dir() else []}


def plan(quick: bool, device: str) -> list[tuple[str, list[str]]]:
    if quick:
        tiny = ["model=gpt_tiny", "data.seq_len=64", "trainer.micro_batch_size=4",
                "tokenizer.vocab_size=512", "tokenizer.train_max_chars=2000000",
                "trainer.max_steps=6", f"trainer.device={device}"]
        return [("gpt_tiny zero1 fp32", [*tiny, "parallel=zero1"])]
    gpt = ["experiment=gpt2_124m_gpu", "trainer.max_steps=40", "trainer.grad_accum_steps=1",
           "tokenizer.train_max_chars=20000000", "data.num_workers=4"]
    return [("gpt2_124m bf16 zero1", [*gpt, "parallel=zero1"]),
            ("gpt2_124m bf16 zero2", [*gpt, "parallel=zero2"]),
            ("gpt2_124m bf16 zero2 eager", [*gpt, "parallel=zero2", "trainer.compile=false"]),
            ("gpt2_124m bf16 zero3", [*gpt, "parallel=zero3"]),
            ("gpt2_124m bf16 zero3 eager", [*gpt, "parallel=zero3", "trainer.compile=false"]),
            ("gpt2_124m bf16 zero2 vocab 50257", [*gpt, "model.vocab_size=50257"]),
            ("gpt2_350m bf16 zero2", [*gpt, "model=gpt2_350m", "trainer.micro_batch_size=8"]),
            ("llama_1b bf16 zero2", [*gpt, "model=llama_1b", "trainer.micro_batch_size=4",
                                     "trainer.max_steps=15"]),
            ("bert_base bf16 zero1", ["experiment=bert_base_gpu", "trainer.max_steps=40",
                                      "tokenizer.train_max_chars=20000000"])]


def sync_plan(quick: bool, base: list[str]) -> list[tuple[str, list[str]]]:
    """The recipe at ZeRO-1 and ZeRO-3 in bf16 (eager: the count is the same compiled), and
    the default job's fp32 ZeRO-0."""
    if quick:
        return [("zero1 " + ("bf16" if "precision=bf16" in base else "fp32"), base)]
    eager = [*base, "trainer.compile=false", "trainer.max_steps=12"]
    return [("gpt2_124m bf16 zero1", [*eager, "parallel=zero1"]),
            ("gpt2_124m bf16 zero3", [*eager, "parallel=zero3"]),
            ("gpt2_124m fp32 zero0", [*eager, "parallel=zero0", "precision=fp32"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    os.environ.setdefault("WANDB_MODE", "disabled")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    env = environment()
    device = "cuda" if env["cuda_available"] else "cpu"
    if a.quick:
        print("QUICK MODE: tiny models on this machine's device, the numbers mean nothing")
    print("environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), flush=True)
    kernels = sdpa_kernels(device)
    print("SDPA kernels: " + ", ".join(f"{k} -> {v}" for k, v in kernels.items()), flush=True)
    work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
    runs = {}
    for name, overrides in plan(a.quick, device):
        runs[name] = r = train(work / name.replace(" ", "_"), overrides, 600)
        tps = r["tokens_per_s"] or 0
        print(f"{name:34s} exit {r['code']}  step {r['step']}  loss {r['loss']}  "
              f"{tps:,.0f} tok/s  MFU {r['mfu']}  {r['wall_s']} s"
              + (f"  ({r['error']})" if r["error"] else ""), flush=True)
    first = next(iter(runs.values()))
    base = next(iter(plan(a.quick, device)))[1]
    syncs = {}
    for name, overrides in sync_plan(a.quick, base):
        syncs[name] = s = syncs_per_quiet_step(work / f"syncs_{name.replace(' ', '_')}", overrides)
        print(f"syncs per quiet step, {name}: " + (f"{s['quiet_steps']} ({s['kind']})"
                                                   if "error" not in s else s["error"]), flush=True)
    pre = preempt_resume_export(work / "preempt", [*base, f"trainer.max_steps={12 if a.quick else 200}"],
                                work / "export")
    print(f"SIGUSR1 -> exit {pre['signal_exit']}, re-run resumed {pre['resumed']} "
          f"(exit {pre['rerun_exit']}), export exit {pre['export_exit']}: {pre['exported']}")
    ok = [r for r in runs.values() if r["code"] == 0 and r["tokens_per_s"]]
    if ok and first["tokens_per_s"]:
        print("tokens/s of each run vs the first: "
              + ", ".join(f"{r['tokens_per_s'] / first['tokens_per_s']:.2f}x" for r in ok))
    out = a.out or (work / "gpu_check.json" if a.quick else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"quick": a.quick, "environment": env, "sdpa": kernels,
                               "runs": runs, "syncs_per_quiet_step": syncs,
                               "preempt_resume_export": pre}, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
