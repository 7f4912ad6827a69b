"""The training loop: accumulation, eval, logging and checkpoint cadence, resume, signals,
the final sample and summary. `lmforge.assembly.build()` hands it everything it needs."""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from lmforge import checkpoint, distributed
from lmforge.config import ConfigError, ModelConfig, TrainConfig, writing
from lmforge.data.workers import WorkerLoader
from lmforge.distributed import DistInfo
from lmforge.engine import Engine, to_universal
from lmforge.loggers import build_sinks
from lmforge.manifest import sha256
from lmforge.metrics import TORCH_DTYPES, Throughput, peak_tflops

log = logging.getLogger("lmforge")


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps."""


def text_documents(summary: dict[str, Any]) -> dict[str, Any]:
    """How plain-text files became documents (which the data position counts), as
    resolved; recorded only where files are split, so that a checkpoint from before
    data.text_split (a document per file) is refused under paragraphs."""
    corpus = summary.get("corpus", {})
    if "text_split" not in corpus:
        return {}
    return {"data.text_split": corpus["text_split"], "data.doc_max_chars": corpus["doc_max_chars"]}


class Health:
    """Non-finite steps counted on the device, so that a quiet step waits on nothing: read
    (with any stop flags, one all-reduce and one copy) only at check points."""

    def __init__(self, device: torch.device, dtype: str) -> None:
        zero = functools.partial(torch.zeros, (), dtype=torch.int32, device=device)
        self.streak, self.worst, self.total = zero(), zero(), zero()
        self.fp16, self.read_at = dtype == "fp16", 0

    def update(self, loss: torch.Tensor, applied: torch.Tensor) -> None:
        """One step's loss (this rank's) and whether the engine applied its update (both on
        the device)."""
        bad = ~torch.isfinite(loss.detach())
        # fp16 overflow skips are loss scaling at work, not a broken run.
        if not self.fp16:
            bad = bad | ~applied
        bad = bad.int()
        bad = distributed.max_over_ranks(bad)  # every rank counts the same steps
        self.streak = (self.streak + 1) * bad
        self.worst = torch.maximum(self.worst, self.streak)
        self.total += bad

    def read(self, flags: list[bool]) -> list[int]:
        """[current streak, longest streak since the last read, total, *flags (any rank)]."""
        t = torch.cat([torch.stack([self.streak, self.worst, self.total]),
                       torch.tensor([int(f) for f in flags], dtype=torch.int32,
                                    device=self.streak.device)])
        self.worst = self.streak.clone()
        return distributed.max_over_ranks(t).tolist()


class StopSignals:
    """SIGTERM and SIGUSR1 (Slurm's preemption warning) ask the run to save and exit 75;
    Ctrl-C once does the same, twice aborts at once. Installed once, at process start, so a
    signal during set-up, resume, conversion, eval or a save is honoured too."""

    received: str | None = None
    _installed = False

    @classmethod
    def install(cls) -> type["StopSignals"]:
        if not cls._installed:
            for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
                signal.signal(s, cls._handle)
            cls._installed = True
        return cls

    @classmethod
    def _handle(cls, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and cls.received is not None:
            raise KeyboardInterrupt
        cls.received = signal.Signals(signum).name
        log.warning("%s received: stopping after this step (or set-up), checkpointing what "
                    "is new, then exiting 75", cls.received)


class Trainer:
    """Owns the loop; everything it needs is built by `build()`."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, info: DistInfo, tok: Tokenizer,
                 engine: Engine, loader: WorkerLoader, val_batches: list,
                 summary: dict, named_val: dict[str, list] | None = None) -> None:
        self.cfg, self.run_dir, self.info, self.tok = cfg, run_dir, info, tok
        self.engine, self.loader, self.val_batches, self.summary = engine, loader, val_batches, summary
        self.named_val = named_val or {}  # name -> batches: each mixture source, each eval set
        self.ckpt_dir = run_dir / "checkpoints"
        t = cfg.trainer
        self.samples_per_step = t.micro_batch_size * t.grad_accum_steps * info.world_size
        self.tokens_per_step = self.samples_per_step * cfg.data.seq_len
        self.step, self.tokens, self.wandb_id, self.saved_step = 0, 0, None, -1
        self.last_loss, self.last_val, self.bad_steps = float("nan"), None, 0
        self.data_skipped = 0
        self.tokenizer_sha256 = sha256(run_dir / "tokenizer.json")
        measured = info.device.type == "cpu" and cfg.logging.peak_tflops <= 0
        self.meter = Throughput(summary["flops_per_token"], info.world_size,
                                peak_tflops(info.device, cfg.precision.dtype,
                                            cfg.logging.peak_tflops), info.device,
                                summary.get("hardware_flops_per_token"),
                                TORCH_DTYPES[cfg.precision.dtype] if measured else None)

    def resume(self) -> None:
        """Continue from trainer.resume_from, or from this run's newest good checkpoint.

        With another number of ranks than the checkpoint was written by, only a layout-free
        data position (data=shards: one global sample count) can continue: every rank takes
        rank 0's step, tokens and position, so the run goes on at the next global sample,
        none repeated or skipped. Each rank's RNG stream is then re-derived from (seed, step,
        rank), since the old ranks' streams have no owner; the trainer's RNG drives only
        dropout (shard order and BERT masks are seeded by sample index), so only the dropout
        masks differ from an uninterrupted run. The engine state: ZeRO-0 loads as it is;
        the partitioned optimizer state of ZeRO 1-3 is first converted (never in place) to
        a DeepSpeed universal checkpoint in checkpoints/.universal-<tag>/, removed after."""
        t = self.cfg.trainer
        distributed.mark("resume")
        r = checkpoint.choose_resume(
            self.ckpt_dir, t.resume_from, t.start_fresh, self.info, self.loader.layout_free,
            self.cfg.parallel.zero_stage, {"model": model_record(self.cfg.model),
                                           "tokenizer_sha256": self.tokenizer_sha256,
                                           "guard": self.guard()})
        if r is None:
            return
        if r.universal:
            self._load_universal(r)
        else:
            self.engine.load(r.ckpt.parent, r.ckpt.name)
        state = r.state
        self.step, self.tokens, self.wandb_id = state["step"], state["tokens"], state["wandb_id"]
        self.saved_step = self.step
        self.loader.load_state_dict(state["loader"])
        if r.regrid:
            checkpoint.reseed(self.cfg.trainer.seed, self.step, self.info.rank)
            log.info("%s, this run has %d: the data continues at global sample %d; per-rank "
                     "RNG streams (dropout) restart from (seed, step, rank)", r.by,
                     self.info.world_size, state["loader"]["consumed"])
        else:
            checkpoint.set_rng_state(state["rng"])
        log.info("resumed from %s (step %d, %d tokens)", r.ckpt, self.step, self.tokens)

    def _load_universal(self, r: checkpoint.Resume) -> None:
        """Convert (rank 0, never in place) and load a partitioned checkpoint of another
        number of ranks through a DeepSpeed universal checkpoint."""
        scratch = self.ckpt_dir / f"{checkpoint.UNIVERSAL_PREFIX}{r.ckpt.name}"
        universal = scratch / r.ckpt.name  # DeepSpeed also writes scratch/latest_universal
        stage = self.cfg.parallel.zero_stage

        def convert() -> None:
            t0 = time.perf_counter()
            for stale in self.ckpt_dir.glob(checkpoint.UNIVERSAL_PREFIX + "*"):
                shutil.rmtree(stale)  # left by a killed resume
            scratch.mkdir(parents=True)
            try:
                to_universal(r.ckpt, universal)
            except RuntimeError as e:
                n = r.saved_world
                raise ConfigError(f"{r.by} at ZeRO-{stage}: {e}; resume it with {n} "
                                  f"rank{'s' * (n != 1)}") from None
            log.info("%s at ZeRO-%d, this run has %d: converted to a DeepSpeed universal "
                     "checkpoint in %.1fs", r.by, stage, self.info.world_size,
                     time.perf_counter() - t0)

        try:
            distributed.on_main(self.info, convert)
            self.engine.load_universal(universal)
        finally:
            distributed.barrier()
            if self.info.is_main:
                shutil.rmtree(scratch, ignore_errors=True)

    def guard(self) -> dict[str, Any]:
        """What a checkpoint cannot continue under when changed (refused on resume)."""
        d = self.cfg.data
        # A source's name only labels its val/<name>_loss: renaming one is no other run.
        sources = [{k: v for k, v in dataclasses.asdict(s).items() if k != "name"}
                   for s in d.sources] if d.source == "mixture" else \
            {"files": list(d.paths), "hub": d.hub_name, "shards": d.shards_dir}.get(d.source)
        return {"parallel.zero_stage": self.cfg.parallel.zero_stage,
                "precision.dtype": self.cfg.precision.dtype, "data.seq_len": d.seq_len,
                "data.source": d.source, "data.sources": sources, **text_documents(self.summary)}

    def save(self) -> None:
        if self.saved_step == self.step:
            return  # e.g. a signal right after a periodic save: no second save
        distributed.mark(f"save step {self.step}")
        state = {"step": self.step, "tokens": self.tokens, "wandb_id": self.wandb_id,
                 "loader": self.loader.state_dict(), "model": model_record(self.cfg.model),
                 "tokenizer_sha256": self.tokenizer_sha256, "guard": self.guard()}
        path = checkpoint.save(self.engine, self.ckpt_dir, self.step, state, self.info,
                               self.cfg.trainer.keep_last,
                               (self.run_dir / "config.yaml", self.run_dir / "tokenizer.json"))
        self.saved_step, self.last_save = self.step, time.monotonic()
        log.info("saved %s", path)

    def evaluate(self) -> dict[str, float]:
        """val_loss and val_ppl on the run's validation batches (a mixture's as mixed), and
        val/<name>_loss on each named set's own batches (so val_loss is not their mean)."""
        out = {}
        if self.val_batches:
            loss = distributed.all_reduce_mean(self.engine.eval_loss(self.val_batches)).item()
            self.last_val = loss
            out = {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
        for name, batches in self.named_val.items():
            out[f"val/{name}_loss"] = distributed.all_reduce_mean(
                self.engine.eval_loss(batches)).item()
        return out

    def fit(self) -> dict[str, Any]:
        """Train to trainer.max_steps; returns the summary (`stopped` says why it ended early)."""
        t, start = self.cfg.trainer, time.perf_counter()
        signals = StopSignals.install()
        self.resume()
        if self.info.is_main:  # after resume() accepted the checkpoint for this config
            write_config(self.run_dir, self.cfg)
        if self.step >= t.max_steps:
            log.info("already at step %d of trainer.max_steps=%d: nothing to do",
                     self.step, t.max_steps)
            return self.summary
        if distributed.any_rank([signals.received is not None], self.info.device)[0]:
            # Nothing new since the checkpoint just resumed (or since step 0): no save.
            self.summary["stopped"] = signals.received or "signal on another rank"
            return self.summary
        if not (t.save_every or t.save_every_min):
            log.warning("no periodic checkpoint (trainer.save_every=0, trainer.save_every_min=0)"
                        ": a crash before step %d loses the whole run", t.max_steps)
        sinks = self._sinks()
        self.meter.reset()
        self.last_save = time.monotonic()
        window, n = torch.zeros((), device=self.info.device), 0
        health = Health(self.info.device, self.cfg.precision.dtype)
        while self.step < t.max_steps:
            distributed.mark(f"step {self.step + 1}")
            t0 = time.perf_counter()
            micro = [next(self.loader) for _ in range(t.grad_accum_steps)]
            wait = time.perf_counter() - t0
            loss, grad_norm, applied = self.engine.train_step(micro)
            self.step += 1
            self.tokens += self.tokens_per_step
            self.meter.update(self.tokens_per_step, self.samples_per_step, wait)
            health.update(loss, applied)
            window, n = window + loss, n + 1
            log_now = self.step % t.log_every == 0 or self.step in (1, t.max_steps)
            eval_now = (t.eval_every and self.step % t.eval_every == 0) or self.step == t.max_steps
            due = bool(t.save_every and self.step % t.save_every == 0)
            if not (log_now or eval_now or due or self.step % t.check_every == 0):
                continue  # a quiet step: nothing read back from the device
            # Rank 0's clock decides time-based saves: every rank must agree.
            due_by_time = self.info.is_main and t.save_every_min > 0 and \
                time.monotonic() - self.last_save >= 60 * t.save_every_min
            stop, due_by_time, streak = self._read_health(health, signals, due_by_time)
            due = due or due_by_time
            metrics: dict[str, Any] = {}
            if log_now:
                metrics.update(self._train_metrics(window / n, grad_norm))
                window, n = torch.zeros_like(window), 0
            if eval_now:
                metrics.update(self.evaluate())
            for s in sinks if metrics else []:
                s.log(self.step, metrics)
            # No checkpoint in a non-finite streak: the last one stays the last good one.
            if due and not stop and self.step < t.max_steps and streak == 0:
                self.save()  # a signal during it stops the run now, without another save
                stop = distributed.any_rank([signals.received is not None], self.info.device)[0]
            if stop:
                self.summary["stopped"] = signals.received or "signal on another rank"
                break
        self.save()
        self.loader.close()
        self.summary.update(data_skipped=self.loader.skipped,
                            final_loss=self.last_loss, final_val_loss=self.last_val,
                            tokens=self.tokens, steps=self.step,
                            wall_s=round(time.perf_counter() - start, 2))
        self._finish(sinks)
        return self.summary

    def _read_health(self, health: "Health", signals: type[StopSignals], due: bool
                     ) -> tuple[bool, bool, int]:
        """(stop, save due, current non-finite streak), agreed by every rank in one read.
        Too many non-finite steps in a row stop the run, keeping the last good checkpoint."""
        streak, worst, total, stop, due = health.read([signals.received is not None, due])
        if total > self.bad_steps:
            log.warning("step %d: %d more step(s) with a non-finite %s since step %d; updates "
                        "skipped (%d in a row now)", self.step, total - self.bad_steps,
                        "loss or gradient", health.read_at, streak)
            self.bad_steps = total
        health.read_at = self.step
        limit = self.cfg.trainer.max_bad_steps
        if worst >= limit:
            raise NonFiniteError(f"{worst} steps in a row had a non-finite loss or gradient "
                                 f"(trainer.max_bad_steps={limit}); the last good checkpoint "
                                 f"is kept in {self.ckpt_dir}")
        return bool(stop), bool(due), streak

    def _train_metrics(self, loss: torch.Tensor, grad_norm: torch.Tensor) -> dict[str, Any]:
        self.last_loss = distributed.all_reduce_mean(loss).item()
        skipped = self.loader.skipped
        if sum(skipped.values()) > self.data_skipped:
            # Empty documents are routine (the stdlib corpus has empty __init__.py files).
            if any(k != "empty" for k in skipped):
                log.warning("unusable documents skipped so far: %s", skipped)
            self.data_skipped = sum(skipped.values())
        return {"loss": self.last_loss, "lr": self.engine.lr, "grad_norm": float(grad_norm),
                "data_skipped": self.data_skipped,
                "tokens": self.tokens, "loss_scale": self.engine.loss_scale,
                "skipped_steps": self.engine.skipped_steps, "bad_steps": self.bad_steps,
                **self.meter.report()}

    def _sinks(self) -> list:
        if not self.info.is_main:
            return []
        sinks = build_sinks(self.cfg.logging, self.run_dir, self.cfg.trainer.max_steps,
                            self.step, dataclasses.asdict(self.cfg), self.wandb_id)
        self.wandb_id = next((s.run_id for s in sinks if hasattr(s, "run_id")), None)
        return sinks

    def sample(self) -> str | None:
        """A short GPT continuation of trainer.sample_prompt (every rank runs it: under
        ZeRO-3 each forward gathers parameters collectively)."""
        t = self.cfg.trainer
        if self.cfg.model.arch != "gpt" or t.sample_tokens == 0:
            return None
        ids = torch.tensor([self.tok.encode(t.sample_prompt).ids or [0]], device=self.info.device)
        gen = torch.Generator(device=self.info.device).manual_seed(t.seed)
        self.engine.module.eval()
        out = self.engine.module.generate(ids, t.sample_tokens, temperature=0.8, top_k=50,
                                          generator=gen)
        return self.tok.decode(out[0].tolist())

    def _finish(self, sinks: list) -> None:
        text = self.sample()
        if self.info.is_main:
            if text is not None:
                (self.run_dir / "sample.txt").write_text(text)
            write_summary(self.run_dir, self.summary)
            for s in sinks:
                s.close()
            if (self.run_dir / "metrics.jsonl").is_file():
                from lmforge.report import write_report  # matplotlib: only when needed

                write_report(self.run_dir / "metrics.jsonl", self.run_dir / "report.png")
            if text is not None:
                print(f"\n--- sample (step {self.step}) ---\n{text}\n---", flush=True)


def model_record(model: ModelConfig) -> dict[str, Any]:
    """What a checkpoint records of its model, and resume compares: the architecture. Not
    model.init_from, which says how the run started (checkpoints from before it existed
    still resume)."""
    record = dataclasses.asdict(model)
    record.pop("init_from")
    return record


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    """The resolved config (model.vocab_size filled in) as config.yaml."""
    from omegaconf import OmegaConf

    with writing(run_dir / "config.yaml"):
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def write_summary(run_dir: Path, summary: dict) -> None:
    with writing(run_dir / "summary.json"):
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
