"""Metric sinks behind one small interface: JSONL file, console progress bar, wandb.
Only rank 0 builds sinks; every sink gets the same flat keys."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any, Protocol

from tqdm import tqdm

from lmforge.config import LoggingConfig, writing

log = logging.getLogger("lmforge")


class Sink(Protocol):
    def log(self, step: int, metrics: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def _clean(metrics: dict[str, Any]) -> dict[str, Any]:
    # JSON has no NaN/inf: write them as null, never as invalid tokens.
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v)
            for k, v in metrics.items()}


class JsonlSink:
    """One JSON object per logged step, flushed at once so a crash loses nothing logged."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with writing(path):
            self.f = open(path, "a", encoding="utf-8")

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        with writing(self.path):  # a full disk: one line naming the file
            self.f.write(json.dumps({"step": step, **_clean(metrics)}) + "\n")
            self.f.flush()

    def close(self) -> None:
        self.f.close()


class ConsoleSink:
    """A tqdm progress bar with ETA and the headline numbers."""

    def __init__(self, total: int, initial: int = 0) -> None:
        self.bar = tqdm(total=total, initial=initial, desc="train", unit="step",
                        dynamic_ncols=True, mininterval=1.0)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        show = {"loss": "{:.3f}", "val_loss": "{:.3f}", "tokens_per_s": "{:,.0f}",
                "mfu": "{:.1%}", "lr": "{:.2e}"}
        post = {k.replace("tokens_per_s", "tok/s"): f.format(metrics[k])
                for k, f in show.items() if isinstance(metrics.get(k), (int, float))}
        if post:
            self.bar.set_postfix(post, refresh=False)
        self.bar.update(step - self.bar.n)

    def close(self) -> None:
        self.bar.close()


def _has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text(errors="ignore")


class WandbSink:
    """wandb run on rank 0; offline without an API key, and never waiting long on the network."""

    def __init__(self, cfg: LoggingConfig, run_dir: Path, config: dict[str, Any],
                 resume_id: str | None = None) -> None:
        import wandb

        mode = cfg.wandb.mode
        if mode == "online" and not _has_wandb_key():
            log.info("wandb: no API key found, logging offline (wandb sync %s/wandb later)",
                     run_dir)
            mode = "offline"
        settings = wandb.Settings(init_timeout=cfg.wandb.init_timeout_s, silent=True)
        kw = dict(project=cfg.wandb.project, entity=cfg.wandb.entity, name=cfg.wandb.name,
                  tags=list(cfg.wandb.tags), config=config, dir=str(run_dir),
                  id=resume_id, resume="allow" if resume_id else None)
        try:
            self.run = wandb.init(mode=mode, settings=settings, **kw)
        except Exception as e:  # an unreachable server must not stop training
            if mode != "online":
                raise
            log.warning("wandb online init failed (%s); logging offline", str(e).splitlines()[0])
            self.run = wandb.init(mode="offline", settings=settings, **kw)

    @property
    def run_id(self) -> str:
        return self.run.id

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        self.run.log(_clean(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def build_sinks(cfg: LoggingConfig, run_dir: Path, total_steps: int, start_step: int,
                config: dict[str, Any], wandb_id: str | None = None) -> list[Sink]:
    """The sinks `cfg` asks for (call on rank 0 only)."""
    sinks: list[Sink] = []
    if cfg.jsonl:
        sinks.append(JsonlSink(run_dir / "metrics.jsonl"))
    if cfg.wandb.mode != "disabled":
        sinks.append(WandbSink(cfg, run_dir, config, wandb_id))
    if cfg.console:
        sinks.append(ConsoleSink(total_steps, start_step))
    return sinks


class LogFile(logging.FileHandler):
    """train.log. A write that fails (a full disk) is said once in one line, instead of a
    traceback for every record; the log goes on on stderr."""

    failed = False

    def handleError(self, record: logging.LogRecord) -> None:
        import sys

        if not self.failed:
            self.failed = True
            print(f"lmforge: cannot write {self.baseFilename}: {sys.exc_info()[1]}; the log "
                  "goes on on stderr only", file=sys.stderr)


def setup_logging(rank: int, run_dir: Path) -> None:
    """Rank 0 logs INFO to stderr and run_dir/train.log; other ranks only warnings."""
    import logging
    import sys

    level = logging.INFO if rank == 0 else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        with writing(run_dir / "train.log"):
            handlers.append(LogFile(run_dir / "train.log"))
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format=f"[%(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
