"""The training loop: accumulation, eval, logging and checkpoint cadence, resume, the final
sample and summary. `build()` turns a validated config into a ready Trainer."""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import signal
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tokenizers import Tokenizer

from lmforge import checkpoint, distributed
from lmforge.config import ConfigError, TrainConfig, resolve_grad_accum
from lmforge.data.loader import BlockLoader
from lmforge.data.shards import ShardLoader, ShardSet, file_sha256, read_manifest
from lmforge.data.sources import iter_documents, load_stream
from lmforge.data.tokenizer import kind_for, load_tokenizer, special_ids, train_tokenizer
from lmforge.data.workers import WorkerLoader
from lmforge.distributed import DistInfo
from lmforge.engine import Engine, create_model, ds_config, to_universal
from lmforge.loggers import build_sinks
from lmforge.metrics import Throughput, flops_per_token, head_fraction, peak_tflops
from lmforge.models import build_model

log = logging.getLogger("lmforge")


def on_main(info: DistInfo, fn: Callable[[], Any]) -> None:
    """Run `fn` on rank 0 only; an error there is raised on every rank instead of a hang."""
    err = None
    if info.is_main:
        try:
            fn()
        except Exception as e:  # re-raised below, on every rank
            err = e
    err = distributed.broadcast_object(err)
    if err is not None:
        raise err


def shard_sources(cfg: TrainConfig) -> list[tuple[Path, float]]:
    """(shards dir, weight) of each pre-tokenized source; empty when tokenizing on the fly."""
    d = cfg.data
    if d.source == "shards":
        return [(Path(d.shards_dir), 1.0)]
    if d.source == "mixture" and d.sources[0].kind == "shards":
        return [(Path(s.shards), s.weight) for s in d.sources]
    return []


def build_tokenizer(cfg: TrainConfig, run_dir: Path, info: DistInfo, stream) -> Tokenizer:
    """The run's tokenizer.json: kept from an earlier run, copied from tokenizer.path or from
    the shards, or trained by rank 0 on the training split."""
    out = run_dir / "tokenizer.json"
    kind = kind_for(cfg.model.arch, cfg.tokenizer.kind)
    source = cfg.tokenizer.path
    shards = shard_sources(cfg)
    if shards:
        source = str(shards[0][0] / "tokenizer.json")
        want = read_manifest(shards[0][0])["tokenizer_sha256"]
        for d, _ in shards[1:]:
            if read_manifest(d)["tokenizer_sha256"] != want:
                raise ConfigError(f"the shards in {d} were made with another tokenizer than "
                                  f"those in {shards[0][0]}; prepare all with one tokenizer")
        for path in filter(None, [source, cfg.tokenizer.path]):
            if not Path(path).is_file() or file_sha256(Path(path)) != want:
                raise ConfigError(f"{path} is not the tokenizer the shards in "
                                  f"{shards[0][0]} were made with; leave tokenizer.path "
                                  "unset or re-run lmforge-prepare shards")

    def make() -> None:
        if source:
            load_tokenizer(source)  # fails clearly before copying
            shutil.copyfile(source, out)
        elif not out.is_file():
            t = time.perf_counter()
            texts = (d for _, d in iter_documents(stream, "train", cfg.data.val_percent))
            train_tokenizer(texts, kind, cfg.tokenizer.vocab_size,
                            cfg.tokenizer.train_max_chars).save(str(out))
            log.info("trained a %s tokenizer (vocab %d) in %.1fs", kind,
                     cfg.tokenizer.vocab_size, time.perf_counter() - t)

    on_main(info, make)
    return load_tokenizer(out)


def load_corpus(cfg: TrainConfig) -> tuple[Any, dict[str, Any]]:
    """(stream for on-the-fly tokenization or None for shards, description of the corpus)."""
    shards = shard_sources(cfg)
    if not shards:
        return load_stream(cfg.data, cfg.trainer.seed)
    parts = []
    for d, weight in shards:
        manifest = read_manifest(d)
        parts.append({"dir": str(d), "weight": weight,
                      "tokens": {s: v["tokens"] for s, v in manifest["splits"].items()},
                      "prepared_from": manifest["corpus"]})
    return None, {"source": "shards", "parts": parts}


def build_loaders(cfg: TrainConfig, info: DistInfo, tok: Tokenizer, stream: Any
                  ) -> tuple[WorkerLoader, Any]:
    """Training loader (read by data.num_workers processes) and validation loader, from
    shards or tokenizing `stream` on the fly."""
    t, d, arch = cfg.trainer, cfg.data, cfg.model.arch
    shards = shard_sources(cfg)
    if not shards:
        train, val = (BlockLoader(stream, tok, arch, d, t.micro_batch_size, info.rank,
                                  info.world_size, t.seed, split=split)
                      for split in ("train", "validation"))
        return WorkerLoader(train, d.num_workers), val
    specials = special_ids(tok, kind_for(arch))
    for root, _ in shards:
        manifest = read_manifest(root)
        if manifest["sep_id"] != specials["eos" if arch == "gpt" else "sep"]:
            raise ConfigError(f"the shards in {root} were prepared for a "
                              f"{manifest['kind']} tokenizer, not for model.arch={arch}")
    train, val = (ShardLoader([ShardSet(root, split) for root, _ in shards], arch, specials,
                              d.seq_len, t.micro_batch_size, info.rank, info.world_size, t.seed,
                              train=split == "train", mlm_probability=d.mlm_probability,
                              weights=[w for _, w in shards])
                  for split in ("train", "validation"))
    return WorkerLoader(train, d.num_workers), val


def model_state_gb(n_params: int, dtype: str, stage: int, world: int) -> float:
    """Model states per rank (ZeRO paper, Adam): weights, grads and optimizer bytes/param."""
    w, g, o = (4, 4, 8) if dtype == "fp32" else (2, 2, 12)
    o /= world if stage >= 1 else 1
    g /= world if stage >= 2 else 1
    w /= world if stage >= 3 else 1
    return n_params * (w + g + o) / 2**30


class NonFiniteError(RuntimeError):
    """Too many consecutive non-finite steps."""


class StopSignals:
    """SIGTERM and SIGUSR1 (Slurm's preemption warning) ask the loop to save and exit;
    Ctrl-C once does the same, twice aborts at once."""

    def __init__(self) -> None:
        self.received: str | None = None

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        log.warning("%s received: finishing this step, then saving and exiting", self.received)

    def __enter__(self) -> "StopSignals":
        self.previous = {s: signal.signal(s, self._handle)
                         for s in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, h in self.previous.items():
            signal.signal(s, h)


class Trainer:
    """Owns the loop; everything it needs is built by `build()`."""

    def __init__(self, cfg: TrainConfig, run_dir: Path, info: DistInfo, tok: Tokenizer,
                 engine: Engine, loader: WorkerLoader, val_batches: list,
                 summary: dict) -> None:
        self.cfg, self.run_dir, self.info, self.tok = cfg, run_dir, info, tok
        self.engine, self.loader, self.val_batches, self.summary = engine, loader, val_batches, summary
        self.ckpt_dir = run_dir / "checkpoints"
        t = cfg.trainer
        self.samples_per_step = t.micro_batch_size * t.grad_accum_steps * info.world_size
        self.tokens_per_step = self.samples_per_step * cfg.data.seq_len
        self.step, self.tokens, self.wandb_id = 0, 0, None
        self.last_loss, self.last_val, self.bad_steps = float("nan"), None, 0
        self.data_skipped = 0
        self.tokenizer_sha256 = checkpoint.sha256(run_dir / "tokenizer.json")
        self.meter = Throughput(summary["flops_per_token"], info.world_size,
                                peak_tflops(info.device, cfg.precision.dtype,
                                            cfg.logging.peak_tflops), info.device,
                                summary.get("hardware_flops_per_token"))

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
        explicit = self.cfg.trainer.resume_from
        if explicit:
            ckpt = Path(explicit)
            problem = checkpoint.verify(ckpt) if ckpt.is_dir() else "no such directory"
            if problem:
                raise ConfigError(f"trainer.resume_from={explicit}: {problem}")
        else:
            ckpt = checkpoint.latest_good(self.ckpt_dir)
            if ckpt is None:
                return
        saved, world = checkpoint.saved_world_size(ckpt), self.info.world_size
        regrid = saved != world
        by = f"{ckpt} was written by {saved} rank{'s' * (saved != 1)}"
        if regrid and not self.loader.layout_free:
            raise ConfigError(f"{by}, this run has {world}: on-the-fly data resumes only with "
                              f"the same number of ranks ({saved}); data=shards resumes with any")
        state = checkpoint.load_trainer_state(ckpt, 0 if regrid else self.info.rank)
        for key, now in [("model", dataclasses.asdict(self.cfg.model)),
                         ("tokenizer_sha256", self.tokenizer_sha256)]:
            if state[key] != now:
                raise ConfigError(f"{ckpt} was trained with a different {key.split('_')[0]}; "
                                  "resume it unchanged or start a new run (hydra.run.dir=...)")
        stage, saved_stage = self.cfg.parallel.zero_stage, checkpoint.saved_zero_stage(ckpt)
        if regrid and saved_stage not in (None, stage):
            raise ConfigError(f"{by} at ZeRO-{saved_stage}; with another number of ranks "
                              f"resume it at the same stage (parallel=zero{saved_stage})")
        if regrid and checkpoint.partitioned(ckpt):
            scratch = self.ckpt_dir / f"{checkpoint.UNIVERSAL_PREFIX}{ckpt.name}"
            universal = scratch / ckpt.name  # DeepSpeed also writes scratch/latest_universal

            def convert() -> None:
                t0 = time.perf_counter()
                for stale in self.ckpt_dir.glob(checkpoint.UNIVERSAL_PREFIX + "*"):
                    shutil.rmtree(stale)  # left by a killed resume
                scratch.mkdir(parents=True)
                try:
                    to_universal(ckpt, universal)
                except RuntimeError as e:
                    raise ConfigError(f"{by} at ZeRO-{stage}: {e}; resume it with {saved} "
                                      f"rank{'s' * (saved != 1)}") from None
                log.info("%s at ZeRO-%d, this run has %d: converted to a DeepSpeed universal "
                         "checkpoint in %.1fs", by, stage, world, time.perf_counter() - t0)

            try:
                on_main(self.info, convert)
                self.engine.load_universal(universal)
            finally:
                distributed.barrier()
                if self.info.is_main:
                    shutil.rmtree(scratch, ignore_errors=True)
        else:
            self.engine.load(ckpt.parent, ckpt.name)
        self.step, self.tokens, self.wandb_id = state["step"], state["tokens"], state["wandb_id"]
        self.loader.load_state_dict(state["loader"])
        if regrid:
            checkpoint.reseed(self.cfg.trainer.seed, self.step, self.info.rank)
            log.info("%s, this run has %d: the data continues at global sample %d; per-rank "
                     "RNG streams (dropout) restart from (seed, step, rank)", by, world,
                     state["loader"]["consumed"])
        else:
            checkpoint.set_rng_state(state["rng"])
        log.info("resumed from %s (step %d, %d tokens)", ckpt, self.step, self.tokens)

    def save(self) -> None:
        state = {"step": self.step, "tokens": self.tokens, "wandb_id": self.wandb_id,
                 "loader": self.loader.state_dict(), "model": dataclasses.asdict(self.cfg.model),
                 "tokenizer_sha256": self.tokenizer_sha256}
        path = checkpoint.save(self.engine, self.ckpt_dir, self.step, state, self.info.rank,
                               self.cfg.trainer.keep_last,
                               (self.run_dir / "config.yaml", self.run_dir / "tokenizer.json"))
        log.info("saved %s", path)

    def evaluate(self) -> dict[str, float]:
        if not self.val_batches:
            return {}
        loss = distributed.all_reduce_mean(self.engine.eval_loss(self.val_batches)).item()
        self.last_val = loss
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    def fit(self) -> dict[str, Any]:
        """Train to trainer.max_steps; returns the summary (`stopped` says why it ended early)."""
        t, start = self.cfg.trainer, time.perf_counter()
        self.resume()
        if self.info.is_main:  # after resume() accepted the checkpoint for this config
            write_config(self.run_dir, self.cfg)
        if self.step >= t.max_steps:
            log.info("already at step %d of trainer.max_steps=%d: nothing to do",
                     self.step, t.max_steps)
            return self.summary
        sinks = self._sinks()
        self.meter.reset()
        window, n, bad = torch.zeros((), device=self.info.device), 0, 0
        with StopSignals() as signals:
            while self.step < t.max_steps:
                t0 = time.perf_counter()
                micro = [next(self.loader) for _ in range(t.grad_accum_steps)]
                wait = time.perf_counter() - t0
                loss, grad_norm, applied = self.engine.train_step(micro)
                self.step += 1
                self.tokens += self.tokens_per_step
                self.meter.update(self.tokens_per_step, self.samples_per_step, wait)
                bad = self._check_finite(loss, applied, bad)
                window, n = window + loss, n + 1
                metrics: dict[str, Any] = {}
                if self.step % t.log_every == 0 or self.step in (1, t.max_steps):
                    metrics.update(self._train_metrics(window / n, grad_norm))
                    window, n = torch.zeros_like(window), 0
                if (t.eval_every and self.step % t.eval_every == 0) or self.step == t.max_steps:
                    metrics.update(self.evaluate())
                for s in sinks if metrics else []:
                    s.log(self.step, metrics)
                if distributed.any_rank(signals.received is not None, self.info.device):
                    self.summary["stopped"] = signals.received or "signal on another rank"
                    break
                # No checkpoint in a non-finite streak: the last one stays the last good one.
                if (t.save_every and self.step % t.save_every == 0 and self.step < t.max_steps
                        and bad == 0):
                    self.save()
            self.save()
        self.loader.close()
        self.summary.update(data_skipped=self.loader.skipped,
                            final_loss=self.last_loss, final_val_loss=self.last_val,
                            tokens=self.tokens, steps=self.step,
                            wall_s=round(time.perf_counter() - start, 2))
        self._finish(sinks)
        return self.summary

    def _check_finite(self, loss: torch.Tensor, applied: bool, bad: int) -> int:
        """Count consecutive steps whose loss or gradient was not finite (their updates
        were skipped); too many in a row stop the run, keeping the last good checkpoint."""
        finite = bool(torch.isfinite(distributed.all_reduce_mean(loss)).item())
        # fp16 overflow skips are loss scaling at work, not a broken run.
        if finite and (applied or self.cfg.precision.dtype == "fp16"):
            return 0
        self.bad_steps += 1
        log.warning("step %d: non-finite %s; update skipped (%d in a row)", self.step,
                    "loss" if not finite else "gradient", bad + 1)
        if bad + 1 >= self.cfg.trainer.max_bad_steps:
            raise NonFiniteError(f"{bad + 1} steps in a row had a non-finite loss or gradient "
                                 f"(trainer.max_bad_steps={self.cfg.trainer.max_bad_steps}); "
                                 f"the last good checkpoint is kept in {self.ckpt_dir}")
        return bad + 1

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


def write_config(run_dir: Path, cfg: TrainConfig) -> None:
    """The resolved config (model.vocab_size filled in) as config.yaml."""
    from omegaconf import OmegaConf

    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.structured(cfg)))


def write_summary(run_dir: Path, summary: dict) -> None:
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def build(cfg: TrainConfig, run_dir: Path, info: DistInfo) -> Trainer | None:
    """Tokenizer, model, summary, and (unless max_steps=0: a dry run) data and engine."""
    stream, corpus = load_corpus(cfg)
    tok = build_tokenizer(cfg, run_dir, info, stream)
    vocab = tok.get_vocab_size()
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {vocab}; raise it or leave it null")
    cfg.model = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size or vocab)
    cfg.trainer = dataclasses.replace(
        cfg.trainer, grad_accum_steps=resolve_grad_accum(cfg.trainer, info.world_size))
    dry = cfg.trainer.max_steps == 0
    t, p, dt = cfg.trainer, cfg.parallel, cfg.precision.dtype
    config = ds_config(p, cfg.precision, cfg.optim, t.micro_batch_size, t.grad_accum_steps,
                       info.world_size, info.device.type == "cuda")
    torch.manual_seed(t.seed)
    if dry:  # sized on the meta device: no memory, any size
        with torch.device("meta"):
            model = build_model(cfg.model)
    else:
        model = create_model(lambda: build_model(cfg.model), config, info.device)
    share = head_fraction(cfg.model, cfg.data.seq_len, cfg.data.mlm_probability)
    summary = {"n_params": model.num_params(),
               "n_params_non_embedding": model.num_params(non_embedding=True),
               "flops_per_token": flops_per_token(cfg.model, cfg.data.seq_len,
                                                  head_share=share),
               "world_size": info.world_size, "zero_stage": p.zero_stage, "dtype": dt,
               "vocab_size": cfg.model.vocab_size, "tokenizer_vocab_size": vocab,
               "seq_len": cfg.data.seq_len, "corpus": corpus,
               **({"hardware_flops_per_token": flops_per_token(
                   cfg.model, cfg.data.seq_len, recompute=True, head_share=share)}
                  if p.activation_checkpointing else {}),
               "model_state_gb_per_rank": round(model_state_gb(
                   model.num_params(), dt, p.zero_stage, info.world_size), 3)}
    if info.is_main:
        (run_dir / "ds_config.json").write_text(json.dumps(config, indent=2) + "\n")
        if dry:
            write_summary(run_dir, summary)
            write_config(run_dir, cfg)
    if dry:
        return None
    engine = Engine(model, config, cfg.optim, p.activation_checkpointing, t.max_steps,
                    info.world_size, info.device)
    summary["shard_fractions"] = engine.shard_fractions()  # this rank's (rank 0's) share
    if info.is_main:
        write_summary(run_dir, summary)
    loader, val = build_loaders(cfg, info, tok, stream)
    val_batches = [b for _, b in zip(range(t.eval_batches), val)]
    # Equal counts on every rank: ZeRO-3 forwards are collectives.
    val_batches = val_batches[:distributed.all_reduce_min(len(val_batches), info.device)]
    if not val_batches:
        log.warning("the validation split has no full batch: evaluation is off")
    return Trainer(cfg, run_dir, info, tok, engine, loader, val_batches, summary)
