"""Every hostile input gets one line or a counted skip: never a hang, a traceback or a
silent overwrite. One table of cases across config values, data files, hub sources, shards,
checkpoints, CLI arguments and the file system; each case does the hostile thing in a fresh
directory and returns what the user would see, which the one test checks against the
case's expectation (and README's bad-input section lists). Cases run in this process where
that tests the same code; in a subprocess (with a timeout) where the CLI path, a file-size
limit or a run directory is what is tested."""
from __future__ import annotations

import contextlib
import json
import re
import resource
import signal
import subprocess
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import pytest

from conftest import REPO, TINY, compose
from lmforge.config import ConfigError, DataConfig

TOOLS = ("lmforge-train:", "lmforge-prepare:", "lmforge-export:")
DEADLINE_S = 60  # no case may take longer: a hang fails, it does not stall the suite
GOOD = [f"document {i}: the quick brown fox jumps over the lazy dog {i}" for i in range(40)]


@dataclass
class Seen:
    """What the user sees: an exit code, the error output, and what was read or skipped."""
    code: int
    err: str = ""
    docs: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    info: dict = field(default_factory=dict)


@dataclass
class Case:
    run: Callable[["Ctx"], Seen]
    refused: tuple[str, ...] = ()  # exit 2 with one line holding each of these
    skipped: dict[str, int] | None = None  # exit 0, these skip counts
    check: Callable[[Seen, "Ctx"], None] | None = None  # anything else to assert
    slow: bool = False


@dataclass
class Ctx:
    tmp: Path
    capsys: pytest.CaptureFixture
    monkeypatch: pytest.MonkeyPatch


CASES: dict[str, Case] = {}


def case(name: str, **kw) -> Callable:
    def register(fn: Callable[[Ctx], Seen]) -> Callable[[Ctx], Seen]:
        CASES[name] = Case(fn, **kw)
        return fn
    return register


# ------------------------------------------------------------------------------- helpers

def in_process(fn: Callable[[], object]) -> Seen:
    """fn() as the CLIs see it: a ConfigError is exit code 2 and its message."""
    try:
        fn()
    except ConfigError as e:
        return Seen(2, f"lmforge-train: config error: {e}")
    return Seen(0)


def config(*overrides: str) -> Callable[[Ctx], Seen]:
    return lambda ctx: in_process(lambda: compose([*TINY, *overrides]))


def read(cfg: DataConfig) -> Seen:
    """The training documents of `cfg` and the skip counts, as the loader reads them."""
    from lmforge.data.sources import iter_documents, load_stream

    ds, info = load_stream(cfg)
    skipped: Counter = Counter()
    docs = [t for _, t in iter_documents(ds, "train", 0.0, skipped=skipped)]
    return Seen(0, docs=docs, skipped=dict(skipped), info=info)


def reading(cfg: DataConfig) -> Seen:
    got: list[Seen] = []
    refused = in_process(lambda: got.append(read(cfg)))
    return got[0] if got else refused


def prepare(ctx: Ctx, *argv: str) -> Seen:
    """`lmforge-prepare ARGV` in this process (its console-script entry point)."""
    from lmforge.prepare import cli

    ctx.monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # cli() sets it; undone after
    ctx.capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(list(argv))
    return Seen(e.value.code or 0, ctx.capsys.readouterr().err)


def export(ctx: Ctx, *argv: str) -> Seen:
    from lmforge.export import main

    ctx.capsys.readouterr()
    code = main(list(argv))
    return Seen(code, ctx.capsys.readouterr().err)


def cli(*argv: str, cwd: Path = REPO, limit_bytes: int | None = None,
        timeout: float = DEADLINE_S) -> Seen:
    """A console script in a subprocess (optionally under a file-size limit: a write past
    it fails with EFBIG, as on a full disk, since SIGXFSZ is ignored)."""
    def limited() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE,
                           (limit_bytes, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    proc = subprocess.run([sys.executable, "-m", *argv], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limited if limit_bytes else None)
    return Seen(proc.returncode, proc.stderr)


def train(run_dir: Path, *overrides: str, **kw) -> Seen:
    return cli("lmforge.train", f"hydra.run.dir={run_dir}", *TINY, *overrides, **kw)


@contextlib.contextmanager
def deadline(seconds: int) -> Iterator[None]:
    """An in-process case still running after `seconds` is a hang: fail it."""
    def expire(*_: object) -> None:
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def untouched(*paths: Path) -> Iterator[None]:
    """Every file under `paths` keeps its bytes (and no file appears or goes)."""
    def snapshot() -> dict[Path, bytes]:
        files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")))]
        return {f: f.read_bytes() for f in files if f.is_file()}

    before = snapshot()
    yield
    assert snapshot() == before, "a file the user had was changed"


def jsonl(path: Path, rows: list[object]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def one_word_folder(tmp: Path) -> Path:
    """20 MB of A/C/G/T without a single space: one pre-token of 20 M characters."""
    import random

    folder = tmp / "genome"
    folder.mkdir()
    table = bytes(b"ACGT"[i % 4] for i in range(256))
    (folder / "chr1.txt").write_bytes(random.Random(0).randbytes(20_000_000).translate(table))
    return folder


def fake_run(root: Path) -> Path:
    """A run directory with a real (tiny, stage-0) checkpoint that exports, no DeepSpeed."""
    import torch
    import yaml
    from tokenizers import Tokenizer, models

    from lmforge.config import ModelConfig
    from lmforge.models import build_model

    gpt = {"arch": "gpt", "n_layers": 1, "n_heads": 2, "d_model": 8, "max_seq_len": 16,
           "vocab_size": 3}
    ckpt = root / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump({"model": gpt, "trainer": {"seed": 1}}))
    Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1, "b": 2}, unk_token="a")).save(
        str(root / "tokenizer.json"))
    torch.save({"module": build_model(ModelConfig(**gpt)).state_dict()},
               ckpt / "mp_rank_00_model_states.pt")
    (root / "checkpoints" / "latest").write_text("step_00000001\n")
    return root


def fake_ckpt(ckpt_dir: Path, manifest: object) -> Path:
    ckpt = ckpt_dir / "step_00000001"
    ckpt.mkdir(parents=True)
    (ckpt / "trainer_rank0.pt").write_bytes(b"state")
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    return ckpt


# ------------------------------------------------------------------------- config values

for key, value, fix in [
        ("optim.beta1", "1.0", "[0, 1)"), ("optim.beta2", "-0.5", "[0, 1)"),
        ("optim.eps", "-1e-08", ">= 0"), ("model.dropout", "1.0", "[0, 1)"),
        ("model.d_ff", "-4", "> 0"), ("model.n_kv_heads", "-1", "> 0"),
        ("model.init_std", "-0.02", ">= 0"), ("tokenizer.train_max_chars", "0", "> 0")]:
    case(f"config-{key}", refused=(f"{key}={value}", fix))(config(f"{key}={value}"))


case("config-ds_extra-section-not-a-mapping",
     refused=("parallel.ds_extra.zero_optimization=5", "must be a mapping"))(
    config("+parallel.ds_extra={zero_optimization: 5}"))


@case("config-through-the-cli", refused=("lmforge-train: config error", "optim.beta1=1.5",
                                         "[0, 1)"))
def _(ctx: Ctx) -> Seen:
    return cli("lmforge.train", f"hydra.run.dir={ctx.tmp / 'run'}", "optim.beta1=1.5")


@case("config-ds_extra-deepspeed-rejects", slow=True,
      refused=("parallel.ds_extra", "zero_optimization.reduce_bucket_size=-1", "drop that key"))
def _(ctx: Ctx) -> Seen:  # DeepSpeed validates only at initialize: a real (1-step) run
    return train(ctx.tmp / "run", "trainer.max_steps=1",
                 "+parallel.ds_extra={zero_optimization: {reduce_bucket_size: -1}}")


# ----------------------------------------------------------------------------- data files

def no_fast(*overrides: str) -> list[str]:
    """TINY without the keys a case sets itself (Hydra refuses a key given twice)."""
    keys = {o.split("=")[0] for o in overrides}
    return [o for o in TINY if o.split("=")[0] not in keys]


@case("data-20mb-one-word-prepare-tokenizer", slow=True,
      check=lambda seen, ctx: (ctx.tmp / "tok.json").stat().st_size > 0)
def _(ctx: Ctx) -> Seen:  # the default vocab (8192) and sample (50 M chars): it hung > 500 s
    folder = one_word_folder(ctx.tmp)
    return cli("lmforge.prepare", "tokenizer", "--out", str(ctx.tmp / "tok.json"),
               "data=files", f"data.paths=[{folder}/*]")


@case("data-20mb-one-word-train", slow=True,
      check=lambda seen, ctx: (ctx.tmp / "run" / "summary.json").is_file())
def _(ctx: Ctx) -> Seen:
    folder = one_word_folder(ctx.tmp)
    keep = ("tokenizer.vocab_size=8192", "tokenizer.train_max_chars=50000000")
    return cli("lmforge.train", f"hydra.run.dir={ctx.tmp / 'run'}", *no_fast(*keep), *keep,
               "data=files", f"data.paths=[{folder}/*]", "trainer.max_steps=0")


@case("data-json-array-pretty-printed", skipped={"no_text_field": 2},
      check=lambda seen, ctx: seen.docs == GOOD[:5])
def _(ctx: Ctx) -> Seen:
    rows = [{"text": t} for t in GOOD[:5]] + [{"body": "no text"}, "a bare string"]
    (ctx.tmp / "data.json").write_text(json.dumps(rows, indent=2))
    return reading(DataConfig(source="files", paths=[str(ctx.tmp / "data.json")]))


@case("data-json-object-pretty-printed", skipped={},
      check=lambda seen, ctx: seen.docs == [GOOD[0]])
def _(ctx: Ctx) -> Seen:
    (ctx.tmp / "one.json").write_text(json.dumps({"text": GOOD[0], "id": 1}, indent=2))
    return reading(DataConfig(source="files", paths=[str(ctx.tmp / "one.json")]))


@case("data-jsonl-lines-that-are-no-objects", skipped={"no_text_field": 5, "bad_json": 1},
      check=lambda seen, ctx: seen.docs == GOOD[:3])
def _(ctx: Ctx) -> Seen:  # the first line an array: not to be taken for one JSON array
    path = jsonl(ctx.tmp / "odd.jsonl", [[1, 2], "a string", 42, {"text": None},
                                         {"text": 5}] + [{"text": t} for t in GOOD[:3]])
    with open(path, "a") as f:
        f.write('{"text": "cut off\n')
    return reading(DataConfig(source="files", paths=[str(path)]))


@case("data-binary-latin1-blank-utf16-files", skipped={"binary": 2, "not_utf8": 1,
                                                       "empty": 1},
      check=lambda seen, ctx: seen.docs == ["\n".join(GOOD)])
def _(ctx: Ctx) -> Seen:
    (ctx.tmp / "good.txt").write_text("\n".join(GOOD))
    (ctx.tmp / "nul.txt").write_bytes(b"\x00" * 100)
    (ctx.tmp / "utf16.txt").write_text("hello world", encoding="utf-16")
    (ctx.tmp / "latin1.txt").write_bytes("caf\xe9 na\xefve".encode("latin-1"))
    (ctx.tmp / "blank.txt").write_text(" \n\t\n")
    return reading(DataConfig(source="files", paths=[f"{ctx.tmp}/*.txt"]))


@case("data-overlapping-globs", skipped={},
      check=lambda seen, ctx: sorted(seen.docs) == sorted(GOOD[:2])
      and seen.info["duplicate_files"] == 1)
def _(ctx: Ctx) -> Seen:
    (ctx.tmp / "a").mkdir()
    (ctx.tmp / "a" / "x.txt").write_text(GOOD[0])
    (ctx.tmp / "a" / "y.txt").write_text(GOOD[1])
    return reading(DataConfig(source="files", paths=[f"{ctx.tmp}/a/*.txt",
                                                     f"{ctx.tmp}/a/x.txt"]))


@case("data-symlink-loops-and-aliases", skipped={},
      check=lambda seen, ctx: sorted(seen.docs) == sorted(GOOD[:2])
      and seen.info["duplicate_files"] >= 1)
def _(ctx: Ctx) -> Seen:  # two loops: glob's ** would walk 2**40 paths
    a = ctx.tmp / "a"
    (a / "sub").mkdir(parents=True)
    (a / "x.txt").write_text(GOOD[0])
    (a / "sub" / "y.txt").write_text(GOOD[1])
    (a / "sub" / "up").symlink_to("..")
    (a / "self").symlink_to(".")
    (a / "alias.txt").symlink_to("x.txt")
    return reading(DataConfig(source="files", paths=[f"{a}/**/*.txt"]))


@case("data-parquet-no-such-column", refused=("data.text_field='text'", "x.parquet",
                                              "body, n", "set data.text_field"))
def _(ctx: Ctx) -> Seen:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"body": GOOD, "n": list(range(len(GOOD)))}), ctx.tmp / "x.parquet")
    return reading(DataConfig(source="files", paths=[str(ctx.tmp / "x.parquet")]))


@case("data-parquet-column-not-text", refused=("data.text_field='n'", "int64", "not text"))
def _(ctx: Ctx) -> Seen:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": GOOD, "n": list(range(len(GOOD)))}), ctx.tmp / "x.parquet")
    return reading(DataConfig(source="files", paths=[str(ctx.tmp / "x.parquet")],
                              text_field="n"))


@case("data-parquet-file-that-is-not-parquet", refused=("bad.parquet", "not a readable "
                                                        "Parquet file", "data.paths"))
def _(ctx: Ctx) -> Seen:
    (ctx.tmp / "bad.parquet").write_text("\n".join(GOOD))
    return reading(DataConfig(source="files", paths=[str(ctx.tmp / "bad.parquet")]))


@case("data-jsonl-wrong-text-field-trains-no-tokenizer",
      refused=("no usable document", "no_text_field", "data.text_field"),
      check=lambda seen, ctx: not (ctx.tmp / "tok.json").exists())
def _(ctx: Ctx) -> Seen:  # every line skipped: was a tokenizer of the bare alphabet
    path = jsonl(ctx.tmp / "c.jsonl", [{"body": t} for t in GOOD])
    return prepare(ctx, "tokenizer", "--out", str(ctx.tmp / "tok.json"), "data=files",
                   f"data.paths=[{path}]", "tokenizer.vocab_size=300")


@case("data-every-document-skipped-with-a-given-tokenizer",
      refused=("no usable training document", "no_text_field", "data.text_field"))
def _(ctx: Ctx) -> Seen:  # no tokenizer to train: the loader is the first to find nothing
    from tokenizers import Tokenizer, models

    from lmforge.data.loader import BlockLoader
    from lmforge.data.sources import load_stream

    path = jsonl(ctx.tmp / "c.jsonl", [{"body": t} for t in GOOD])
    cfg = DataConfig(source="files", paths=[str(path)], seq_len=8)
    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "a": 1}, unk_token="a"))
    return in_process(lambda: next(BlockLoader(load_stream(cfg)[0], tok, "gpt", cfg, 2)))


# -------------------------------------------------------------------------- hub sources

def hub(ctx: Ctx, **kw: str) -> Seen:
    local = ctx.tmp / "dataset"  # a dataset directory: load_dataset reads it offline
    jsonl(local / "train.jsonl", [{"body": t, "id": i} for i, t in enumerate(GOOD)])
    return reading(DataConfig(**{"source": "hub", "hub_name": str(local), **kw}))


case("hub-unreachable-name", refused=("data.hub_name='nonexistent/xyz'", "check the name"))(
    lambda ctx: reading(DataConfig(source="hub", hub_name="nonexistent/xyz")))
case("hub-no-such-text-field", refused=("data.text_field='text'", "body, id",
                                        "set data.text_field"))(lambda ctx: hub(ctx))
case("hub-no-such-split", refused=("split 'validation'", "data.hub_split"))(
    lambda ctx: hub(ctx, hub_split="validation", text_field="body"))
case("hub-right-text-field-reads", skipped={},
     check=lambda seen, ctx: seen.docs == GOOD)(lambda ctx: hub(ctx, text_field="body"))


@case("hub-through-the-cli", slow=True,
      refused=("lmforge-train: config error", "nonexistent/xyz", "check the name"))
def _(ctx: Ctx) -> Seen:
    return train(ctx.tmp / "run", "data=hub", "data.hub_name=nonexistent/xyz",
                 "trainer.max_steps=0")


# ---------------------------------------------------------------------------------- shards

case("shards-verify-a-missing-directory", refused=("/no/such/shards", "not a directory",
                                                   "--out of lmforge-prepare shards"))(
    lambda ctx: prepare(ctx, "verify", "/no/such/shards"))


@case("shards-manifest-not-an-object", refused=("manifest.json", "not a shard manifest",
                                                "re-run lmforge-prepare shards"))
def _(ctx: Ctx) -> Seen:
    (ctx.tmp / "s").mkdir()
    (ctx.tmp / "s" / "manifest.json").write_text("[1, 2]")
    return prepare(ctx, "verify", str(ctx.tmp / "s"))


@case("shards-manifest-without-splits", refused=("manifest.json", "'splits'", "damaged",
                                                 "re-run lmforge-prepare shards"))
def _(ctx: Ctx) -> Seen:
    (ctx.tmp / "s").mkdir()
    (ctx.tmp / "s" / "manifest.json").write_text(json.dumps({
        "format": "lmforge-shards/1", "kind": "bpe", "vocab_size": 300, "dtype": "uint16",
        "sep_id": 0, "tokenizer_sha256": "0" * 64, "corpus": {}}))
    from lmforge.assembly import open_corpus  # what lmforge-train reads shards with

    return in_process(lambda: open_corpus(compose(["data=shards",
                                                   f"data.shards_dir={ctx.tmp / 's'}"])))


@case("shards-mistyped-tokenizer-path", refused=("--tokenizer", "typo.json", "does not exist"),
      check=lambda seen, ctx: not (ctx.tmp / "typo.json").exists()
      and not (ctx.tmp / "out").exists())
def _(ctx: Ctx) -> Seen:  # was: a new tokenizer trained and written to the typo
    path = jsonl(ctx.tmp / "c.jsonl", [{"text": t} for t in GOOD])
    return prepare(ctx, "shards", "--out", str(ctx.tmp / "out"), "--tokenizer",
                   str(ctx.tmp / "typo.json"), "data=files", f"data.paths=[{path}]")


@case("shards-existing-out", refused=("/out already exists", "choose another"))
def _(ctx: Ctx) -> Seen:
    (ctx.tmp / "out").mkdir()
    (ctx.tmp / "out" / "mine.txt").write_text("the user's")
    path = jsonl(ctx.tmp / "c.jsonl", [{"text": t} for t in GOOD])
    with untouched(ctx.tmp / "out"):
        return prepare(ctx, "shards", "--out", str(ctx.tmp / "out"), "data=files",
                       f"data.paths=[{path}]", "tokenizer.vocab_size=300")


@case("tokenizer-existing-out", refused=("tok.json", "already exists", "--force"))
def _(ctx: Ctx) -> Seen:
    (ctx.tmp / "tok.json").write_text('{"the user\'s": "tokenizer"}')
    path = jsonl(ctx.tmp / "c.jsonl", [{"text": t} for t in GOOD])
    with untouched(ctx.tmp / "tok.json"):
        return prepare(ctx, "tokenizer", "--out", str(ctx.tmp / "tok.json"), "data=files",
                       f"data.paths=[{path}]", "tokenizer.vocab_size=300")


def _replaced_by_a_tokenizer(seen: Seen, ctx: Ctx) -> None:
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(str(ctx.tmp / "tok.json")).get_vocab_size() == 300
    assert [p.name for p in ctx.tmp.iterdir() if p.name.startswith(".")] == []  # no temp left


@case("tokenizer-existing-out-with-force", skipped={}, check=_replaced_by_a_tokenizer)
def _(ctx: Ctx) -> Seen:
    (ctx.tmp / "tok.json").write_text("old")
    path = jsonl(ctx.tmp / "c.jsonl", [{"text": t} for t in GOOD])
    return prepare(ctx, "tokenizer", "--force", "--out", str(ctx.tmp / "tok.json"),
                   "data=files", f"data.paths=[{path}]", "tokenizer.vocab_size=300")


# ----------------------------------------------------------------------------- checkpoints

def resume_from(ckpt: Path) -> Seen:
    from lmforge.checkpoint import pick_checkpoint  # rank 0's resume decision

    return in_process(lambda: pick_checkpoint(ckpt.parent, str(ckpt), False))


def _skipped_at_auto_resume(seen: Seen, ctx: Ctx) -> None:
    from lmforge.checkpoint import latest_good

    assert latest_good(ctx.tmp / "checkpoints") is None  # skipped with its reason, no crash


case("checkpoint-manifest-without-file-list", check=_skipped_at_auto_resume,
     refused=("trainer.resume_from=", "step_00000001", "file list"))(
    lambda ctx: resume_from(fake_ckpt(ctx.tmp / "checkpoints", {"step": 1})))
case("checkpoint-manifest-entry-outside", check=_skipped_at_auto_resume,
     refused=("trainer.resume_from=", "bad entry", "../../etc/passwd"))(
    lambda ctx: resume_from(fake_ckpt(ctx.tmp / "checkpoints", {"step": 1, "files": {
        "../../etc/passwd": {"bytes": 1}}})))


# --------------------------------------------------------------------------- CLI arguments

@case("export-existing-out", refused=("hf", "already exists", "--force"))
def _(ctx: Ctx) -> Seen:
    run = fake_run(ctx.tmp / "run")
    (ctx.tmp / "hf").mkdir()
    (ctx.tmp / "hf" / "config.json").write_text("the user's")
    with untouched(ctx.tmp / "hf", run):
        return export(ctx, str(run), str(ctx.tmp / "hf"))


def _replaced_whole(seen: Seen, ctx: Ctx) -> None:
    names = sorted(p.name for p in (ctx.tmp / "hf").iterdir())
    assert names == ["config.json", "model.safetensors", "special_tokens_map.json",
                     "tokenizer.json", "tokenizer_config.json"]  # stale.bin is gone
    assert sorted(p.name for p in ctx.tmp.iterdir()) == ["hf", "run"]  # no temp left


@case("export-existing-out-with-force", skipped={}, check=_replaced_whole)
def _(ctx: Ctx) -> Seen:
    run = fake_run(ctx.tmp / "run")
    (ctx.tmp / "hf").mkdir()
    (ctx.tmp / "hf" / "stale.bin").write_text("from an earlier export")
    return export(ctx, str(run), str(ctx.tmp / "hf"), "--force")


@case("export-out-is-the-run", refused=("holds the run being exported", "outside it"))
def _(ctx: Ctx) -> Seen:
    run = fake_run(ctx.tmp / "run")
    with untouched(run):
        return export(ctx, str(run), str(run), "--force")


def _short_run_dir(seen: Seen, ctx: Ctx) -> None:
    (name,) = [p.name for p in (ctx.tmp / "outputs").iterdir()]
    assert len(name.encode()) <= 255 and re.fullmatch(r"gpt_tiny__[\w.=,+-]+-[0-9a-f]{10}", name)
    assert (ctx.tmp / "outputs" / name / "summary.json").is_file()


@case("run-dir-from-a-300-byte-override", slow=True, skipped={}, check=_short_run_dir)
def _(ctx: Ctx) -> Seen:  # the default run dir is derived from the overrides
    return cli("lmforge.train", *TINY, "trainer.max_steps=0",
               f"trainer.sample_prompt={'x' * 300}", cwd=ctx.tmp)


@case("run-dir-given-with-a-300-byte-name", refused=("hydra.run.dir", "300 bytes", "shorten"))
def _(ctx: Ctx) -> Seen:  # was Hydra's mkdir traceback, exit 1
    return cli("lmforge.train", f"hydra.run.dir={ctx.tmp / ('x' * 300)}", "trainer.max_steps=0")


# ----------------------------------------------------------------------------- file system

def peak_cache(ctx: Ctx, content: str) -> Seen:
    import torch

    from lmforge.metrics import peak_tflops

    ctx.monkeypatch.setenv("XDG_CACHE_HOME", str(ctx.tmp))
    (ctx.tmp / "lmforge").mkdir()
    (ctx.tmp / "lmforge" / "peak.json").write_text(content)
    assert peak_tflops(torch.device("cpu"), "fp32") > 0
    return Seen(0)


def _rewritten(seen: Seen, ctx: Ctx) -> None:
    cache = json.loads((ctx.tmp / "lmforge" / "peak.json").read_text())
    assert isinstance(cache, dict) and all(v > 0 for v in cache.values())


case("fs-cpu-peak-cache-not-json", skipped={}, check=_rewritten)(
    lambda ctx: peak_cache(ctx, '{"x86_64|2|2|2.13.0+cpu|torch.float32": 0.'))
case("fs-cpu-peak-cache-a-list", skipped={}, check=_rewritten)(
    lambda ctx: peak_cache(ctx, "[1, 2, 3]"))


@case("fs-full-writing-the-tokenizer", slow=True,
      refused=("lmforge-prepare: error", "cannot write", "tok.json", "free space"),
      check=lambda seen, ctx: sorted(p.name for p in ctx.tmp.iterdir()) == ["c.jsonl"])
def _(ctx: Ctx) -> Seen:  # a 4 KB file-size limit: the tokenizer (~20 KB) cannot be written
    path = jsonl(ctx.tmp / "c.jsonl", [{"text": t} for t in GOOD])
    return cli("lmforge.prepare", "tokenizer", "--out", str(ctx.tmp / "tok.json"), "data=files",
               f"data.paths=[{path}]", "tokenizer.vocab_size=300", limit_bytes=4096)


def full_disk(ctx: Ctx, name: str, *overrides: str) -> Seen:
    """A run whose `name` lies on a full disk: a link to /dev/full (every write: ENOSPC)."""
    if not Path("/dev/full").exists():
        pytest.skip("no /dev/full here")
    (ctx.tmp / "run").mkdir()
    (ctx.tmp / "run" / name).symlink_to("/dev/full")
    return train(ctx.tmp / "run", *overrides)


case("fs-full-writing-summary", slow=True,
     refused=("lmforge-train: error", "cannot write", "summary.json", "free space"))(
    lambda ctx: full_disk(ctx, "summary.json", "trainer.max_steps=0"))
case("fs-full-writing-metrics", slow=True,
     refused=("lmforge-train: error", "cannot write", "metrics.jsonl", "free space"))(
    lambda ctx: full_disk(ctx, "metrics.jsonl", "trainer.max_steps=1"))


# ------------------------------------------------------------------------------ the test

@pytest.mark.parametrize("name", [pytest.param(n, marks=[pytest.mark.slow] if c.slow else [])
                                  for n, c in CASES.items()])
def test_hostile_input(name: str, tmp_path: Path, capsys: pytest.CaptureFixture,
                       monkeypatch: pytest.MonkeyPatch) -> None:
    c = CASES[name]
    ctx = Ctx(tmp_path, capsys, monkeypatch)
    with deadline(DEADLINE_S):
        seen = c.run(ctx)
    assert "Traceback" not in seen.err, seen.err[-3000:]
    if c.refused:
        assert seen.code == 2, (seen.code, seen.err[-3000:])
        lines = [ln for ln in seen.err.splitlines() if ln.startswith(TOOLS)]
        assert len(lines) == 1, seen.err[-3000:]
        assert all(needle in lines[0] for needle in c.refused), (c.refused, lines[0])
    else:
        assert seen.code == 0, seen.err[-3000:]
        if c.skipped is not None:
            assert seen.skipped == c.skipped
    if c.check:
        assert c.check(seen, ctx) is not False


def test_the_table_covers_every_kind_of_input() -> None:
    kinds = Counter(name.split("-")[0] for name in CASES)
    assert len(CASES) >= 30, len(CASES)
    assert {"config", "data", "hub", "shards", "checkpoint", "export", "run", "fs"} <= set(kinds)


def test_the_embedded_corpus_reaches_the_tokenizer_trainer_unchanged() -> None:
    """The default tokenizer (so the default job's losses) is what it was before training
    bounded long runs: no stdlib document has a whitespace-free run that would be cut."""
    from lmforge.data.sources import iter_documents, load_stream
    from lmforge.data.tokenizer import training_pieces

    ds, _ = load_stream(DataConfig())
    texts = [t for _, t in iter_documents(ds, "train", 2.0)]
    assert len(texts) > 100
    assert all(training_pieces(t) == [t] for t in texts)


def test_long_runs_are_cut_and_bounded() -> None:
    from lmforge.data.tokenizer import RUN_BUDGET, RUN_CHARS, training_pieces

    text = "intro words " + "A" * (5 * RUN_BUDGET) + " outro " + "b" * (RUN_CHARS + 1)
    pieces = training_pieces(text)
    assert pieces[0] == "intro words " and " outro " in pieces
    runs = [p for p in pieces if p.strip() and set(p) <= {"A", "b"}]
    assert max(map(len, runs)) == RUN_CHARS  # no pre-token longer than this
    assert sum(map(len, runs)) == RUN_BUDGET  # the rest of this document's runs left out
    budget = [RUN_BUDGET]  # one training: the documents share it
    half = "A" * (RUN_BUDGET // 2 + RUN_CHARS)
    kept = [sum(len(p) for p in training_pieces(half, budget) if p.startswith("A"))
            for _ in range(3)]
    assert kept == [len(half), RUN_BUDGET - len(half), 0] and budget == [0]
    assert training_pieces("short words only\n" * 1000) == ["short words only\n" * 1000]
