"""Bad input never gives a silent wrong batch or a hang: unusable documents (empty files,
binary files, bytes that are not UTF-8, JSONL lines that are not JSON or lack the text
field) are skipped and counted; a wrong path is one clear line; a 50 MB line streams in
bounded memory. (Damaged shards: test_shards.py.)"""
from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from conftest import REPO, TINY, read_metrics, run_train, write_jsonl
from lmforge.config import ConfigError, DataConfig
from lmforge.data.sources import iter_documents, load_stream

GOOD = [f"document {i}: the quick brown fox jumps over the lazy dog {i}" for i in range(60)]


def documents(cfg: DataConfig) -> tuple[list[str], Counter, dict]:
    ds, info = load_stream(cfg)
    skipped: Counter = Counter()
    return [t for _, t in iter_documents(ds, "train", 0.0, skipped=skipped)], skipped, info


@pytest.fixture
def dirty_jsonl(tmp_path: Path) -> Path:
    d = tmp_path / "jsonl"
    d.mkdir()
    with open(d / "a.jsonl", "wb") as f:
        for i, text in enumerate(GOOD):
            f.write(json.dumps({"text": text}).encode() + b"\n")
            if i == 10:
                f.write(b'{"text": "cut off\n')  # not JSON
            if i == 20:
                f.write(json.dumps({"body": "no text field"}).encode() + b"\n")
            if i == 30:
                f.write(b'{"text": "caf\xe9 in latin-1"}\n')  # not UTF-8
            if i == 40:
                f.write(b"\n")
    (d / "b.jsonl").write_bytes(b"")  # empty file
    return d


def test_jsonl_bad_lines_are_skipped_and_counted(dirty_jsonl: Path) -> None:
    docs, skipped, info = documents(DataConfig(source="files", paths=[f"{dirty_jsonl}/*.jsonl"]))
    assert docs == GOOD
    assert skipped == {"bad_json": 1, "no_text_field": 1, "not_utf8": 1, "empty": 1}
    assert info["empty_files"] == 1 and info["files"] == 1


def test_binary_and_undecodable_text_files_are_skipped_and_counted(tmp_path: Path) -> None:
    (tmp_path / "good.txt").write_text("\n".join(GOOD))
    (tmp_path / "image.bin").write_bytes(bytes(range(256)) * 40)  # NULs and invalid UTF-8
    (tmp_path / "latin1.txt").write_bytes("na\xefve caf\xe9".encode("latin-1"))
    (tmp_path / "empty.txt").write_bytes(b"")
    docs, skipped, info = documents(DataConfig(source="files", paths=[f"{tmp_path}/*"],
                                               format="text"))
    assert docs == ["\n".join(GOOD)]
    assert skipped == {"binary": 1, "not_utf8": 1}
    assert info["empty_files"] == 1


@pytest.mark.parametrize("paths,msg", [(["/no/such/file.txt"], "matches no file"),
                                       (["/tmp/*.no-such-suffix"], "matches no file")])
def test_a_wrong_path_is_one_clear_error(paths: list[str], msg: str) -> None:
    with pytest.raises(ConfigError, match=msg) as e:
        load_stream(DataConfig(source="files", paths=paths))
    assert paths[0] in str(e.value) and "\n" not in str(e.value)


def test_only_empty_files_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "a.txt").write_bytes(b"")
    with pytest.raises(ConfigError, match="is empty"):
        load_stream(DataConfig(source="files", paths=[str(tmp_path / "a.txt")]))


def test_a_50_mb_line_streams_in_bounded_memory(tmp_path: Path) -> None:
    # One ~50 MB line, then the good documents.
    big = write_jsonl(tmp_path / "big.jsonl", ["alpha beta gamma delta " * 2_200_000, *GOOD])
    assert big.stat().st_size > 50e6
    script = f"""
import resource, sys
from collections import Counter
from tokenizers import Tokenizer, models, pre_tokenizers
from lmforge.config import DataConfig
from lmforge.data.loader import BlockLoader
from lmforge.data.sources import load_stream
cfg = DataConfig(source="files", paths=[{str(big)!r}], seq_len=64, val_percent=0.0,
                 shuffle_buffer=0)
ds, _ = load_stream(cfg)
tok = Tokenizer(models.WordLevel({{"<|endoftext|>": 0, "alpha": 1, "beta": 2, "gamma": 3,
                                  "delta": 4, "[UNK]": 5}}, unk_token="[UNK]"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loader = BlockLoader(ds, tok, "gpt", cfg, 8)
batch = next(loader)
assert batch["input_ids"][0, :4].tolist() == [1, 2, 3, 4], batch["input_ids"][0, :8]
grew = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 2**20
print(grew)
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    grew_gb = float(proc.stdout.split()[-1])
    # The 50 MB string itself is held a few times (file read, arrow, Python); tokens are
    # 8.8 M int64 (70 MB). Encoding it whole would take several GB.
    assert grew_gb < 1.5, grew_gb


def test_training_reports_skipped_documents(dirty_jsonl: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run_train(run, *TINY, "data=files", f"data.paths=[{dirty_jsonl}/*.jsonl]", "data.seq_len=16",
              "tokenizer.vocab_size=300", "trainer.max_steps=2", "trainer.log_every=1",
              "trainer.eval_every=0", "data.val_percent=0", "trainer.sample_tokens=0")
    assert read_metrics(run)[-1]["data_skipped"] == 4
    summary = json.loads((run / "summary.json").read_text())
    assert summary["data_skipped"] == {"bad_json": 1, "no_text_field": 1, "not_utf8": 1,
                                       "empty": 1}
    assert summary["corpus"]["empty_files"] == 1


def test_prepare_counts_what_it_skipped(dirty_jsonl: Path, tmp_path: Path) -> None:
    out = tmp_path / "shards"
    proc = subprocess.run([sys.executable, "-m", "lmforge.prepare", "shards", "--out", str(out),
                           "data=files", f"data.paths=[{dirty_jsonl}/*.jsonl]",
                           "tokenizer.vocab_size=300"], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["corpus"]["skipped"] == {"bad_json": 1, "no_text_field": 1, "not_utf8": 1,
                                             "empty": 1}
    assert sum(s["docs"] for s in manifest["splits"].values()) == len(GOOD)
    assert "skipped" in proc.stdout


def test_a_missing_path_stops_training_with_one_line(tmp_path: Path) -> None:
    proc = run_train(tmp_path / "run", *TINY, "data=files", "data.paths=[/no/such/*.jsonl]",
                     check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert "/no/such/*.jsonl" in lines[-1] and "matches no file" in lines[-1]
