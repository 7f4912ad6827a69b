"""Peak memory of the LM loss (head + cross-entropy, forward and backward) with all logits
at once against lmforge's chunked head_cross_entropy, side by side on this CPU; and their
loss values. Each variant runs in a fresh process and reports its peak RSS growth.

  python bench/loss_memory.py            # vocab 50304, seq 1024, micro batch 8, d_model 768
  python bench/loss_memory.py --quick    # tiny sizes: the same code path, meaningless numbers
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "loss_memory.json"
FULL = {"vocab": 50304, "seq": 1024, "batch": 8, "d_model": 768, "chunk_elements": 0}
# Chunks forced small in quick mode, so the chunked path runs.
QUICK = {"vocab": 8192, "seq": 256, "batch": 4, "d_model": 64, "chunk_elements": 1 << 20}


def one(variant: str, size: dict[str, int]) -> dict[str, float]:
    """In this process: the loss of one variant; RSS growth over the inputs' baseline."""
    import resource

    import torch
    from torch import nn

    from lmforge.models import layers

    torch.manual_seed(0)
    head = nn.Linear(size["d_model"], size["vocab"], bias=False)
    h = torch.randn(size["batch"], size["seq"], size["d_model"], requires_grad=True)
    labels = torch.randint(0, size["vocab"], (size["batch"], size["seq"]))
    chunk = (size["chunk_elements"] or layers.CHUNK_ELEMENTS) if variant == "chunked" else 1 << 62
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    loss = layers.head_cross_entropy(head, h, labels, size["vocab"], chunk_elements=chunk)
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"loss": loss.item(), "peak_growth_mb": (peak - base) / 1024,
            "grad_sum": float(h.grad.double().sum())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path)
    a = ap.parse_args()
    size = QUICK if a.quick else FULL
    if a.variant:
        print(json.dumps(one(a.variant, size)))
        return
    if a.quick:
        print("QUICK MODE: tiny sizes, the numbers mean nothing", flush=True)
    got = {}
    for variant in ("whole", "chunked"):
        cmd = [sys.executable, __file__, "--variant", variant] + (["--quick"] if a.quick else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        got[variant] = json.loads(out.strip().splitlines()[-1])
    w, c = got["whole"], got["chunked"]
    print(f"{size}: logits {size['batch'] * size['seq'] * size['vocab'] * 4 / 2**20:,.0f} MB "
          "in fp32")
    print(f"peak RSS growth of loss fwd+bwd: whole {w['peak_growth_mb']:,.0f} MB, chunked "
          f"{c['peak_growth_mb']:,.0f} MB -> {w['peak_growth_mb'] / max(c['peak_growth_mb'], 1):.2f}x"
          " lower")
    print(f"loss whole {w['loss']:.7f} chunked {c['loss']:.7f} (rel diff "
          f"{abs(w['loss'] - c['loss']) / w['loss']:.1e}); input grad sum rel diff "
          f"{abs(w['grad_sum'] - c['grad_sum']) / max(abs(w['grad_sum']), 1e-12):.1e}")
    out = a.out or (Path(tempfile.mkdtemp()) / "loss_memory.json" if a.quick else RESULTS)
    out.parent.mkdir(parents=True, exist_ok=True)
    from lmforge.metrics import cpu_kind

    out.write_text(json.dumps({"size": size, "cpu": cpu_kind(),
                               "quick": a.quick, **got}, indent=2) + "\n")


if __name__ == "__main__":
    main()
