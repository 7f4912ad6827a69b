"""A training report: metrics.jsonl -> one PNG with loss, throughput and MFU over steps."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # no display on clusters; must precede pyplot
import matplotlib.pyplot as plt  # noqa: E402


def read_rows(metrics_jsonl: Path) -> list[dict[str, Any]]:
    """Logged rows; a torn last line (a run killed mid-write) is skipped."""
    rows = []
    for line in Path(metrics_jsonl).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return [r for r in rows if isinstance(r, dict) and "step" in r]


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of the rows that have a numeric `key` (null and missing are skipped)."""
    pts = [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))]
    return [s for s, _ in pts], [float(v) for _, v in pts]


def write_report(metrics_jsonl: Path, out_png: Path) -> Path:
    """Plot train loss (+ val_loss, val/<name>_loss), tokens/s and MFU against step into
    `out_png`."""
    rows = read_rows(metrics_jsonl)
    fig, (ax_loss, ax_tps, ax_mfu) = plt.subplots(1, 3, figsize=(15, 4), constrained_layout=True)
    ax_loss.plot(*series(rows, "loss"), label="train loss")
    val_steps, val = series(rows, "val_loss")
    if val:
        ax_loss.plot(val_steps, val, "o", label="val loss")
    for key in sorted({k for r in rows for k in r if k.startswith("val/")}):
        ax_loss.plot(*series(rows, key), "x", label=key)  # a mixture source, an eval set
    ax_loss.set(title="Loss", xlabel="step", ylabel="cross-entropy (nats)")
    ax_loss.legend()
    ax_tps.plot(*series(rows, "tokens_per_s"), color="tab:green")
    ax_tps.set(title="Throughput", xlabel="step", ylabel="tokens / s (all ranks)")
    steps, mfu = series(rows, "mfu")
    ax_mfu.plot(steps, [100 * m for m in mfu], color="tab:red")
    ax_mfu.set(title="Model FLOPs utilization", xlabel="step", ylabel="MFU (%)")
    for ax in (ax_loss, ax_tps, ax_mfu):
        ax.grid(alpha=0.3)
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=100)
    plt.close(fig)
    return out_png
