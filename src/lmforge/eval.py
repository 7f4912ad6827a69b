"""`lmforge-eval PATH [overrides]`: the loss, perplexity and bits per byte of any model lmforge
reads (run, checkpoint, export, HF directory, hub name) on a run's validation split or on any
data.* source, per source and in all. On several ranks (torchrun) rank r evaluates blocks
r, r+world, ... of one global block sequence and the sums are reduced, so any number of ranks
gives the one-rank numbers.

bits_per_byte = (sum of the evaluated tokens' NLL in nats) / ln 2 / B, where B counts the
UTF-8 bytes of the text the evaluated (predicted) tokens stand for: for byte-level BPE
(GPT-2's, lmforge's) exactly the bytes of the documents those tokens encode; for other
tokenizers each token's surface text (WordPiece "##" dropped, SentencePiece "▁" a space,
<0xNN> one byte; spaces WordPiece drops are not counted). Special tokens (the end-of-text
between documents, BERT's [CLS]/[SEP]) count 0 bytes; their NLL is counted."""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from tokenizers import Tokenizer
from torch import nn

from lmforge.config import (ConfigError, DataConfig, TrainConfig, compose_dict, one_line,
                            single_source, to_schema)
from lmforge.data.packing import Packer, bert_batch_seeded, frame_for
from lmforge.data.shards import ShardSet, read_manifest
from lmforge.data.sources import iter_documents, load_stream
from lmforge.data.tokenizer import encode_documents, kind_for, special_ids
from lmforge.manifest import sha256
from lmforge.pretrained import Source, resolve_source

# Overrides that choose what is evaluated; data.seq_len, data.val_percent and
# data.mlm_probability tune how, trainer.eval_batches bounds it.
SOURCE_KEYS = {"data", "data.source", "data.paths", "data.format", "data.text_field",
               "data.hub_name", "data.hub_config", "data.hub_split", "data.shards_dir",
               "data.sources"}
OTHER_KEYS = {"trainer.micro_batch_size", "trainer.eval_batches", "trainer.seed"}


@dataclass
class Totals:
    """Sums over evaluated tokens; the only thing ranks reduce."""
    nll: float = 0.0  # nats
    tokens: int = 0
    bytes: int = 0

    def add(self, other: "Totals") -> None:
        self.nll, self.tokens, self.bytes = (self.nll + other.nll, self.tokens + other.tokens,
                                             self.bytes + other.bytes)

    def report(self) -> dict[str, Any]:
        loss = self.nll / self.tokens if self.tokens else float("nan")
        bpb = self.nll / math.log(2) / self.bytes if self.bytes else float("nan")
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bits_per_byte": bpb,
                "tokens": self.tokens, "bytes": self.bytes}


def token_bytes(tok: Tokenizer) -> np.ndarray:
    """UTF-8 bytes of the text each token id stands for (the module docstring's B)."""
    decoder = json.loads(tok.to_str()).get("decoder") or {}
    steps = [decoder, *decoder.get("decoders", [])]
    byte_level = any(d.get("type") == "ByteLevel" for d in steps)
    prefix = next((d.get("prefix", "##") for d in steps if d.get("type") == "WordPiece"), None)
    specials = {t.content for t in tok.get_added_tokens_decoder().values() if t.special}
    out = np.zeros(tok.get_vocab_size(), dtype=np.int64)
    for token, i in tok.get_vocab().items():
        if token in specials:
            continue
        if byte_level:  # each character of a byte-level token is one byte
            out[i] = len(token)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):  # SentencePiece byte fallback
            out[i] = 1
        else:
            text = token[len(prefix):] if prefix and token.startswith(prefix) else token
            out[i] = len(text.replace("\u2581", " ").encode())
    return out


def eval_config(src: Source, overrides: list[str]) -> tuple[TrainConfig, str]:
    """The config (data, micro batch, seed) evaluation reads, and the split: a run's own
    data or the default corpus give their validation split; a source named on the command
    line is evaluated whole (data.val_percent=P: its validation split), shards by their
    validation split. trainer.eval_batches bounds the blocks only when given."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parsed = OverridesParser.create().parse_overrides(overrides)
    keys = [o.key_or_group for o in parsed]
    for text, key in zip(overrides, keys):
        if not (key in SOURCE_KEYS | OTHER_KEYS or key.startswith("data.")):
            raise ConfigError(f"lmforge-eval takes data.* and {', '.join(sorted(OTHER_KEYS))} "
                              f"overrides, not {text!r}")
    d = compose_dict(overrides)
    named = bool(set(keys) & SOURCE_KEYS)
    if src.kind == "run" and not named:  # the run's own data, tuned by the data.* given
        run_dir = src.path.parent.parent
        path = next(p for p in (src.path / "config.yaml", run_dir / "config.yaml")
                    if p.is_file())
        d.data = OmegaConf.merge(OmegaConf.structured(DataConfig), OmegaConf.load(path).data)
        for o in parsed:
            OmegaConf.update(d, o.key_or_group, o.value(), merge=False)
    if "data.seq_len" not in keys:
        d.data.seq_len = min(d.data.seq_len, src.model.max_seq_len)
    d.model.init_from = src.given  # the source's architecture and tokenizer
    cfg = to_schema(d, [])
    if "trainer.eval_batches" not in keys:
        cfg.trainer.eval_batches = 0  # no bound
    split = "validation"
    if named and "data.val_percent" not in keys and not cfg.data.shard_sources():
        split, cfg.data.val_percent = "all", 0.0  # with 0% held out every document is "train"
    return cfg, split


def parts(d: DataConfig) -> list[tuple[str, DataConfig]]:
    """(name, single-source data config) of each source evaluated on its own."""
    if d.source != "mixture":
        name = {"embedded": "embedded", "files": ",".join(d.paths), "hub": d.hub_name or "",
                "shards": str(d.shards_dir)}[d.source]
        return [(name, d)]
    out, seen = [], set()
    for i, s in enumerate(d.sources):
        name = s.name or s.shards or s.hub_name or ",".join(s.files)
        name = f"{name}#{i}" if name in seen else name
        seen.add(name)
        out.append((name, single_source(d, s)))
    return out


def blocks(d: DataConfig, tok: Tokenizer, tok_path: Path, arch: str, split: str,
           seed: int) -> Iterator[np.ndarray]:
    """The global block sequence of one source: documents packed as training packs them
    (GPT: seq_len+1 tokens with end-of-text between documents; BERT: [CLS] ... [SEP])."""
    frame = frame_for(arch, d.seq_len, special_ids(tok, kind_for(arch)))
    if d.shard_sources():
        root = Path(d.shards_dir)
        if read_manifest(root)["tokenizer_sha256"] != sha256(tok_path):
            raise ConfigError(f"the shards in {root} were made with another tokenizer than "
                              f"the model's ({tok_path})")
        shards = ShardSet(root, "validation")
        for j in range(shards.n_tokens // frame.body_len):
            yield frame.wrap(shards.tokens(j * frame.body_len, frame.body_len))
        return
    stream, _ = load_stream(d, seed)
    docs = (text for _, text in iter_documents(stream, split, d.val_percent))
    packer = Packer(frame)
    while chunk := list(islice(docs, 32)):
        for ids in encode_documents(tok, chunk):
            yield from packer.add(ids)


@torch.no_grad()
def score(model: nn.Module, batch: list[tuple[int, np.ndarray]], tok: Tokenizer,
          nbytes: torch.Tensor, cfg: TrainConfig) -> Totals:
    """NLL, predicted tokens and their bytes of a batch of (global index, block)."""
    device = next(model.parameters()).device
    x = torch.from_numpy(np.stack([b for _, b in batch]))
    if model.cfg.arch == "gpt":
        labels = x[:, 1:]
        h = model.hidden(x[:, :-1].to(device))  # (B, T, D)
        head = model.lm_head
    else:
        s = special_ids(tok, "wordpiece")
        # Masks seeded by (seed, global block index): the same on any run and rank layout.
        b = bert_batch_seeded([blk for _, blk in batch], [(cfg.trainer.seed, j) for j, _ in batch],
                              s["mask"], tok.get_vocab_size(), [s["cls"], s["sep"], s["pad"]],
                              cfg.data.mlm_probability)
        labels = b["labels"]
        h = model.hidden(b["input_ids"].to(device), b["token_type_ids"].to(device))
        head = model.head
    nll = 0.0
    for row, want in zip(h, labels.to(device)):  # (T, V) logits one block at a time
        nll += float(F.cross_entropy(head(row).float(), want, reduction="sum").double())
    picked = labels[labels != -100]
    return Totals(nll, int(picked.numel()), int(nbytes[picked].sum()))


def evaluate(model: nn.Module, tok: Tokenizer, src: Source, cfg: TrainConfig, split: str,
             rank: int = 0, world: int = 1) -> dict[str, Totals]:
    """This rank's Totals per source: global blocks rank, rank+world, ... of each."""
    nbytes = torch.from_numpy(token_bytes(tok))
    t = cfg.trainer
    limit = t.eval_batches * t.micro_batch_size if t.eval_batches else None  # global blocks
    out = {}
    for name, d in parts(cfg.data):
        totals, batch = Totals(), []
        for j, block in enumerate(islice(blocks(d, tok, src.tokenizer, model.cfg.arch, split,
                                               t.seed), limit)):
            if j % world == rank:
                batch.append((j, block))
            if len(batch) == t.micro_batch_size:
                totals.add(score(model, batch, tok, nbytes, cfg))
                batch = []
        if batch:
            totals.add(score(model, batch, tok, nbytes, cfg))
        out[name] = totals
    return out


def reduce(per_source: dict[str, Totals]) -> dict[str, Totals]:
    """Sums over ranks (float64 NLL, exact integer counts)."""
    import torch.distributed as dist

    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return per_source
    t = torch.tensor([[s.nll, s.tokens, s.bytes] for s in per_source.values()],
                     dtype=torch.float64)
    dist.all_reduce(t)
    return {name: Totals(float(r[0]), int(r[1]), int(r[2]))
            for name, r in zip(per_source, t.tolist())}


def result(per_source: dict[str, Totals], src: Source, split: str, cfg: TrainConfig
           ) -> dict[str, Any]:
    total = Totals()
    for s in per_source.values():
        total.add(s)
    if total.tokens == 0:
        raise ConfigError(f"no full block of data.seq_len={cfg.data.seq_len} tokens in the "
                          f"{split} split of the data: give more text or a lower data.seq_len")
    return {**total.report(), "sources": {k: v.report() for k, v in per_source.items()},
            "split": split, "seq_len": cfg.data.seq_len, "path": src.given}


def print_table(res: dict[str, Any]) -> None:
    rows = list(res["sources"].items()) + ([("all", res)] if len(res["sources"]) > 1 else [])
    width = max(len("source"), *(len(name) for name, _ in rows))
    print(f"{'source':<{width}}  {'tokens':>12}  {'loss':>8}  {'ppl':>10}  {'bits/byte':>9}")
    for name, r in rows:
        print(f"{name:<{width}}  {r['tokens']:>12,}  {r['loss']:>8.4f}  {r['ppl']:>10.3f}  "
              f"{r['bits_per_byte']:>9.4f}")


def bad_input(e: BaseException) -> bool:
    """Our one-line errors, unreadable files, and Hydra's and OmegaConf's many error types."""
    return isinstance(e, (ValueError, OSError)) or \
        type(e).__module__.split(".")[0] in ("hydra", "omegaconf")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmforge-eval", description="Loss, perplexity and bits per byte of a model on a "
        "run's validation split (default) or on any data.* source; last stdout line: JSON.")
    parser.add_argument("path", help="a run or checkpoint directory, an lmforge export, an HF "
                        "model directory (GPT-2, Llama, BERT) or a hub name")
    parser.add_argument("overrides", nargs="*", help="data=... data.*=... (what to evaluate), "
                        "trainer.micro_batch_size, trainer.eval_batches (a bound: that many "
                        "batches of blocks per source), trainer.seed (BERT masks)")
    args = parser.parse_args(argv)
    from lmforge import distributed
    from lmforge.weights import load_model

    launched = int(distributed.launcher_env()["WORLD_SIZE"]) > 1
    info = distributed.setup() if launched else distributed.DistInfo(
        0, 1, 0, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    try:
        src = resolve_source(args.path)
        cfg, split = eval_config(src, args.overrides)
        model, tok, _ = load_model(src, str(info.device))
        res = result(reduce(evaluate(model, tok, src, cfg, split, info.rank, info.world_size)),
                     src, split, cfg)
    except Exception as e:
        if not bad_input(e):
            raise
        if info.is_main:
            print(f"lmforge-eval: error: {one_line(e)}", file=sys.stderr)
        return 2
    finally:
        if launched:
            distributed.teardown()
    if info.is_main:
        print_table(res)
        print(json.dumps(res), flush=True)
    return 0


def cli() -> None:
    from lmforge.distributed import exit_process

    # os._exit after flushing: a rank was seen to abort in C++ destructors once its process
    # group was gone (see distributed.exit_process).
    exit_process(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
