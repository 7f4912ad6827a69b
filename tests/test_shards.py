"""Pre-tokenized shards: `lmforge-prepare shards` writes exact token files, `ShardLoader` cuts
the same batches for any rank layout, resumes exactly (mid-epoch, across epochs, with another
world size), masks BERT blocks by (seed, sample index), rejects damaged shards with errors
that name the file, and the trainer resumes a shards run to the same losses."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from conftest import REPO, WORDS, random_texts, read_metrics, run_train, write_jsonl
from lmforge.config import ConfigError
from lmforge.data.packing import bert_batch_seeded
from lmforge.data.shards import ShardLoader, ShardSet, token_dtype
from lmforge.manifest import sha256 as file_sha256
from lmforge.data.sources import is_validation
from lmforge.data.tokenizer import kind_for, load_tokenizer, special_ids

VAL_PERCENT = 2.0  # conf/data/files.yaml
# Small enough that the GPT set has several shards, so blocks straddle shard files.
GPT_SHARD_TOKENS = 12_000


def prepare(*args: str) -> list[str]:
    return [sys.executable, "-m", "lmforge.prepare", *args]


def shards_cmd(out: Path, corpus: Path, *extra: str) -> list[str]:
    return prepare("shards", "--out", str(out), "data=files", f"data.paths=[{corpus}]",
                   "tokenizer.vocab_size=256", *extra)


def communicate(procs: dict[str, subprocess.Popen]) -> dict[str, SimpleNamespace]:
    """Wait for subprocesses started together (2 cores: they overlap their start-up)."""
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=300)
        out[name] = SimpleNamespace(returncode=p.returncode, stdout=stdout, stderr=stderr)
    return out


def popen(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """A corpus of random words (plus empty documents), tokenized once for GPT and BERT."""
    root = tmp_path_factory.mktemp("shards")
    texts = random_texts(300, seed=7, lengths=(5, 60), words=[*WORDS, "café", "naïve", "über"])
    texts[10:10] = ["", "   \n"]  # skipped by lmforge-prepare
    corpus = write_jsonl(root / "corpus.jsonl", texts)
    gpt, bert = root / "gpt", root / "bert"
    res = communicate({
        "gpt": popen(shards_cmd(gpt, corpus, "--shard-tokens", str(GPT_SHARD_TOKENS))),
        "bert": popen(shards_cmd(bert, corpus, "model=bert_tiny")),
    })
    for name, r in res.items():
        assert r.returncode == 0, (name, r.stderr[-3000:])
        assert r.stdout.startswith(f"wrote {root / name}:"), r.stdout
    return SimpleNamespace(root=root, corpus=corpus, texts=texts, gpt=gpt, bert=bert)


def manifest(root: Path) -> dict:
    return json.loads((root / "manifest.json").read_text())


def specials_of(root: Path, arch: str) -> dict[str, int]:
    return special_ids(load_tokenizer(root / "tokenizer.json"), kind_for(arch))


def make_loader(root: Path, arch: str, seq_len: int, mb: int, rank: int = 0, world: int = 1,
                seed: int = 0, train: bool = True) -> ShardLoader:
    return ShardLoader(ShardSet(root, "train" if train else "validation"), arch,
                       specials_of(root, arch), seq_len, mb, rank, world, seed, train=train)


def position(loader: ShardLoader) -> int:
    """The global sample count a loader's state records."""
    state = loader.state_dict()
    assert state["kind"] == "shards"
    return state["consumed"]


def take(loader: ShardLoader, n: int) -> list[dict[str, torch.Tensor]]:
    return [next(loader) for _ in range(n)]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def cat_rows(*batches: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: torch.cat([b[k] for b in batches]) for k in batches[0]}


def block_rows(batch: dict[str, torch.Tensor], arch: str) -> torch.Tensor:
    """The unmasked blocks a batch was made from."""
    if arch == "gpt":
        return torch.cat([batch["input_ids"], batch["labels"][:, -1:]], dim=1)
    return torch.where(batch["labels"] == -100, batch["input_ids"], batch["labels"])


def blocks_in_order(root: Path, arch: str, seq_len: int) -> np.ndarray:
    """Every training block, read straight from the .bin files (not through ShardSet)."""
    m = manifest(root)
    stream = np.concatenate([np.fromfile(root / e["file"], dtype=m["dtype"])
                             for e in m["splits"]["train"]["shards"]]).astype(np.int64)
    body = seq_len + 1 if arch == "gpt" else seq_len - 2
    n = len(stream) // body
    blocks = stream[: n * body].reshape(n, body)
    if arch == "bert":
        s = specials_of(root, arch)
        blocks = np.concatenate([np.full((n, 1), s["cls"]), blocks, np.full((n, 1), s["sep"])], 1)
    return blocks


# 1. What lmforge-prepare writes ------------------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_manifest_and_token_files(built: SimpleNamespace, arch: str) -> None:
    root = getattr(built, arch)
    m = manifest(root)
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    specials = specials_of(root, arch)
    sep = specials["eos" if arch == "gpt" else "sep"]
    assert m["format"] == "lmforge-shards/1" and m["kind"] == kind_for(arch)
    assert m["vocab_size"] == tok.get_vocab_size() <= 2**16
    assert m["dtype"] == "uint16" and m["sep_id"] == sep
    assert m["tokenizer_sha256"] == file_sha256(root / "tokenizer.json")
    nonempty = [t for t in built.texts if t.strip()]
    assert len(nonempty) == len(built.texts) - 2
    assert m["splits"]["train"]["docs"] + m["splits"]["validation"]["docs"] == len(nonempty)
    want_val = sum(is_validation(t, VAL_PERCENT) for t in nonempty)
    assert m["splits"]["validation"]["docs"] == want_val
    if arch == "gpt":
        assert len(m["splits"]["train"]["shards"]) >= 3
    for split, info in m["splits"].items():
        assert info["tokens"] == sum(e["tokens"] for e in info["shards"])
        assert info["docs"] == sum(e["docs"] for e in info["shards"])
        for k, e in enumerate(info["shards"]):
            path = root / e["file"]
            assert e["file"] == f"{split}-{k:05d}.bin"
            assert e["tokens"] == path.stat().st_size // 2 and path.stat().st_size % 2 == 0
            assert e["sha256"] == file_sha256(path)
            data = np.fromfile(path, dtype=np.uint16)
            idx = np.load(root / e["index"])
            assert idx.dtype == np.int64 and len(idx) == e["docs"] + 1
            assert idx[0] == 0 and idx[-1] == e["tokens"] == len(data)
            assert np.all(np.diff(idx) > 1)  # every document has tokens besides its separator
            assert np.all(data[idx[1:] - 1] == sep)  # each document ends with the separator
            assert int((data == sep).sum()) == e["docs"]  # and nowhere else
            assert int(data.max()) < m["vocab_size"]
    # The first training document round-trips through the stored tokenizer.
    first = next(t for t in nonempty if not is_validation(t, VAL_PERCENT))
    e = m["splits"]["train"]["shards"][0]
    idx = np.load(root / e["index"])
    ids = np.fromfile(root / e["file"], dtype=np.uint16)[idx[0]:idx[1] - 1].tolist()
    assert ids == tok.encode(first, add_special_tokens=False).ids
    assert tok.decode(ids) == first  # byte-level BPE is exact; WordPiece is for these words


def test_token_dtype_widens_past_uint16() -> None:
    assert token_dtype(256) == np.uint16 and token_dtype(2**16) == np.uint16
    assert token_dtype(2**16 + 1) == np.uint32 and token_dtype(250_000) == np.uint32


def test_validation_is_one_pass_in_order(built: SimpleNamespace) -> None:
    val = make_loader(built.gpt, "gpt", 32, 4, train=False)
    batches = list(val)
    stream = np.concatenate([np.fromfile(built.gpt / e["file"], dtype=np.uint16)
                             for e in manifest(built.gpt)["splits"]["validation"]["shards"]]
                            ).astype(np.int64)
    n = (len(stream) // 33) // 4 * 4  # full micro-batches only
    assert len(batches) == n // 4 > 0
    got = torch.cat([block_rows(b, "gpt") for b in batches]).numpy()
    np.testing.assert_array_equal(got, stream[: n * 33].reshape(n, 33))


# 2. Batches do not depend on the rank layout --------------------------------------------------

@pytest.mark.parametrize("arch", ["gpt", "bert"])
def test_world_size_independence(built: SimpleNamespace, arch: str) -> None:
    root = getattr(built, arch)
    one = make_loader(root, arch, 32, 8, seed=3)
    r0 = make_loader(root, arch, 32, 4, rank=0, world=2, seed=3)
    r1 = make_loader(root, arch, 32, 4, rank=1, world=2, seed=3)
    for _ in range(10):
        b, b0, b1 = next(one), next(r0), next(r1)
        assert b["input_ids"].shape == (8, 32)
        assert_same(cat_rows(b0, b1), b)
    assert one.state_dict() == r0.state_dict() == r1.state_dict()
    assert position(one) == 80


def test_world_of_four_matches_too(built: SimpleNamespace) -> None:
    one = take(make_loader(built.bert, "bert", 32, 8), 5)
    ranks = [take(make_loader(built.bert, "bert", 32, 2, rank=r, world=4), 5) for r in range(4)]
    for s in range(5):
        assert_same(cat_rows(*(ranks[r][s] for r in range(4))), one[s])


# 3. Exact resume, shuffled epochs ------------------------------------------------------------

@pytest.mark.parametrize("arch,seq_len", [("gpt", 32), ("bert", 32),  # mid-epoch
                                          ("gpt", 1023), ("bert", 256)])  # epochs of ~5 steps
def test_resume_is_exact(built: SimpleNamespace, arch: str, seq_len: int) -> None:
    root = getattr(built, arch)
    straight = make_loader(root, arch, seq_len, 8, seed=5)
    want = take(straight, 27)
    first = make_loader(root, arch, seq_len, 8, seed=5)
    take(first, 7)
    state = first.state_dict()
    assert position(first) == 56
    resumed = make_loader(root, arch, seq_len, 8, seed=5)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # as it goes through a checkpoint
    if seq_len > 32:
        assert resumed.n_blocks < 56  # this resume starts after the first epoch ...
        assert 27 * 8 > 3 * resumed.n_blocks  # ... and runs across several more
    for w, g in zip(want[7:], take(resumed, 20)):
        assert_same(g, w)


@pytest.mark.parametrize("arch,seq_len", [("gpt", 1023), ("bert", 256)])
def test_each_epoch_is_a_permutation_of_all_blocks(built: SimpleNamespace, arch: str,
                                                   seq_len: int) -> None:
    root = getattr(built, arch)
    blocks = blocks_in_order(root, arch, seq_len)
    n = len(blocks)
    assert 20 < n < 60
    loader = make_loader(root, arch, seq_len, 1, seed=11)
    assert loader.n_blocks == n
    rows = torch.cat([block_rows(b, arch) for b in take(loader, 3 * n)]).numpy()
    assert len({r.tobytes() for r in blocks}) == n  # blocks are distinct, so the check is strict
    key = lambda a: sorted(r.tobytes() for r in a)  # noqa: E731
    epochs = [rows[e * n:(e + 1) * n] for e in range(3)]
    for ep in epochs:
        assert key(ep) == key(blocks)  # every block exactly once
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[1], epochs[2])
    assert not np.array_equal(epochs[0], blocks)  # shuffled
    other = torch.cat([block_rows(b, arch) for b in take(make_loader(root, arch, seq_len, 1,
                                                                     seed=12), n)]).numpy()
    assert not np.array_equal(other, epochs[0]) and key(other) == key(blocks)


# 4. Resume with another world size -----------------------------------------------------------

@pytest.mark.parametrize("arch,seq_len", [("gpt", 1023), ("bert", 256)])
def test_resume_with_another_world_size(built: SimpleNamespace, arch: str, seq_len: int) -> None:
    root, k = getattr(built, arch), 9
    r0 = make_loader(root, arch, seq_len, 4, rank=0, world=2, seed=2)
    r1 = make_loader(root, arch, seq_len, 4, rank=1, world=2, seed=2)
    assert r0.n_blocks < 8 * k < 2 * r0.n_blocks  # the saved position is in the second epoch
    before = [cat_rows(a, b) for a, b in zip(take(r0, k), take(r1, k))]
    state = r0.state_dict()
    assert state == r1.state_dict() and position(r0) == 8 * k
    # What the two ranks would have read next ...
    after2 = [cat_rows(a, b) for a, b in zip(take(r0, 6), take(r1, 6))]
    # ... is what one rank with the same global batch reads after loading their state.
    one = make_loader(root, arch, seq_len, 8, seed=2)
    one.load_state_dict(state)
    after1 = take(one, 6)
    for a, b in zip(after1, after2):
        assert_same(a, b)
    # No sample repeated or skipped: the same stream as a run that was never interrupted.
    straight = take(make_loader(root, arch, seq_len, 8, seed=2), k + 6)
    for a, b in zip(before + after1, straight):
        assert_same(a, b)
    # And back from 1 to 4 ranks.
    fours = [make_loader(root, arch, seq_len, 2, rank=r, world=4, seed=2) for r in range(4)]
    for f in fours:
        f.load_state_dict(one.state_dict())
    nxt = take(make_loader(root, arch, seq_len, 8, seed=2), k + 7)[-1]
    assert_same(cat_rows(*(next(f) for f in fours)), nxt)


# 5. BERT masks -------------------------------------------------------------------------------

def _masks_by_block(root: Path, seed: int, n_samples: int) -> dict[bytes, list[torch.Tensor]]:
    loader = make_loader(root, "bert", 256, 1, seed=seed)
    out: dict[bytes, list[torch.Tensor]] = {}
    for b in take(loader, n_samples):
        out.setdefault(block_rows(b, "bert")[0].numpy().tobytes(), []).append(b["labels"][0] != -100)
    return out


def test_bert_masks_per_epoch_and_seed(built: SimpleNamespace) -> None:
    n = make_loader(built.bert, "bert", 256, 1).n_blocks
    seed0 = _masks_by_block(built.bert, 0, 2 * n)
    assert len(seed0) == n and all(len(v) == 2 for v in seed0.values())
    # The same block is masked differently in its two epochs.
    assert all(not torch.equal(a, b) for a, b in seed0.values())
    # Reproducible for the same seed ...
    again = _masks_by_block(built.bert, 0, 2 * n)
    assert again.keys() == seed0.keys()
    assert all(torch.equal(x, y) for k in seed0 for x, y in zip(seed0[k], again[k]))
    # ... and different for another one (matched by block content, as the order differs too).
    seed1 = _masks_by_block(built.bert, 1, n)
    assert seed1.keys() == seed0.keys()
    assert all(not torch.equal(seed1[k][0], seed0[k][0]) for k in seed0)
    # Keyed by (seed, sample index) only: the same block masked alone or in a batch agrees.
    s = specials_of(built.bert, "bert")
    block = blocks_in_order(built.bert, "bert", 256)[0]
    args = (s["mask"], manifest(built.bert)["vocab_size"], [s["cls"], s["sep"], s["pad"]], 0.15)
    alone = bert_batch_seeded([block], [(0, 17)], *args)
    batched = bert_batch_seeded([block, block, block], [(0, 3), (0, 17), (1, 17)], *args)
    assert torch.equal(alone["labels"][0], batched["labels"][1])
    assert torch.equal(alone["input_ids"][0], batched["input_ids"][1])
    assert not torch.equal(batched["labels"][0], batched["labels"][1])
    assert not torch.equal(batched["labels"][1], batched["labels"][2])
    # And the loader keys each sample by exactly (trainer seed, global sample index).
    for seed in (0, 1):
        loader = make_loader(built.bert, "bert", 256, 2, rank=1, world=2, seed=seed)
        for step in range(n):  # two epochs of samples
            got = next(loader)
            rows = block_rows(got, "bert").numpy()
            want = bert_batch_seeded(list(rows), [(seed, 4 * step + 2), (seed, 4 * step + 3)],
                                     *args)
            assert_same(got, want)


def test_bert_mask_rates(built: SimpleNamespace) -> None:
    s = specials_of(built.bert, "bert")
    special = torch.tensor([s["cls"], s["sep"], s["pad"]])
    batches = take(make_loader(built.bert, "bert", 128, 16, seed=4), 16)  # 256 samples
    ids = torch.cat([b["input_ids"] for b in batches])
    labels = torch.cat([b["labels"] for b in batches])
    orig = torch.where(labels == -100, ids, labels)
    assert torch.all(orig[:, 0] == s["cls"]) and torch.all(orig[:, -1] == s["sep"])
    is_special = torch.isin(orig, special)
    picked = labels != -100
    assert not torch.any(picked & is_special)  # [CLS], [SEP] (also between documents) never
    assert torch.all(ids[is_special] == orig[is_special])
    assert torch.all(ids[~picked] == orig[~picked])
    rate = picked.sum().item() / (~is_special).sum().item()
    assert (~is_special).sum().item() > 25_000
    assert rate == pytest.approx(0.15, abs=0.01)
    n = picked.sum().item()
    to_mask = ((ids == s["mask"]) & picked).sum().item() / n
    kept = ((ids == orig) & picked).sum().item() / n
    assert to_mask == pytest.approx(0.8, abs=0.03)
    assert kept == pytest.approx(0.1, abs=0.03)
    assert torch.all(batches[0]["token_type_ids"] == 0)


# 6. Bad input --------------------------------------------------------------------------------

def damaged_copy(built: SimpleNamespace, tmp_path: Path, name: str = "copy") -> Path:
    out = tmp_path / name
    shutil.copytree(built.gpt, out)
    return out


def test_truncated_shard_is_rejected(built: SimpleNamespace, tmp_path: Path) -> None:
    root = damaged_copy(built, tmp_path)
    path = root / "train-00000.bin"
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 6)
    with pytest.raises(ConfigError) as e:
        ShardSet(root, "train")
    assert str(path) in str(e.value) and "truncated" in str(e.value)
    assert str(size - 6) in str(e.value) and str(size) in str(e.value)
    ShardSet(root, "validation")  # the other split is intact
    path.unlink()
    with pytest.raises(ConfigError, match="missing"):
        ShardSet(root, "train")


def _poison(path: Path, pos: int) -> None:
    size = path.stat().st_size
    data = np.memmap(path, dtype=np.uint16, mode="r+")
    data[pos] = 65535
    data.flush()
    del data
    assert path.stat().st_size == size


def test_out_of_vocab_token_is_rejected_naming_the_shard(built: SimpleNamespace,
                                                         tmp_path: Path) -> None:
    root = damaged_copy(built, tmp_path)
    path = root / "train-00001.bin"
    tokens0 = manifest(root)["splits"]["train"]["shards"][0]["tokens"]
    pos = 100  # in the middle of the second shard
    _poison(path, pos)
    shards = ShardSet(root, "train")  # the sizes are right
    j = (tokens0 + pos) // 33
    shards.tokens((j - 1) * 33, 33)  # the neighbouring block reads fine
    with pytest.raises(ConfigError) as e:
        shards.tokens(j * 33, 33)
    assert str(path) in str(e.value) and "65535" in str(e.value)
    # Through the loader: validation order is the identity, so sample j is block j.
    loader = ShardLoader(shards, "gpt", specials_of(root, "gpt"), 32, 1, train=False)
    take(loader, j)
    with pytest.raises(ConfigError, match=str(path)):
        next(loader)


def test_out_of_vocab_token_in_a_block_that_straddles_shards(built: SimpleNamespace,
                                                             tmp_path: Path) -> None:
    root = damaged_copy(built, tmp_path)
    tokens0 = manifest(root)["splits"]["train"]["shards"][0]["tokens"]
    assert tokens0 % 33  # the block holding token tokens0 starts in shard 0
    _poison(root / "train-00001.bin", 0)
    with pytest.raises(ConfigError) as e:
        ShardSet(root, "train").tokens(tokens0 // 33 * 33, 33)
    assert str(root / "train-00001.bin") in str(e.value)


def test_missing_or_bad_manifest(built: SimpleNamespace, tmp_path: Path) -> None:
    root = damaged_copy(built, tmp_path)
    (root / "manifest.json").unlink()
    with pytest.raises(ConfigError, match="lmforge-prepare shards"):
        ShardSet(root, "train")
    (root / "manifest.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        ShardSet(root, "train")
    (root / "manifest.json").write_text(json.dumps({"format": "something/9"}))
    with pytest.raises(ConfigError, match="lmforge-shards/1"):
        ShardSet(root, "train")


def test_too_little_data_for_one_global_micro_batch(built: SimpleNamespace) -> None:
    n_tokens = manifest(built.gpt)["splits"]["train"]["tokens"]
    seq_len = n_tokens // 3  # 2 blocks
    with pytest.raises(ConfigError, match="fewer than one global micro-batch"):
        make_loader(built.gpt, "gpt", seq_len, 2, rank=1, world=2)
    make_loader(built.gpt, "gpt", seq_len, 1, rank=1, world=2)  # 2 blocks: just enough
    with pytest.raises(ConfigError, match="fewer than one global micro-batch"):
        make_loader(built.bert, "bert", 32, 10_000)


def run_cli(argv: list[str], capsys, monkeypatch) -> tuple[int, str, str]:
    """`lmforge-prepare ARGV` in this process (its console-script entry point, without the
    seconds of start-up a subprocess pays): (exit code, stdout, stderr)."""
    from lmforge.prepare import cli

    monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")  # cli() sets it; undone afterwards
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        cli(argv)
    out, err = capsys.readouterr()
    return e.value.code, out, err


def test_verify(built: SimpleNamespace, tmp_path: Path, capsys, monkeypatch) -> None:
    code, out, err = run_cli(["verify", str(built.gpt)], capsys, monkeypatch)
    assert code == 0 and err == ""
    assert out.strip() == f"{built.gpt}: every shard matches its manifest"
    modified = damaged_copy(built, tmp_path)
    _poison(modified / "train-00002.bin", 5)  # same size: only the hash can tell
    code, out, err = run_cli(["verify", str(modified)], capsys, monkeypatch)
    assert code == 1 and out == ""
    assert err.strip().splitlines() == [
        f"{modified / 'train-00002.bin'} does not match its checksum"]
    (modified / "validation-00000.bin").unlink()
    (modified / "tokenizer.json").write_text("{}")
    code, out, err = run_cli(["verify", str(modified)], capsys, monkeypatch)
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 3 and f"{modified / 'validation-00000.bin'} is missing" in lines
    assert any(ln.startswith(f"{modified / 'tokenizer.json'} ") for ln in lines)


def test_prepare_refuses_an_existing_directory(built: SimpleNamespace, capsys,
                                               monkeypatch) -> None:
    before = (built.gpt / "manifest.json").read_bytes()
    code, out, err = run_cli(shards_cmd(built.gpt, built.corpus)[3:], capsys, monkeypatch)
    assert code == 2
    assert err.strip().splitlines() == [
        f"lmforge-prepare: error: {built.gpt} already exists; remove it or choose another "
        "output directory"]
    assert (built.gpt / "manifest.json").read_bytes() == before  # left alone
    assert not (built.gpt.parent / "gpt.tmp").exists()


def test_prepare_reports_a_glob_that_matches_nothing(tmp_path: Path, capsys,
                                                     monkeypatch) -> None:
    glob = f"{tmp_path}/nothing/*.jsonl"
    code, out, err = run_cli(["shards", "--out", str(tmp_path / "new"), "data=files",
                              f"data.paths=[{glob}]", "tokenizer.vocab_size=256"],
                             capsys, monkeypatch)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("lmforge-prepare: error:")
    assert repr(glob) in lines[0] and "matches no file" in lines[0]
    assert not (tmp_path / "new").exists() and not (tmp_path / "new.tmp").exists()


# 7. Through the trainer ----------------------------------------------------------------------

def train_args(shards: Path) -> list[str]:
    return ["logging=quiet", "data=shards", f"data.shards_dir={shards}", "data.seq_len=32",
            "model.n_layers=2", "model.d_model=64", "model.n_heads=2",
            "trainer.micro_batch_size=4", "trainer.log_every=1", "trainer.eval_every=0",
            "trainer.sample_tokens=0"]


@pytest.fixture(scope="module")
def runs(built: SimpleNamespace, tmp_path_factory: pytest.TempPathFactory) -> SimpleNamespace:
    """8 steps straight; 4 steps then the same command with max_steps=8 (a resume); and a
    run given the wrong tokenizer, two at a time. Warmup (20 steps) outlasts all 8 steps, so
    the LR does not depend on max_steps."""
    tmp = tmp_path_factory.mktemp("train")
    args = train_args(built.gpt)
    # One intra-op thread each: two runs share 2 cores (a third of the CPU time saved).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    def in_two() -> tuple:
        first = run_train(tmp / "resumed", *args, "trainer.max_steps=4", env=env)
        return first, run_train(tmp / "resumed", *args, "trainer.max_steps=8", env=env)

    with ThreadPoolExecutor(2) as pool:
        halves = pool.submit(in_two)
        straight = pool.submit(run_train, tmp / "straight", *args, "trainer.max_steps=8",
                               env=env)
        wrong = pool.submit(run_train, tmp / "wrong", *args, "trainer.max_steps=8",
                            f"tokenizer.path={built.bert / 'tokenizer.json'}", check=False,
                            env=env)
        first, second = halves.result()
        return SimpleNamespace(tmp=tmp, first=first, second=second, straight=straight.result(),
                               wrong=wrong.result())


@pytest.mark.slow
def test_trainer_resumes_a_shards_run_exactly(built: SimpleNamespace, runs) -> None:
    assert "resumed from" in runs.second.stderr and "resumed from" not in runs.first.stderr
    want = {r["step"]: r for r in read_metrics(runs.tmp / "straight")}
    rows = read_metrics(runs.tmp / "resumed")
    assert [r["step"] for r in rows] == list(range(1, 9))
    got = {r["step"]: r for r in rows}
    assert sorted(want) == list(range(1, 9))
    for step in range(1, 9):
        assert got[step]["tokens"] == want[step]["tokens"] == step * 4 * 32
        assert got[step]["loss"] == pytest.approx(want[step]["loss"], rel=1e-6), step
    assert got[8]["loss"] < got[1]["loss"]
    for run in ("straight", "resumed"):
        tok = runs.tmp / run / "tokenizer.json"
        assert tok.read_bytes() == (built.gpt / "tokenizer.json").read_bytes()
    a = torch.load(runs.tmp / "straight/checkpoints/step_00000008/trainer_rank0.pt",
                   weights_only=True)
    b = torch.load(runs.tmp / "resumed/checkpoints/step_00000008/trainer_rank0.pt",
                   weights_only=True)
    assert a["loader"] == b["loader"]
    assert a["loader"]["kind"] == "shards" and a["loader"]["consumed"] == 8 * 4


@pytest.mark.slow
def test_trainer_rejects_another_tokenizer_with_shards(built: SimpleNamespace, runs) -> None:
    r = runs.wrong
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    errors = [ln for ln in r.stderr.splitlines() if "error" in ln.lower()]
    assert errors == [f"lmforge-train: config error: {built.bert / 'tokenizer.json'} is not the "
                      f"tokenizer the shards in {built.gpt} were made with; leave tokenizer.path "
                      "unset or re-run lmforge-prepare shards"]
    assert not (runs.tmp / "wrong" / "checkpoints").exists()
