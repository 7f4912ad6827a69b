"""lmforge-plan held against measured runs on this CPU: the predicted per-rank peak against
the growth of peak RSS from a dry run to 3 training steps, the activation estimate against
the bytes autograd saves for backward, the step time against the measured one.
Usage: .venv/bin/python bench/plan_accuracy.py [--quick] [--out FILE]"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.update(WANDB_MODE="disabled", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                  TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GB = 2**30
QUICK_NOTE = ("QUICK MODE (--quick): a tiny model, one config, 3 steps; the numbers below are "
              "meaningless, this run only shows that the benchmark works")
# GPT-2-124M shaped (vocab 50257), seq 512, micro batch 2; the tokenizer is a small one.
FULL = {"model": ["model=gpt2_124m", "model.vocab_size=50257"], "seq": 512, "mb": 2,
        # the model lmforge.plan.MEASURED_MFU was measured on (bench/throughput.py's size)
        "calibration": ["model=gpt_tiny", "model.n_layers=6", "model.n_heads=6",
                        "model.d_model=384", "model.vocab_size=8192", "data.seq_len=256",
                        "trainer.micro_batch_size=8"],
        "tok_vocab": 4096, "tok_chars": 2_000_000,
        "runs": [(d, z, r) for r in (1, 2) for z in (0, 3) for d in ("fp32", "bf16")]}
QUICK = {"model": ["model=gpt_tiny", "model.n_layers=2", "model.d_model=64", "model.n_heads=2",
                   "model.vocab_size=512"], "seq": 64, "mb": 2, "tok_vocab": 512,
         "calibration": ["model=gpt_tiny", "model.n_layers=1", "model.d_model=64",
                         "model.n_heads=2", "model.vocab_size=512", "data.seq_len=32",
                         "trainer.micro_batch_size=2"],
         "tok_chars": 2_000_000, "runs": [("bf16", 3, 2)]}
STEPS = 3
# Every process runs one thread (torchrun's default for several per machine): on 2 cores
# shared with other jobs a second thread mostly waits at barriers, and the CPU time of one
# thread per step is what an idle core would take, whatever the load.
THREADS = 1
# glibc keeps freed blocks under its dynamic mmap threshold (up to 32 MB) in the heap, so
# resident memory runs ahead of live tensors; a fixed threshold returns every tensor of
# 128 kB or more to the system when freed, so RSS tracks what is allocated (as a GPU's
# allocated-bytes counter does). Both are measured.
MALLOC = {"glibc_default": {}, "tensors_returned": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


def shape(size: dict) -> list[str]:
    return size["model"] + [f"data.seq_len={size['seq']}", f"trainer.micro_batch_size={size['mb']}"]


def overrides(model: list[str], dtype: str, stage: int, tok: Path) -> list[str]:
    """A run of `model` (its shape overrides) as the benchmark trains it."""
    return model + [
        f"precision={dtype}", f"parallel=zero{stage}", f"tokenizer.path={tok}",
        "logging=quiet", "trainer.log_every=1", "trainer.eval_every=0", "trainer.eval_batches=1",
        "trainer.sample_tokens=0", "trainer.save_every_min=0", "optim.warmup_steps=1"]


def worker(mode: str, run_dir: str, out: str, args: list[str]) -> None:
    """One rank: a dry run or STEPS training steps; writes its peak RSS (and step times)."""
    from lmforge import distributed
    from lmforge.assembly import build, release_run_dir
    from lmforge.config import compose
    from lmforge.engine import init_distributed

    info = distributed.setup()
    Path(run_dir).mkdir(parents=True, exist_ok=True)  # Hydra makes it for lmforge-train
    init_distributed(info.device)  # both modes: DeepSpeed's comm set-up is not the model's
    cfg = compose(args + [f"trainer.max_steps={0 if mode == 'dry' else STEPS}"])
    trainer = build(cfg, Path(run_dir), info)
    rss, cpu_s = {}, []
    if trainer is not None:
        # The final checkpoint is not training: the peak is read where it would start.
        trainer.save = lambda: rss.setdefault("gb", peak_rss_gb())
        step = trainer.engine.train_step

        def timed(micro: list) -> Any:  # CPU time: what other jobs on the cores leave alone
            t = time.process_time()
            out = step(micro)
            cpu_s.append(time.process_time() - t)
            return out

        trainer.engine.train_step = timed
        trainer.fit()
    result = {"rank": info.rank, "peak_rss_gb": rss.get("gb", peak_rss_gb()),
              "step_cpu_s": cpu_s}
    metrics = Path(run_dir) / "metrics.jsonl"
    if info.is_main and metrics.is_file():
        result["step_time_s"] = [json.loads(line)["step_time_s"]
                                 for line in metrics.read_text().splitlines()]
    Path(out).write_text(json.dumps(result))
    distributed.barrier()
    release_run_dir(Path(run_dir))
    distributed.teardown()


def peak_rss_gb() -> float:
    """This process's peak resident memory (VmHWM: ru_maxrss would start at the parent's)."""
    from lmforge.metrics import peak_rss_bytes

    return peak_rss_bytes() / GB


def launch(mode: str, ranks: int, run_dir: Path, args: list[str],
           env_extra: dict[str, str] | None = None) -> list[dict]:
    """Start `ranks` worker processes as torchrun would (one thread each when several)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs, outs = [], []
    for rank in range(ranks):
        out = run_dir.parent / f"{run_dir.name}.{mode}.{rank}.json"
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(ranks), "LOCAL_RANK": str(rank),
               "LOCAL_WORLD_SIZE": str(ranks), "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "PYTHONPATH": str(REPO / "src")}
        env["OMP_NUM_THREADS"] = "1"  # see THREADS
        env.update(env_extra or {})
        procs.append(subprocess.Popen(
            [sys.executable, __file__, "--worker", mode, str(run_dir), str(out), *args],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        outs.append(out)
    errs = [p.communicate(timeout=3600)[1] for p in procs]
    for p, err in zip(procs, errs):
        if p.returncode:
            raise RuntimeError(f"{mode} worker failed ({p.returncode}):\n{err[-3000:]}")
    return [json.loads(o.read_text()) for o in outs]


def make_tokenizer(size: dict, work: Path) -> Path:
    from lmforge.assembly import build_tokenizer, open_corpus
    from lmforge.config import compose
    from lmforge.distributed import DistInfo

    cfg = compose([f"tokenizer.vocab_size={size['tok_vocab']}",
                   f"tokenizer.train_max_chars={size['tok_chars']}"])
    build_tokenizer(cfg, work, DistInfo(0, 1, 0, torch.device("cpu")), open_corpus(cfg))
    return work / "tokenizer.json"


def cpu_peaks(reps: int) -> dict[str, float]:
    """One core's matmul peak now (best of `reps`, one thread), per dtype."""
    from lmforge.metrics import matmul_tflops

    return {dtype: matmul_tflops(tdt, 1024, reps, THREADS)
            for dtype, tdt in (("fp32", torch.float32), ("bf16", torch.bfloat16))}


def planned(args: list[str], ranks: int, peak: float, mfu: float | None = None
            ) -> dict[str, Any]:
    """lmforge-plan's row for this run on this CPU, at the peak measured now (and the MFU
    of lmforge.plan.MEASURED_MFU unless given)."""
    from lmforge.config import compose
    from lmforge.plan import make_plan, planned_hardware

    cfg = compose(args + ["plan.gpu=cpu", f"plan.gpus_per_node={ranks}"])
    hw = dataclasses.replace(planned_hardware(cfg), peak_tflops=peak)
    return make_plan(cfg, dataclasses.replace(hw, mfu=mfu) if mfu else hw)


def step_s(train: list[dict]) -> float:
    """Rank 0's median step (wall clock); the first also warms up (Adam state, traces)."""
    return statistics.median(train[0]["step_time_s"][1:])


def cpu_step_s(train: list[dict]) -> float:
    """Rank 0's median step in CPU time (one thread): what the step takes on an idle core,
    however much of the cores other jobs take meanwhile."""
    return statistics.median(train[0]["step_cpu_s"][1:])


def calibrate(args: list[str], ranks: int, work: Path, peak: float) -> float:
    """The compute MFU of a run measured now: its step (CPU time per thread) less the plan's
    communication and optimizer times, against the FLOPs at the measured peak."""
    step = cpu_step_s(launch("train", ranks, work, args))
    plan = planned(args, ranks, peak)
    t, mfu = plan["time_s"], plan["hardware"]["mfu"]
    return t["compute_s"] * mfu / max(step - t["comm_s"] - t["optimizer_s"], 1e-6)


def measure_run(size: dict, dtype: str, stage: int, ranks: int, tok: Path, work: Path,
                reps: int) -> dict[str, Any]:
    args = overrides(shape(size), dtype, stage, tok)
    name = f"{dtype}_zero{stage}_{ranks}r"
    out: dict[str, Any] = {"config": name, "loadavg_before": os.getloadavg()[0]}
    # Right before the timed run, under the same load: this CPU's peak, and the MFU of the
    # calibration model run the same way (dtype, stage, ranks).
    peak = cpu_peaks(reps)[dtype]
    calib = overrides(size["calibration"], dtype, stage, tok)
    out.update(peak_tflops_now=peak, mfu_now=calibrate(calib, ranks, work / f"{name}_calib",
                                                       peak))
    for malloc, env in MALLOC.items():
        dry = launch("dry", ranks, work / f"{name}_{malloc}_dry", args, env)
        train = launch("train", ranks, work / f"{name}_{malloc}_train", args, env)
        out[malloc] = {"growth_gb": [t["peak_rss_gb"] - d["peak_rss_gb"]
                                     for d, t in zip(dry, train)],
                       "dry_rss_gb": [d["peak_rss_gb"] for d in dry],
                       "train_rss_gb": [t["peak_rss_gb"] for t in train]}
        if malloc == "glibc_default":
            out.update(step_times_s=train[0]["step_time_s"], measured_step_s=step_s(train),
                       step_cpu_s=train[0]["step_cpu_s"],
                       measured_cpu_step_s=cpu_step_s(train))
    plan = planned(args, ranks, peak)
    paired = planned(args, ranks, peak, out["mfu_now"])
    out.update(predicted_peak_gb=plan["per_rank_gb"]["peak"], per_rank_gb=plan["per_rank_gb"],
               predicted_step_s=plan["step_time_s"], predicted_time_s=plan["time_s"],
               paired_step_s=paired["step_time_s"], loadavg_after=os.getloadavg()[0])
    for malloc in MALLOC:
        out[malloc]["ratio"] = out["predicted_peak_gb"] / max(out[malloc]["growth_gb"])
    out["step_ratio"] = out["predicted_step_s"] / out["measured_step_s"]
    out["cpu_step_ratio"] = out["predicted_step_s"] / out["measured_cpu_step_s"]
    out["paired_step_ratio"] = out["paired_step_s"] / out["measured_cpu_step_s"]
    return out


def saved_bytes(size: dict, dtype: str, checkpointing: bool) -> tuple[int, float]:
    """(bytes autograd saves for backward in one forward, the plan's estimate)."""
    from lmforge.config import compose
    from lmforge.models import build_model
    from lmforge.plan import activation_bytes

    cfg = compose(size["model"] + [f"data.seq_len={size['seq']}"])
    model = build_model(cfg.model).train()
    model = model.to(torch.bfloat16) if dtype == "bf16" else model
    model.gradient_checkpointing = checkpointing
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()  # views of one storage (q, k, v of qkv) count once
        if storage.data_ptr() not in params:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    ids = torch.randint(cfg.model.vocab_size, (size["mb"], size["seq"]))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model({"input_ids": ids, "labels": ids})
    est = activation_bytes(cfg.model, size["seq"], size["mb"], dtype, 1.0, checkpointing)[0]
    return sum(seen.values()), est


def report(result: dict[str, Any], quick: bool) -> None:
    mark = "  (quick: meaningless)" if quick else ""
    print(f"CPU: {result['cpu']}, {result['cores']} cores; loadavg at start "
          f"{result['loadavg_start']:.2f} (other jobs share these cores)")
    print("one core's peak now (TFLOP/s): " + ", ".join(f"{k} {v:.3f}" for k, v in result["peaks"].items())
          + "; every process runs one thread")
    print("calibration model's compute MFU now (1 process, ZeRO-0): " + ", ".join(
        f"{k} {v:.3f}" for k, v in result["calibration_mfu"].items())
        + f" (lmforge.plan.MEASURED_MFU['cpu']: {result['table_mfu']})")
    print("\nactivations per micro batch: bytes saved for backward vs the plan's estimate")
    for a in result["activations"]:
        print(f"  activations {a['config']:<16} measured {a['measured_mb']:8.1f} MB  "
              f"predicted {a['predicted_mb']:8.1f} MB  {a['ratio']:.3f}x{mark}")
    print("\nper-rank peak (predicted) vs growth of peak RSS from the dry run to 3 steps (each "
          "rank), and step time")
    for r in result["runs"]:
        measured = ", ".join(
            f"{'/'.join(f'{g:.2f}' for g in r[m]['growth_gb'])} GB ({m.replace('_', ' ')}) "
            f"{r[m]['ratio']:.3f}x" for m in MALLOC)
        print(f"  memory {r['config']:<15} predicted {r['predicted_peak_gb']:6.2f} GB, measured "
              f"{measured}{mark}")
        print(f"  step   {r['config']:<15} predicted {r['predicted_step_s']:6.2f} s, measured "
              f"{r['measured_step_s']:.2f} s wall {r['step_ratio']:.3f}x, "
              f"{r['measured_cpu_step_s']:.2f} s CPU time {r['cpu_step_ratio']:.3f}x;"
              f" at the calibration model's MFU now ({r['mfu_now']:.3f}) "
              f"{r['paired_step_s']:.2f} s {r['paired_step_ratio']:.3f}x (peak "
              f"{r['peak_tflops_now']:.3f} TFLOP/s, loadavg {r['loadavg_before']:.1f}->"
              f"{r['loadavg_after']:.1f}){mark}")
    print("ratios are predicted / measured; targets: memory within 15%, activations within 10%, "
          "step time within 25% (wall time moves with other jobs' load, CPU time much less)")


def main() -> None:
    from lmforge.metrics import cpu_kind

    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--worker", nargs=argparse.REMAINDER)
    a = ap.parse_args()
    if a.worker:
        return worker(a.worker[0], a.worker[1], a.worker[2], a.worker[3:])
    from lmforge.plan import MEASURED_MFU

    size = QUICK if a.quick else FULL
    if a.quick:
        print(QUICK_NOTE)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tok = make_tokenizer(size, work)
        reps = 3 if a.quick else 20
        peaks = cpu_peaks(reps)
        result: dict[str, Any] = {
            "cpu": cpu_kind(), "cores": os.cpu_count(), "loadavg_start": os.getloadavg()[0],
            "peaks": peaks, "table_mfu": MEASURED_MFU["cpu"], "activations": [], "runs": [],
            "calibration_mfu": {}}
        for dtype in ("fp32", "bf16"):  # what MEASURED_MFU holds, measured again now
            args = overrides(size["calibration"], dtype, 0, tok)
            peak = peaks[dtype]
            result["calibration_mfu"][dtype] = calibrate(args, 1, work / f"calib_{dtype}", peak)
        for dtype in ("fp32", "bf16"):
            for ckpt in (False, True):
                got, est = saved_bytes(size, dtype, ckpt)
                result["activations"].append({
                    "config": dtype + ("+ckpt" if ckpt else ""), "measured_mb": got / 2**20,
                    "predicted_mb": est / 2**20, "ratio": est / got})
        for dtype, stage, ranks in size["runs"]:
            result["runs"].append(measure_run(size, dtype, stage, ranks, tok, work, reps))
        result["loadavg_end"] = os.getloadavg()[0]
        report(result, a.quick)
        out = a.out or (work / "plan_accuracy.json" if a.quick
                        else REPO / "bench" / "results" / "plan_accuracy.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print(f"wrote {out}" + (" (a temporary file: quick mode)" if a.quick else ""))


if __name__ == "__main__":
    main()
