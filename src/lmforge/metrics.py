"""FLOPs per token, peak FLOP/s (GPU table or a cached CPU measurement), MFU, and the
throughput meter that turns step timings into the logged numbers."""
from __future__ import annotations

import json
import logging
import os
import platform
import resource
import sys
import time
from pathlib import Path

import torch

from lmforge.config import ModelConfig

log = logging.getLogger("lmforge")

# Dense (no sparsity) peak TFLOP/s per device by dtype, from the vendors' data sheets.
# First match wins: the more specific names (NVL, PCIe) come before their family.
PEAK_TFLOPS = {
    "H200 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H200": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 SXM": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.0},
    "H100 NVL": {"bf16": 835.0, "fp16": 835.0, "fp32": 60.0},
    "H100": {"bf16": 989.0, "fp16": 989.0, "fp32": 67.0},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.0, "fp16": 362.0, "fp32": 91.6},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 31.2},
    "V100": {"bf16": 0.0, "fp16": 125.0, "fp32": 15.7},
}
# Memory per device in GiB as torch.cuda reports it (a little under the data sheets' GB),
# and memory bandwidth in GB/s from the data sheets (80 GB A100, 32 GB V100).
DEVICE_MEMORY_GB = {"H200": 139.8, "H100 SXM": 79.6, "H100 PCIe": 79.6, "H100 NVL": 93.6,
                    "H100": 79.6, "A100": 79.2, "L40S": 44.4, "A10G": 22.0, "V100": 31.7}
MEMORY_BW_GB_S = {"H200": 4800.0, "H100 SXM": 3350.0, "H100 PCIe": 2000.0, "H100 NVL": 3900.0,
                  "H100": 3350.0, "A100": 2039.0, "L40S": 864.0, "A10G": 600.0, "V100": 900.0}


def gpu_kind(name: str) -> str | None:
    """The PEAK_TFLOPS key a GPU name means: a key itself, any case, "_" or "-" for spaces
    ("h100_sxm"), or a CUDA device name ("NVIDIA H100 80GB HBM3"); None if unknown."""
    wanted = name.replace("_", " ").replace("-", " ").lower().split()
    for key in PEAK_TFLOPS:
        if key.lower().split() == wanted:
            return key
    for key in PEAK_TFLOPS:  # most specific first: "H100 PCIe" before "H100"
        if all(part.lower() in name.lower() for part in key.split()):
            return key
    return None


def block_matmul_params(cfg: ModelConfig) -> int:
    """Parameters of the transformer blocks' Linear layers (what activation checkpointing
    recomputes)."""
    d = cfg.d_model
    kv = (cfg.n_kv_heads or cfg.n_heads) * (d // cfg.n_heads)
    d_ff = cfg.d_ff or 4 * d
    attn = d * (d + 2 * kv) + d * d
    mlp = (3 if cfg.activation == "swiglu" else 2) * d * d_ff
    return cfg.n_layers * (attn + mlp)


def head_params(cfg: ModelConfig) -> int:
    """Matmul parameters of the output head (BERT: MLM transform + decoder)."""
    d = cfg.d_model
    return d * cfg.vocab_size + (d * d if cfg.arch == "bert" else 0)


def head_fraction(cfg: ModelConfig, seq_len: int, mlm_probability: float) -> float:
    """Share of tokens the head runs on: all for GPT; for BERT the expected masked share
    (mlm_probability of the seq_len-2 non-special tokens of a [CLS] ... [SEP] block)."""
    return 1.0 if cfg.arch == "gpt" else mlm_probability * (seq_len - 2) / seq_len


def flops_per_token(cfg: ModelConfig, seq_len: int, recompute: bool = False,
                    head_share: float = 1.0) -> float:
    """Training FLOPs per token (PaLM appendix B): 6N for the matmuls plus 12*L*d*T for
    attention scores and values; the head's 6*N_head only on `head_share` of the tokens
    (BERT's MLM head runs on the masked positions only). Recomputing activations repeats
    the blocks' forward (not the head's): + 2*N_blocks + 4*L*d*T, hardware FLOPs rather
    than model FLOPs."""
    attn = 12 * cfg.n_layers * cfg.d_model * seq_len
    total = 6 * block_matmul_params(cfg) + 6 * head_params(cfg) * head_share + attn
    if recompute:
        total += 2 * block_matmul_params(cfg) + attn // 3
    return float(total)


def model_state_gb(n_params: int, dtype: str, stage: int, world: int) -> float:
    """Model states per rank (ZeRO paper, Adam): weights, gradients, and the optimizer's
    moments plus fp32 masters, which DeepSpeed keeps for bf16/fp16 and ZeRO 1-3 clone even
    in fp32 (only plain fp32 ZeRO-0 updates the parameters themselves)."""
    w = g = 4 if dtype == "fp32" else 2
    o = 8 if dtype == "fp32" and stage == 0 else 12
    o /= world if stage >= 1 else 1
    g /= world if stage >= 2 else 1
    w /= world if stage >= 3 else 1
    return n_params * (w + g + o) / 2**30


def cpu_kind() -> str:
    """This CPU's model name and its bf16 matmul instructions: a CPU bf16 number holds only
    for CPUs with the same support."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return platform.processor() or platform.machine()
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines()
                  if line.startswith("model name")), platform.machine())
    flags = next((line.split() for line in info.splitlines() if line.startswith("flags")), [])
    bf16 = [f for f in ("avx512_bf16", "amx_bf16") if f in flags]
    return f"{model} ({', '.join(bf16) or 'no bf16 matmul instructions'})"


def _cache_path() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lmforge" / "peak.json"


def _peak_key(dtype: torch.dtype, threads: int | None = None) -> str:
    return f"{platform.processor() or platform.machine()}|{os.cpu_count()}|" \
           f"{threads or torch.get_num_threads()}|{torch.__version__}|{dtype}"


def matmul_tflops(dtype: torch.dtype, n: int = 1024, reps: int = 8,
                  threads: int | None = None) -> float:
    """Best TFLOP/s of `reps` n x n matmuls now, with `threads` threads (uncached)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads or before)
    try:
        g = torch.Generator().manual_seed(0)  # the run's RNG stream stays untouched
        a, b = (torch.randn(n, n, generator=g).to(dtype) for _ in range(2))
        a @ b
        best = float("inf")
        for _ in range(reps):
            t = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t)
    finally:
        torch.set_num_threads(before)
    return 2 * n**3 / max(best, 1e-9) / 1e12


def measure_cpu_peak_tflops(dtype: torch.dtype, n: int = 1024, reps: int = 8,
                            threads: int | None = None) -> float:
    """Best matmul TFLOP/s of this CPU for `dtype` with `threads` threads (default: torch's
    current number), measured once and cached on disk."""
    threads = threads or torch.get_num_threads()
    key = _peak_key(dtype, threads)
    path = _cache_path()
    cache = _read_cache(path)
    value = cache.get(key)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value < 1e6:
        return float(value)
    cache[key] = matmul_tflops(dtype, n, reps, threads)
    _write_cache(path, cache)
    return cache[key]


def forget_cpu_peak(dtype: torch.dtype) -> None:
    """Drop this CPU's cached peak for `dtype`, so the next start measures it again."""
    path = _cache_path()
    cache = _read_cache(path)
    if cache.pop(_peak_key(dtype), None) is not None:
        _write_cache(path, cache)


def _write_cache(path: Path, cache: dict) -> None:
    try:  # atomic, so a rank reading it never sees half; a read-only cache only costs time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(cache, indent=1))
        os.replace(tmp, path)
    except OSError as e:
        log.debug("cannot cache the CPU peak in %s: %s", path, e)


def _read_cache(path: Path) -> dict:
    """The peak cache; a damaged one (not JSON, not an object) is ignored and rewritten."""
    try:
        cache = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        log.warning("ignoring the damaged CPU peak cache %s (%s); measuring again", path,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return {}
    return cache if isinstance(cache, dict) else {}


TORCH_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def peak_tflops(device: torch.device, dtype: str, override: float = 0.0) -> float:
    """Peak dense TFLOP/s of one device for `dtype` ("fp32" | "bf16" | "fp16")."""
    if override > 0:
        return override
    if device.type == "cuda":
        kind = gpu_kind(torch.cuda.get_device_name(device))
        # unknown GPU: MFU is reported as unknown (null) rather than guessed
        return PEAK_TFLOPS[kind][dtype] if kind else 0.0
    return measure_cpu_peak_tflops(TORCH_DTYPES[dtype])


def memory_stats(device: torch.device) -> dict[str, float]:
    """Peak memory of this process: GPU allocated/reserved, or CPU resident set."""
    if device.type == "cuda":
        return {"mem_alloc_gb": torch.cuda.max_memory_allocated(device) / 2**30,
                "mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"mem_rss_gb": peak_rss_bytes() / 2**30}


def peak_rss_bytes() -> int:
    """This process's peak resident memory: Linux's VmHWM, which (unlike ru_maxrss, carried
    over fork and exec) starts at this process; ru_maxrss elsewhere."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024  # bytes on macOS, kB elsewhere


class Throughput:
    """Accumulates step timings between logs and reports window averages."""

    def __init__(self, flops_per_token: float, world_size: int, peak_tflops: float,
                 device: torch.device, hardware_flops_per_token: float | None = None,
                 measured_dtype: torch.dtype | None = None) -> None:
        self.fpt, self.world, self.peak, self.device = flops_per_token, world_size, peak_tflops, device
        self.hw_fpt = hardware_flops_per_token  # set when activations are recomputed
        self.measured_dtype = measured_dtype  # the peak is this CPU's cached measurement
        self.reset()

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.t0 = time.perf_counter()
        self.tokens = self.samples = self.steps = 0
        self.data_wait_s = 0.0

    def update(self, tokens: int, samples: int, data_wait_s: float) -> None:
        """Global tokens and samples of one optimizer step, and this rank's data wait."""
        self.tokens += tokens
        self.samples += samples
        self.steps += 1
        self.data_wait_s += data_wait_s

    def report(self) -> dict[str, float]:
        """Window averages; synchronises the device so queued work is counted."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        tps = self.tokens / elapsed
        tflops = tps / self.world * self.fpt / 1e12
        out = {"tokens_per_s": tps, "tokens_per_s_per_device": tps / self.world,
               "samples_per_s": self.samples / elapsed,
               "step_time_s": elapsed / max(self.steps, 1), "tflops": tflops,
               "mfu": tflops / self.peak if self.peak > 0 else None,  # None: unknown peak
               "data_wait_frac": self.data_wait_s / elapsed}
        if self.hw_fpt and self.peak > 0:  # hardware FLOPs utilisation, recompute included
            out["hfu"] = tps / self.world * self.hw_fpt / 1e12 / self.peak
        if self.measured_dtype is not None and tflops > self.peak:
            # A run cannot beat the matmul peak: the cached one was measured on a busy machine.
            log.warning("this run reaches %.3g TFLOP/s, above the cached CPU peak of %.3g (measured "
                        "while the machine was busy): MFU is unknown for the rest of this run and "
                        "the peak is measured again at the next start", tflops, self.peak)
            forget_cpu_peak(self.measured_dtype)
            self.peak, self.measured_dtype = 0.0, None
            out["mfu"] = None
            out.pop("hfu", None)
        out.update(memory_stats(self.device))
        self.reset()
        return out
