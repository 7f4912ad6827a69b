"""metrics.py against independent numbers: FLOPs per token vs torch's FlopCounterMode, the
GPU peak table, the cached CPU peak, the Throughput meter on a fake clock; and report.py."""
from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.checkpoint import set_checkpoint_early_stop
from torch.utils.flop_counter import FlopCounterMode

from conftest import compose
from lmforge.config import ModelConfig
from lmforge.metrics import (PEAK_TFLOPS, Throughput, flops_per_token, head_fraction,
                             measure_cpu_peak_tflops, model_state_gb, peak_tflops)
from lmforge.models import build_model
from lmforge.report import write_report

SEQ_LEN, BATCH = 128, 2
# The shipped tiny presets at a real vocabulary: the head is 40-70% of the matmul parameters,
# as in small real models, so a head counted wrongly shows well beyond 5%.
PRESETS = ["gpt_tiny", "llama_tiny", "bert_tiny"]


def model_cfg(preset: str) -> ModelConfig:
    return compose([f"model={preset}", "model.vocab_size=8192",
                    f"data.seq_len={SEQ_LEN}"]).model


def counted_flops(cfg: ModelConfig, recompute: bool = False, labels=None) -> int:
    """Matmul FLOPs of one training forward+backward, counted by torch."""
    torch.manual_seed(0)
    model = build_model(cfg).train()
    model.gradient_checkpointing = recompute
    ids = torch.randint(cfg.vocab_size, (BATCH, SEQ_LEN))
    # By default every position is labelled: BERT's MLM head then runs on all tokens.
    batch = {"input_ids": ids, "labels": ids.clone() if labels is None else labels}
    counter, threads = FlopCounterMode(display=False), torch.get_num_threads()
    torch.set_num_threads(1)  # counts do not depend on it; 2 busy threads can be ~10x slower
    # MATH backend: FlopCounterMode has no entry for the CPU flash kernel
    # (aten._scaled_dot_product_flash_attention_for_cpu) and would count attention as 0. The
    # math path computes the full T x T scores even when causal, which is the formula's
    # (PaLM appendix B) convention: 12*L*d*T per token, causal masking not discounted.
    # Early stop off: otherwise checkpoint's recompute skips each block's last matmul when its
    # output is not needed by backward (pre-LN MLP down-projection), 2*d*d_ff per layer less.
    try:
        with sdpa_kernel(SDPBackend.MATH), set_checkpoint_early_stop(False), counter:
            model(batch).backward()
    finally:
        torch.set_num_threads(threads)
    return counter.get_total_flops()


@pytest.mark.parametrize("preset", PRESETS)
def test_flops_per_token_matches_flop_counter(preset: str) -> None:
    cfg = model_cfg(preset)
    want = flops_per_token(cfg, SEQ_LEN) * BATCH * SEQ_LEN
    assert counted_flops(cfg) == pytest.approx(want, rel=0.05)


def test_bert_flops_count_the_head_on_masked_tokens_only() -> None:
    """In training BERT's head runs on the ~15% masked positions; counting it on every token
    would overstate MFU by ~20% for bert_tiny at vocab 8192."""
    from lmforge.data.packing import mask_tokens

    cfg = model_cfg("bert_tiny")
    ids = torch.randint(5, cfg.vocab_size, (BATCH, SEQ_LEN))
    ids[:, 0], ids[:, -1] = 2, 3  # [CLS] ... [SEP]
    labels = mask_tokens(ids, torch.Generator().manual_seed(0), 4, cfg.vocab_size, [2, 3],
                         0.15)["labels"]
    share = (labels != -100).float().mean().item()
    assert share == pytest.approx(head_fraction(cfg, SEQ_LEN, 0.15), abs=0.03)
    want = flops_per_token(cfg, SEQ_LEN, head_share=share) * BATCH * SEQ_LEN
    assert counted_flops(cfg, labels=labels) == pytest.approx(want, rel=0.05)
    assert flops_per_token(cfg, SEQ_LEN) > 1.15 * want / (BATCH * SEQ_LEN)


@pytest.mark.parametrize("preset", PRESETS)
def test_recompute_flops_match_flop_counter(preset: str) -> None:
    cfg = model_cfg(preset)
    want = flops_per_token(cfg, SEQ_LEN, recompute=True) * BATCH * SEQ_LEN
    assert counted_flops(cfg, recompute=True) == pytest.approx(want, rel=0.05)


@pytest.mark.parametrize("preset", PRESETS)
def test_recompute_is_one_more_forward_of_the_blocks(preset: str) -> None:
    """What the recompute term should be, from the counter alone: 2*N_blocks + 4*L*d*T."""
    cfg = model_cfg(preset)
    head = cfg.d_model * cfg.vocab_size + (cfg.d_model ** 2 if cfg.arch == "bert" else 0)
    fwd = flops_per_token(cfg, SEQ_LEN) / 3  # 2N + 4LdT
    extra = (counted_flops(cfg, recompute=True) - counted_flops(cfg)) / (BATCH * SEQ_LEN)
    assert extra == pytest.approx(fwd - 2 * head, rel=1e-6)


@pytest.mark.parametrize("name,key", [("NVIDIA H100 80GB HBM3", "H100 SXM"),
                                      ("NVIDIA H100 PCIe", "H100 PCIe"),
                                      ("NVIDIA A100-SXM4-80GB", "A100"),
                                      ("NVIDIA H200", "H200"),
                                      ("NVIDIA H200 NVL", "H200 NVL"),
                                      ("NVIDIA H100 NVL", "H100 NVL")])
def test_peak_table_matches_device_names(monkeypatch, name: str, key: str) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    cuda = torch.device("cuda", 0)
    for dtype in ("bf16", "fp32"):
        assert peak_tflops(cuda, dtype) == PEAK_TFLOPS[key][dtype]
    assert peak_tflops(cuda, "bf16", override=123.0) == 123.0


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_model_state_gb_is_the_plans_model_states(stage: int, dtype: str) -> None:
    """The summary's model-state figure agrees with lmforge-plan's per-rank parameters,
    gradients and optimizer (which tests/test_plan.py holds against DeepSpeed's own)."""
    from lmforge.config import compose
    from lmforge.engine import ds_config
    from lmforge.plan import configured, memory, shape_of

    cfg = compose(["model.vocab_size=512", f"parallel=zero{stage}", f"precision={dtype}"])
    t = cfg.trainer
    ds = ds_config(cfg.parallel, cfg.precision, cfg.optim, t.micro_batch_size, 1, 1)
    shape = shape_of(cfg, ds["zero_optimization"])
    for world in (1, 4):
        m = memory(shape, configured(cfg, world), world, touched_only=False)
        persist = 2 if dtype == "bf16" else 4
        persist *= shape.zero3_persistent() if stage == 3 and world > 1 else 0
        want = (m["params"] - persist + m["grads"] + m["optimizer"]) / 2**30
        assert model_state_gb(shape.n_params, dtype, stage, world) == pytest.approx(want)


def test_unknown_gpu_gives_zero_peak(monkeypatch) -> None:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_tflops(torch.device("cuda", 0), "bf16") == 0.0


def test_cpu_peak_is_measured_once_and_cached(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = measure_cpu_peak_tflops(torch.float32, n=128, reps=2)
    cache = tmp_path / "lmforge" / "peak.json"
    assert first > 0 and cache.is_file()
    # A sentinel in the cache comes back unchanged only if nothing is measured again.
    table = json.loads(cache.read_text())
    assert list(table.values()) == [first]
    table = {k: 4242.0 for k in table}
    cache.write_text(json.dumps(table))
    assert measure_cpu_peak_tflops(torch.float32, n=128, reps=2) == 4242.0
    assert peak_tflops(torch.device("cpu"), "fp32") == 4242.0  # the key has no n
    assert peak_tflops(torch.device("cpu"), "fp32", override=7.0) == 7.0


def test_throughput_meter_arithmetic(monkeypatch) -> None:
    now = [100.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    meter = Throughput(flops_per_token=2e9, world_size=2, peak_tflops=4.0,
                       device=torch.device("cpu"))  # t0 = 100
    meter.update(tokens=8192, samples=32, data_wait_s=0.5)
    meter.update(tokens=8192, samples=32, data_wait_s=0.5)
    now[0] = 104.0
    out = meter.report()  # a 4 s window; then a new one starts at 104
    assert out["tokens_per_s"] == 4096.0 and out["tokens_per_s_per_device"] == 2048.0
    assert out["samples_per_s"] == 16.0 and out["step_time_s"] == 2.0
    assert out["tflops"] == pytest.approx(2048 * 2e9 / 1e12)  # per device: 4.096
    assert out["mfu"] == pytest.approx(4.096 / 4.0)
    assert out["data_wait_frac"] == 0.25 and out["mem_rss_gb"] > 0
    assert meter.t0 == 104.0 and meter.tokens == meter.steps == 0


def test_mfu_is_unknown_without_a_peak(monkeypatch) -> None:
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    meter = Throughput(1e9, 1, 0.0, torch.device("cpu"))
    meter.update(1000, 4, 0.0)
    now[0] = 1.0
    assert meter.report()["mfu"] is None


def test_a_run_beating_the_cached_cpu_peak_drops_it(monkeypatch, tmp_path: Path, caplog) -> None:
    """A peak measured on a busy machine is below what a later run reaches: MFU is then
    unknown (not above 100%) and the cached peak is forgotten, so the next start measures."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    cache = tmp_path / "lmforge" / "peak.json"
    measure_cpu_peak_tflops(torch.float32, n=64, reps=1)
    measure_cpu_peak_tflops(torch.bfloat16, n=64, reps=1)
    assert len(json.loads(cache.read_text())) == 2
    now = [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: now[0])
    meter = Throughput(1e9, 1, 0.5, torch.device("cpu"), measured_dtype=torch.float32)
    meter.update(1000, 4, 0.0)
    now[0] = 1.0  # 1 TFLOP/s against a 0.5 peak
    out = meter.report()
    assert out["mfu"] is None and "above the cached CPU peak" in caplog.text
    assert [k.endswith("torch.bfloat16") for k in json.loads(cache.read_text())] == [True]
    meter.update(100, 4, 0.0)
    now[0] = 2.0
    assert meter.report()["mfu"] is None  # and it stays unknown for this run


def test_report_writes_png_from_partial_rows(tmp_path: Path) -> None:
    rows = [{"step": 1, "loss": 9.0, "tokens_per_s": 1000.0, "mfu": 0.1},
            {"step": 10, "loss": 7.5, "tokens_per_s": 1200.0},  # no mfu
            {"step": 20, "loss": 6.0, "mfu": None, "val_loss": 6.2, "val/web_loss": 6.4},
            {"step": 30, "val_loss": 5.9, "val/web_loss": None}]  # eval-only row
    jsonl = tmp_path / "metrics.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n{\"step\": 40, \"lo")  # torn
    out = write_report(jsonl, tmp_path / "plots" / "report.png")
    assert out == tmp_path / "plots" / "report.png"
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_cpu_kind_names_the_model_and_its_bf16_support() -> None:
    from pathlib import Path

    from lmforge.metrics import cpu_kind

    kind = cpu_kind()
    info = Path("/proc/cpuinfo").read_text()
    model = next(line.split(":", 1)[1].strip() for line in info.splitlines()
                 if line.startswith("model name"))
    has = "avx512_bf16" in info.split()
    assert kind.startswith(model) and (("avx512_bf16" in kind) == has), kind
    assert kind.endswith(")") and ("no bf16 matmul instructions" in kind) != (
        has or "amx_bf16" in info.split()), kind
