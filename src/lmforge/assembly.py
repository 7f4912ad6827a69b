"""Assembly: a validated config -> the corpus, tokenizer, loaders, model, engine and the
run's summary, handed to a Trainer. Each component gets its own sub-config."""
from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from tokenizers import Tokenizer

from lmforge import distributed
from lmforge.config import (ConfigError, DataConfig, TrainConfig, pad_vocab, resolve_grad_accum,
                            single_source, source_names, writing)
from lmforge.data.loader import BlockLoader, reader_scheme
from lmforge.data.shards import ShardLoader, ShardSet, read_manifest
from lmforge.data.sources import iter_documents, load_stream
from lmforge.data.tokenizer import (kind_for, load_tokenizer, save_tokenizer, special_ids,
                                    train_tokenizer)
from lmforge.data.workers import WorkerLoader
from lmforge.distributed import DistInfo
from lmforge.engine import Engine, check_precision, create_model, ds_config
from lmforge.metrics import flops_per_token, head_fraction, model_state_gb
from lmforge.models import build_model
from lmforge.manifest import sha256
from lmforge.pretrained import resolve_source
from lmforge.weights import copy_weights, load_weights
from lmforge.plan import check_fits
from lmforge.checkpoint import claim_run_dir, release_run_dir  # noqa: F401 (train.py's)
from lmforge.trainer import Trainer, write_config, write_summary

log = logging.getLogger("lmforge")


@dataclass
class Corpus:
    """The training corpus: a stream tokenized on the fly, or pre-tokenized shard sets
    (each root with its weight and its manifest, read once here)."""
    stream: Any = None
    shards: list[tuple[Path, float, dict[str, Any]]] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def open_corpus(cfg: TrainConfig) -> Corpus:
    return open_data(cfg.data, cfg.trainer.seed)


def open_data(d: DataConfig, seed: int) -> Corpus:
    roots = d.shard_sources()
    if not roots:
        stream, info = load_stream(d, seed)
        return Corpus(stream=stream, info=info)
    shards = [(Path(r), w, read_manifest(Path(r))) for r, w in roots]
    parts = [{"dir": str(r), "weight": w,
              "tokens": {s: v["tokens"] for s, v in m["splits"].items()},
              "prepared_from": m["corpus"]} for r, w, m in shards]
    return Corpus(shards=shards, info={"source": "shards", "parts": parts})


@dataclass
class ValSet:
    """A set logged as val/<name>_loss: a mixture source's validation split, or an eval set
    read whole (`split` "all"; shards: their validation split, fixed by lmforge-prepare)."""
    name: str
    data: DataConfig
    split: str
    corpus: Corpus


def open_val_sets(cfg: TrainConfig) -> list[ValSet]:
    """Each mixture source alone, then each of trainer.eval_sets; opened (files resolved,
    manifests read) at start, so a missing file stops the run before the model is built."""
    d, seed, out = cfg.data, cfg.trainer.seed, []
    if d.source == "mixture":
        for name, s in zip(source_names(d.sources), d.sources):
            one = single_source(d, s)
            out.append(ValSet(name, one, "validation", open_data(one, seed)))
    for i, s in enumerate(cfg.trainer.eval_sets):
        # Held out by construction: no document is set aside by the content hash.
        one = dataclasses.replace(single_source(d, s), val_percent=0.0)
        try:
            out.append(ValSet(str(s.name), one, "all", open_data(one, seed)))
        except ConfigError as e:  # errors name data.* keys: say which eval set's
            where = f"trainer.eval_sets[{i}]"
            raise ConfigError(re.sub(r"\bdata\.(?=(paths|format|text_field|hub_\w+|"
                                     r"shards_dir)\b)", f"{where}.", str(e))) from None
    return out


def _shards_tokenizer(cfg: TrainConfig, corpus: Corpus) -> str:
    """The tokenizer every shard set was made with (and tokenizer.path, if set, must be it)."""
    first, _, manifest = corpus.shards[0]
    want = manifest["tokenizer_sha256"]
    for d, _, m in corpus.shards[1:]:
        if m["tokenizer_sha256"] != want:
            raise ConfigError(f"the shards in {d} were made with another tokenizer than "
                              f"those in {first}; prepare all with one tokenizer")
    source = str(first / "tokenizer.json")
    for path in filter(None, [source, cfg.tokenizer.path]):
        if not Path(path).is_file() or sha256(Path(path)) != want:
            raise ConfigError(f"{path} is not the tokenizer the shards in {first} were made "
                              "with; leave tokenizer.path unset or re-run lmforge-prepare shards")
    return source


def build_tokenizer(cfg: TrainConfig, run_dir: Path, info: DistInfo, corpus: Corpus
                    ) -> Tokenizer:
    """The run's tokenizer.json: kept from an earlier run, copied from tokenizer.path or from
    the shards, or trained by rank 0 on the training split."""
    out = run_dir / "tokenizer.json"
    kind = kind_for(cfg.model.arch, cfg.tokenizer.kind)
    source = _shards_tokenizer(cfg, corpus) if corpus.shards else cfg.tokenizer.path

    def make() -> None:
        if source:
            load_tokenizer(source)  # fails clearly before copying
            shutil.copyfile(source, out)
        elif not out.is_file():
            t = time.perf_counter()
            skipped: Counter = Counter()
            texts = (d for _, d in iter_documents(corpus.stream, "train", cfg.data.val_percent,
                                                  skipped=skipped))
            save_tokenizer(train_tokenizer(texts, kind, cfg.tokenizer.vocab_size,
                                           cfg.tokenizer.train_max_chars, skipped), out)
            log.info("trained a %s tokenizer (vocab %d) in %.1fs", kind,
                     cfg.tokenizer.vocab_size, time.perf_counter() - t)

    distributed.on_main(info, make)
    return load_tokenizer(out)


def build_loaders(cfg: TrainConfig, info: DistInfo, tok: Tokenizer, corpus: Corpus
                  ) -> tuple[WorkerLoader, Any]:
    """Training loader (read by data.num_workers processes) and validation loader."""
    t, d, arch = cfg.trainer, cfg.data, cfg.model.arch
    pin = info.device.type == "cuda"  # asynchronous host-to-GPU copies of the batches
    if not corpus.shards:
        mixture = corpus.info.get("source") == "mixture"
        train, val = (BlockLoader(corpus.stream, tok, arch, d, t.micro_batch_size, info.rank,
                                  info.world_size, t.seed, split=split,
                                  assign_files=not mixture)
                      for split in ("train", "validation"))
        scheme, why = reader_scheme(corpus.stream.n_shards,
                                    info.world_size * max(1, d.num_workers), not mixture)
        if info.is_main:
            log.info("on-the-fly training data: %s (%s)", {
                "files": "each reader reads only its own files",
                "documents": "every reader streams the corpus and keeps its share of documents",
            }[scheme], why)
        return WorkerLoader(train, d.num_workers, pin_memory=pin), val
    check_shards(corpus, tok, arch)
    return WorkerLoader(shard_loader(cfg, info, tok, d, corpus, "train"), d.num_workers,
                        pin_memory=pin), \
        shard_loader(cfg, info, tok, d, corpus, "validation")


def check_shards(corpus: Corpus, tok: Tokenizer, arch: str) -> None:
    specials = special_ids(tok, kind_for(arch))
    for root, _, manifest in corpus.shards:
        if manifest["sep_id"] != specials["eos" if arch == "gpt" else "sep"]:
            raise ConfigError(f"the shards in {root} were prepared for a "
                              f"{manifest['kind']} tokenizer, not for model.arch={arch}")


def shard_loader(cfg: TrainConfig, info: DistInfo, tok: Tokenizer, d: DataConfig,
                 corpus: Corpus, split: str) -> ShardLoader:
    t, arch = cfg.trainer, cfg.model.arch
    return ShardLoader([ShardSet(root, split, m) for root, _, m in corpus.shards], arch,
                       special_ids(tok, kind_for(arch)), d.seq_len, t.micro_batch_size,
                       info.rank, info.world_size, t.seed, train=split == "train",
                       mlm_probability=d.mlm_probability,
                       weights=[w for _, w, _ in corpus.shards])


def val_set_batches(cfg: TrainConfig, info: DistInfo, tok: Tokenizer, tok_sha256: str,
                    sets: list[ValSet]) -> dict[str, list]:
    """name -> the set's first trainer.eval_batches batches, read once, as val_batches are."""
    t, arch, out = cfg.trainer, cfg.model.arch, {}
    for s in sets:
        if s.corpus.shards:
            check_shards(s.corpus, tok, arch)
            for root, _, m in s.corpus.shards:
                if m["tokenizer_sha256"] != tok_sha256:
                    raise ConfigError(f"the shards in {root} (val/{s.name}_loss) were made "
                                      "with another tokenizer than this run's")
            val = shard_loader(cfg, info, tok, s.data, s.corpus, "validation")
        else:
            val = BlockLoader(s.corpus.stream, tok, arch, s.data, t.micro_batch_size,
                              info.rank, info.world_size, t.seed, split=s.split)
        out[s.name] = fixed_batches(val, t.eval_batches, info.device)
        if not out[s.name]:
            log.warning("%s has no full batch of data.seq_len=%d tokens: val/%s_loss is not "
                        "logged", s.name, s.data.seq_len, s.name)
    return {name: batches for name, batches in out.items() if batches}


def fixed_batches(loader: Any, n: int, device: torch.device) -> list:
    """The first n batches, as many on every rank (ZeRO-3 forwards are collectives)."""
    batches = [b for _, b in zip(range(n), loader)]
    return batches[:distributed.all_reduce_min(len(batches), device)]


def pretrained_loader(cfg: TrainConfig, info: DistInfo
                      ) -> Callable[[torch.nn.Module, Any], None]:
    """Fills a model with model.init_from's weights. They are read and checked (names, shapes)
    on rank 0 first, so a bad source stops every rank before any collective; under ZeRO-3 only
    rank 0 holds them (the gathered tensor it writes is what every partition receives)."""
    source = resolve_source(str(cfg.model.init_from))
    read: dict[str, Any] = {}
    distributed.on_main(info, lambda: read.update(weights=load_weights(source)))
    if not info.is_main and cfg.parallel.zero_stage != 3:
        read["weights"] = load_weights(source)
    log.info("model.init_from=%s: %s weights from %s", cfg.model.init_from, source.family,
             source.path)
    return lambda model, gather: copy_weights(model, read.get("weights"), gather)


def summarize(cfg: TrainConfig, model: torch.nn.Module, info: DistInfo, vocab: int,
              corpus: Corpus) -> dict[str, Any]:
    """summary.json's opening: sizes, FLOPs per token, layout, corpus fingerprint."""
    p, dt, seq = cfg.parallel, cfg.precision.dtype, cfg.data.seq_len
    share = head_fraction(cfg.model, seq, cfg.data.mlm_probability)
    n = model.num_params()
    summary = {"n_params": n, "n_params_non_embedding": model.num_params(non_embedding=True),
               "flops_per_token": flops_per_token(cfg.model, seq, head_share=share),
               "world_size": info.world_size, "zero_stage": p.zero_stage, "dtype": dt,
               "vocab_size": cfg.model.vocab_size, "tokenizer_vocab_size": vocab,
               "seq_len": seq, "corpus": corpus.info}
    if cfg.model.init_from:
        summary["init_from"] = resolve_source(cfg.model.init_from).describe()
    if p.activation_checkpointing:
        summary["hardware_flops_per_token"] = flops_per_token(cfg.model, seq, recompute=True,
                                                              head_share=share)
    summary["model_state_gb_per_rank"] = round(model_state_gb(n, dt, p.zero_stage,
                                                              info.world_size), 3)
    return summary


def no_validation_line(cfg: TrainConfig, val: Any, world_size: int, corpus: dict) -> str:
    """Why a run has no val_loss and how to get one, in one line (`corpus`: its info)."""
    d, t = cfg.data, cfg.trainer
    batch = f"one batch (trainer.micro_batch_size x data.seq_len = {t.micro_batch_size} x " \
            f"{d.seq_len} tokens per rank)"
    if not isinstance(val, BlockLoader):
        return (f"no evaluation (no val_loss): the shards' validation split holds less than "
                f"{batch}; prepare them with a higher data.val_percent or more data")
    if d.val_percent == 0:
        return "no evaluation (no val_loss): data.val_percent=0 holds out no documents"
    held = f" holds {val.next_doc} document(s), less than" if world_size == 1 else " is under"
    more = {"file": "data.text_split=paragraph", "paragraph": "a lower data.doc_max_chars"
            }.get(corpus.get("text_split"), "more data")  # what makes more documents here
    return (f"no evaluation (no val_loss): the validation split (data.val_percent="
            f"{d.val_percent:g}% of the documents, by content hash){held} {batch}; raise "
            f"data.val_percent or make more documents ({more})")


def build(cfg: TrainConfig, run_dir: Path, info: DistInfo) -> Trainer | None:
    """Tokenizer, model, summary, and (unless max_steps=0: a dry run) data and engine."""
    check_precision(cfg.precision.dtype, info.device)
    log.info("run dir %s, world size %d, device %s (trainer.device=%s)", run_dir,
             info.world_size, info.device, cfg.trainer.device)
    claim_run_dir(run_dir, info)
    corpus = open_corpus(cfg)
    val_sets = open_val_sets(cfg)
    tok = build_tokenizer(cfg, run_dir, info, corpus)
    vocab = tok.get_vocab_size()
    if cfg.model.vocab_size is not None and cfg.model.vocab_size < vocab:
        raise ConfigError(f"model.vocab_size={cfg.model.vocab_size} is smaller than the "
                          f"tokenizer's {vocab}; raise it or leave it null")
    cfg.model = dataclasses.replace(cfg.model,
                                    vocab_size=cfg.model.vocab_size or pad_vocab(vocab))
    cfg.trainer = dataclasses.replace(
        cfg.trainer, grad_accum_steps=resolve_grad_accum(cfg.trainer, info.world_size))
    t, dry = cfg.trainer, cfg.trainer.max_steps == 0
    engine_cfg = ds_config(cfg.parallel, cfg.precision, cfg.optim, t.micro_batch_size,
                           t.grad_accum_steps, info.world_size, info.device.type == "cuda",
                           cfg.model.d_model)
    if not dry:  # a run predicted not to fit is refused before anything is allocated
        check_fits(cfg, engine_cfg["zero_optimization"], info.device, info.world_size)
    torch.manual_seed(t.seed)
    if dry:  # sized on the meta device: no memory, any size
        with torch.device("meta"):
            model = build_model(cfg.model)
    else:
        load = pretrained_loader(cfg, info) if cfg.model.init_from else None
        model = create_model(lambda: build_model(cfg.model), engine_cfg, cfg.parallel,
                             info.device, load)
    summary = summarize(cfg, model, info, vocab, corpus)
    if info.is_main:
        with writing(run_dir / "ds_config.json"):
            (run_dir / "ds_config.json").write_text(json.dumps(engine_cfg, indent=2) + "\n")
        if dry:
            write_summary(run_dir, summary)
            write_config(run_dir, cfg)
    if dry:
        log.info("trainer.max_steps=0: wrote %s and stopped (dry run)", run_dir / "summary.json")
        return None
    engine = Engine(model, engine_cfg, cfg.optim, cfg.parallel, cfg.precision, t.max_steps,
                    info.world_size, info.device, compile_blocks=t.compile)
    summary["shard_fractions"] = engine.shard_fractions()  # this rank's (rank 0's) share
    if info.is_main:
        write_summary(run_dir, summary)
    loader, val = build_loaders(cfg, info, tok, corpus)
    val_batches = fixed_batches(val, t.eval_batches, info.device)
    named = val_set_batches(cfg, info, tok, sha256(run_dir / "tokenizer.json"), val_sets)
    if not val_batches:
        warn = log.info if cfg.data.val_percent == 0 else log.warning  # 0: asked for
        line = no_validation_line(cfg, val, info.world_size, corpus.info)
        warn(line + ("; the named validation sets are still evaluated" if named else ""))
    return Trainer(cfg, run_dir, info, tok, engine, loader, val_batches, summary, named)
