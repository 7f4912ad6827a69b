"""`lmforge-prepare`: train a tokenizer, or tokenize a corpus once into shards, reading the
same `data.*`, `tokenizer.*` and `model=` keys as lmforge-train.

  lmforge-prepare tokenizer --out tok.json data=files 'data.paths=[corpus/*.jsonl]'
  lmforge-prepare shards --out data/corpus [--tokenizer tok.json] data=files ...
  lmforge-prepare verify data/corpus
"""
from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from lmforge.config import ConfigError, TrainConfig, compose, one_line, writing

def _train_tokenizer(cfg: TrainConfig, out: Path) -> None:
    from collections import Counter

    from lmforge.data.sources import iter_documents, load_stream
    from lmforge.data.tokenizer import kind_for, save_tokenizer, train_tokenizer

    stream, _ = load_stream(cfg.data, cfg.trainer.seed)
    skipped: Counter = Counter()
    texts = (d for _, d in iter_documents(stream, "train", cfg.data.val_percent, skipped=skipped))
    tok = train_tokenizer(texts, kind_for(cfg.model.arch, cfg.tokenizer.kind),
                          cfg.tokenizer.vocab_size, cfg.tokenizer.train_max_chars, skipped)
    save_tokenizer(tok, out)


def _documents(cfg: TrainConfig):
    """(split, text) for every non-empty document, in stream order, in one pass."""
    from collections import Counter

    from lmforge.data.sources import is_validation, iter_examples, load_stream, skip_reason

    stream, info = load_stream(cfg.data, cfg.trainer.seed)
    info["skipped"] = Counter()

    def gen():
        for ex in iter_examples(stream):
            reason = skip_reason(ex)
            if reason:
                info["skipped"][reason] += 1
                continue
            text = ex["text"]
            yield ("validation" if is_validation(text, cfg.data.val_percent) else "train"), text
    return gen(), info


def cmd_tokenizer(args: argparse.Namespace, cfg: TrainConfig) -> None:
    out = Path(args.out)
    if out.is_dir() or (out.exists() and not args.force):
        raise ConfigError(f"--out {out} already exists; choose another path" + (
            "" if out.is_dir() else " or pass --force to replace it"))
    with writing(out.parent):
        out.parent.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    _train_tokenizer(cfg, out)
    print(f"wrote {out} ({time.perf_counter() - t:.1f}s)")


def cmd_shards(args: argparse.Namespace, cfg: TrainConfig) -> None:
    from lmforge.data.shards import write_shards
    from lmforge.data.tokenizer import kind_for, load_tokenizer, special_ids

    if cfg.data.shard_sources():
        raise ConfigError("data.source=shards reads shards; prepare from embedded, files or hub")
    kind = kind_for(cfg.model.arch, cfg.tokenizer.kind)
    if Path(args.out).exists():  # said now, not after training a tokenizer
        raise ConfigError(f"{args.out} already exists; remove it or choose another "
                          "output directory")
    given = args.tokenizer or cfg.tokenizer.path
    if args.tokenizer and not Path(args.tokenizer).is_file():
        raise ConfigError(f"--tokenizer {args.tokenizer} does not exist; point it at a "
                          "tokenizer.json, or leave --tokenizer out to train one")
    if given:  # a mistyped path is an error, as in lmforge-train, never a new tokenizer there
        load_tokenizer(given)
    with tempfile.TemporaryDirectory() as tmp:
        tok_path = Path(given or Path(tmp) / "tokenizer.json")
        if not given:
            _train_tokenizer(cfg, tok_path)
        ids = special_ids(load_tokenizer(tok_path), kind)
        docs, corpus = _documents(cfg)
        m = write_shards(docs, tok_path, Path(args.out), ids["eos" if kind == "bpe" else "sep"],
                         kind, corpus, args.shard_tokens)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10
    tokens = sum(s["tokens"] for s in m["splits"].values())
    print(f"wrote {args.out}: " + ", ".join(
        f"{s} {v['tokens']:,} tokens / {v['docs']:,} docs / {len(v['shards'])} shards"
        for s, v in m["splits"].items())
        + f"; {tokens / max(m['wall_s'], 1e-9):,.0f} tokens/s, peak RSS {rss:,.0f} MiB"
        + (f"; skipped {dict(m['corpus']['skipped'])}" if m["corpus"]["skipped"] else ""))


def cmd_verify(args: argparse.Namespace) -> int:
    from lmforge.data.shards import verify_shards

    if not Path(args.dir).is_dir():
        raise ConfigError(f"{args.dir} is not a directory; pass the --out of lmforge-prepare "
                          "shards")
    problems = verify_shards(Path(args.dir))
    for p in problems:
        print(p, file=sys.stderr)
    if not problems:
        print(f"{args.dir}: every shard matches its manifest")
    return 1 if problems else 0


def cli(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lmforge-prepare", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("tokenizer", help="train a tokenizer.json on a bounded corpus sample")
    p.add_argument("--out", required=True)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p = sub.add_parser("shards", help="tokenize a corpus into memory-mapped shards")
    p.add_argument("--out", required=True, help="a new directory")
    p.add_argument("--tokenizer", help="tokenizer.json to use (default: tokenizer.path, "
                   "else one is trained and stored with the shards)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000)
    p.add_argument("--threads", type=int, default=0, help="tokenizer threads (0 = all cores)")
    p = sub.add_parser("verify", help="re-hash every shard against its manifest")
    p.add_argument("dir")
    args, overrides = parser.parse_known_args(argv)
    if args.cmd == "verify":
        sys.exit(_one_line_errors(lambda: cmd_verify(args)))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    # The tokenizers library parallelises encode_batch over its own thread pool.
    os.environ["TOKENIZERS_PARALLELISM"] = "true"
    if getattr(args, "threads", 0):
        os.environ["RAYON_NUM_THREADS"] = str(args.threads)
    try:
        cfg = compose(overrides)
    except Exception as e:  # Hydra's and OmegaConf's many error types: one line each
        print(f"lmforge-prepare: config error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
    cmd = cmd_tokenizer if args.cmd == "tokenizer" else cmd_shards
    sys.exit(_one_line_errors(lambda: cmd(args, cfg)))


def _one_line_errors(run) -> int:
    """run()'s exit code; bad input or an unwritable output is one line and exit code 2."""
    try:
        return run() or 0
    except (ConfigError, OSError) as e:
        print(f"lmforge-prepare: error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    cli()
