"""Shared fixtures: composed configs, local corpora, a runner for `lmforge-train`, and multi-rank
worlds (`run_distributed`) that train as it does without a CLI start-up per run."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Never touch the network, never wait for wandb.
os.environ.update(WANDB_MODE="disabled", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                  TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu")

REPO = Path(__file__).resolve().parents[1]


def pytest_sessionstart(session) -> None:
    """Build DeepSpeed's CPU comm op once, before any test process starts DeepSpeed: test
    processes racing to build it, or a test killing one mid-build, would leave torch's build
    lock behind and every later DeepSpeed start waiting on it. The CPU peak behind MFU is
    measured here too, while the machine is quiet: measured under the tests' load it would
    be low and a later, quieter run would exceed it."""
    if hasattr(session.config, "workerinput"):  # an xdist worker: the controller built it
        return
    ext = Path(sys.prefix) / "torch_extensions"
    subprocess.run([sys.executable, "-c", "from deepspeed.comm.torch import build_shm_op; "
                    "build_shm_op(); from lmforge.metrics import TORCH_DTYPES, forget_cpu_peak, "
                    "measure_cpu_peak_tflops as m\n"
                    "for d in (TORCH_DTYPES[\"fp32\"], TORCH_DTYPES[\"bf16\"]): forget_cpu_peak(d); m(d)"],
                   check=True, capture_output=True,
                   env={**os.environ, "TORCH_EXTENSIONS_DIR": str(ext)}, timeout=900)

CONF = REPO / "conf"

# Fast settings for end-to-end runs on 2 CPU cores.
TINY = ["logging=quiet", "data.seq_len=64", "trainer.micro_batch_size=4",
        "tokenizer.vocab_size=512", "tokenizer.train_max_chars=2000000",
        "trainer.eval_batches=2", "trainer.sample_tokens=8", "optim.warmup_steps=5"]


from distributed_helper import run_distributed  # noqa: E402,F401  (for the tests)
from lmforge.config import compose  # noqa: E402  (the typed config lmforge-train builds)


RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
              "LOCAL_WORLD_SIZE")


@pytest.fixture(autouse=True)
def _no_rendezvous_left_behind():
    """A rendezvous a test sets up in its own process (MASTER_PORT, RANK, ...) is dropped
    after it: a later test's training subprocess would inherit the port, and find it taken.
    (A module fixture's, set before its tests, stays.)"""
    before = {k: os.environ.get(k) for k in RENDEZVOUS}
    yield
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)


@pytest.fixture
def tiny_cfg():
    return compose(TINY)


def run_train(run_dir: Path, *overrides: str, check: bool = True, timeout: float = 600,
              env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run `python -m lmforge.train` in `run_dir` as a user would."""
    cmd = [sys.executable, "-m", "lmforge.train", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                          env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return proc


def train_in_process(run_dir: Path, *overrides: str) -> list[str]:
    """What `lmforge-train` does on this rank once started (compose, set up, build, fit),
    in this process: for `run_distributed` worlds, without a CLI start-up per run. Returns
    the lmforge log messages this rank prints (INFO on rank 0, warnings on the others)."""
    import logging

    from lmforge import distributed
    from lmforge.assembly import build, release_run_dir

    cfg = compose(list(overrides))
    info = distributed.setup(cfg.trainer.dist_timeout_s, cfg.trainer.device)
    run_dir.mkdir(parents=True, exist_ok=True)
    lines: list[str] = []
    handler = logging.Handler(logging.INFO if info.is_main else logging.WARNING)
    handler.emit = lambda record: lines.append(record.getMessage())
    log = logging.getLogger("lmforge")
    log.setLevel(logging.INFO)
    log.addHandler(handler)
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        trainer = build(cfg, run_dir, info)
        if trainer is not None:
            trainer.fit()
        distributed.barrier()
        release_run_dir(run_dir)
    finally:
        log.removeHandler(handler)
    return lines


def tiny_engine(*overrides: str):
    """(Engine, its config) for a 2-layer, vocab-512 TINY GPT on this process's rank of a world
    of one (inside run_distributed), built as lmforge-train builds it, seeded 0."""
    import torch

    from lmforge.engine import Engine, create_model, ds_config
    from lmforge.models import build_model

    cfg = compose([*TINY, "model.vocab_size=512", "model.n_layers=2", *overrides])
    t = cfg.trainer
    ds = ds_config(cfg.parallel, cfg.precision, cfg.optim, t.micro_batch_size, 1, 1)
    torch.manual_seed(0)
    cpu = torch.device("cpu")
    model = create_model(lambda: build_model(cfg.model), ds, cfg.parallel, cpu)
    return Engine(model, ds, cfg.optim, cfg.parallel, cfg.precision, 10, 1, cpu), cfg


def train_runs(rank: int, world_size: int, runs: list[tuple[Path, list[str]]]) -> list[list[str]]:
    """`run_distributed` target: train each (run dir, overrides) in turn, in one world;
    each run's log lines on this rank."""
    logs = []
    for run_dir, overrides in runs:
        try:
            logs.append(train_in_process(run_dir, *overrides))
        except Exception as e:
            e.add_note(f"training {run_dir} ({' '.join(overrides)}), rank {rank} of {world_size}")
            raise
    return logs


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


WORDS = "alpha beta gamma delta shard rank batch step loss token grad zero".split()


def random_texts(n_docs: int, seed: int, lengths: tuple[int, int] = (10, 200),
                 words: list[str] = WORDS, prefix: str = "") -> list[str]:
    """n_docs documents of random words, reproducibly (prefix formatted with the index)."""
    import random

    rng = random.Random(seed)
    return [prefix.format(i) + " ".join(rng.choice(words) for _ in range(rng.randint(*lengths)))
            for i in range(n_docs)]


def write_jsonl(path: Path, texts: list[str]) -> Path:
    """A JSON Lines corpus: one {"text": ...} object per document."""
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    return path


def random_corpus(path: Path, n_docs: int, seed: int, **kw) -> Path:
    """A JSONL file of `random_texts(n_docs, seed, **kw)`."""
    return write_jsonl(path, random_texts(n_docs, seed, **kw))


@pytest.fixture
def text_corpus(tmp_path: Path) -> Path:
    """A small local JSONL corpus of distinct documents (each starts with its index)."""
    return random_corpus(tmp_path / "corpus.jsonl", 400, seed=0, lengths=(20, 120),
                         prefix="doc {}: ")


def prepare_shards(corpus: Path, out: Path, *overrides: str) -> Path:
    """`lmforge-prepare shards` of a JSONL corpus into `out`, as a user runs it."""
    subprocess.run([sys.executable, "-m", "lmforge.prepare", "shards", "--out", str(out),
                    "data=files", f"data.paths=[{corpus}]", *overrides],
                   cwd=REPO, check=True, capture_output=True)
    return out


def same_state(a, b) -> bool:
    """Equality of nested state dicts that hold tensors."""
    import torch

    if torch.is_tensor(a) or torch.is_tensor(b):
        return torch.is_tensor(a) and torch.is_tensor(b) and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_state(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_state(x, y) for x, y in zip(a, b))
    return a == b


class Payload:
    """Unpickling this creates a file (open(path, "w")): what a crafted checkpoint or weights
    file could do; the tests assert the file never appears."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple:
        return (open, (str(self.path), "w"))
