"""Every bench/*.py runs with --quick (the same code path on tiny sizes, a few steps) and prints
finite, positive ratios, so the benchmarks cannot rot unnoticed. A new script is picked up by
the glob; a quick run must leave bench/results/ alone."""
from __future__ import annotations

import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
SCRIPTS = sorted(p.name for p in BENCH.glob("*.py"))
# Lines a known script must print (found by this label), each with this many ratios ("1.23x").
# Any other script must print at least one ratio.
EXPECTED = {
    "throughput.py": {"gpt fp32": 2, "gpt bf16": 2, "bert fp32": 2, "bert bf16": 2},
    "data_throughput.py": {"tokenizer_encode": 1, "on_the_fly_loader": 1, "shard_loader": 1},
    "plan_accuracy.py": {"activations fp32 ": 1, "activations bf16+ckpt": 1,
                         "memory bf16_zero3_2r": 2, "step   bf16_zero3_2r": 3},
}
RATIO = re.compile(r"(?<![\w.])([-+]?(?:\d[\d,]*(?:\.\d*)?|nan|inf))x(?!\w)")
ENV = {"WANDB_MODE": "disabled", "HF_DATASETS_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
       "TOKENIZERS_PARALLELISM": "false"}


def ratios(line: str) -> list[float]:
    return [float(r.replace(",", "")) for r in RATIO.findall(line)]


def results_snapshot() -> dict[str, tuple[int, int]]:
    return {str(p): (p.stat().st_mtime_ns, p.stat().st_size)
            for p in (BENCH / "results").rglob("*") if p.is_file()}


def test_every_script_is_found():
    assert {"throughput.py", "data_throughput.py", "plan_accuracy.py"} <= set(SCRIPTS)


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_quick(script: str):
    before = results_snapshot()
    proc = subprocess.run([sys.executable, str(BENCH / script), "--quick"], cwd=REPO,
                          env={**os.environ, **ENV}, capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, f"{script} --quick exited {proc.returncode}:\n" \
                                 f"{out[-2000:]}\n{proc.stderr[-4000:]}"
    assert "QUICK MODE" in out, f"{script} --quick does not say its numbers are meaningless"
    assert results_snapshot() == before, f"{script} --quick wrote into bench/results/"

    lines = [line for line in out.splitlines() if ratios(line)]
    assert lines, f"{script} --quick printed no ratio (a number followed by x):\n{out}"
    for label, n in EXPECTED.get(script, {}).items():
        found = [line for line in lines if label in line]
        assert len(found) == 1, f"{script}: want one ratio line for {label!r}, got {found}\n{out}"
        assert len(ratios(found[0])) == n, f"{script}: want {n} ratios in {found[0]!r}"
    for line in lines:
        assert all(math.isfinite(r) and r > 0 for r in ratios(line)), \
            f"{script}: a ratio that is not finite and positive in {line!r}"
    if script == "gpu_check.py":  # its probe of host syncs finds none in 8 quiet steps
        assert re.search(r"syncs per quiet step, [^:]+: \[0(, 0){7}\] \(cpu reads\)", out), out
        assert "SIGUSR1 -> exit 75, re-run resumed True (exit 0), export exit 0" in out, out


def test_the_gpu_check_wrapper_runs_the_script(tmp_path: Path) -> None:
    """bench/gpu_check.sh (what a lent GPU machine runs) reaches gpu_check.py's arguments."""
    proc = subprocess.run(["bash", str(BENCH / "gpu_check.sh"), "--help"], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "--quick" in proc.stdout, proc.stderr
