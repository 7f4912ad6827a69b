"""Tokenizers: byte-level BPE (GPT) or WordPiece (BERT), trained with `tokenizers` on a
bounded sample of the corpus, or loaded from any tokenizer.json."""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from tokenizers import (Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

from lmforge.config import ConfigError, writing

# The one place special tokens are defined.
SPECIALS = {
    "bpe": {"eos": "<|endoftext|>"},
    "wordpiece": {"pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]",
                  "mask": "[MASK]"},
}


def kind_for(arch: str, kind: str = "auto") -> str:
    """The tokenizer kind a model family uses."""
    return ("bpe" if arch == "gpt" else "wordpiece") if kind == "auto" else kind


# The BPE trainer's work per merge grows with the length of the words holding the pair: a
# 20 MB whitespace-free "word" (minified code, base64, a genome) took it > 500 s. Runs of
# non-whitespace longer than RUN_CHARS (the stdlib's longest is ~140) reach the trainer cut
# into RUN_CHARS pieces, at most RUN_BUDGET characters of them in all (a file of one 20 MB
# run is 2,000 documents of 10,000 characters: a budget per document took 20 s per
# tokenizer); text without such runs reaches it unchanged (so the default tokenizer is
# what it always was).
RUN_CHARS = 1000
RUN_BUDGET = 1 << 20
# Python's str whitespace includes \x1c-\x1f, which neither pre-tokenizer splits on.
_LONG_RUN = re.compile(r"(?<![\S\x1c-\x1f])[\S\x1c-\x1f]{%d,}" % (RUN_CHARS + 1))


def training_pieces(text: str, budget: list[int] | None = None) -> list[str]:
    """`text` as the tokenizer trainer sees it: whole, unless it has whitespace-free runs
    longer than RUN_CHARS, which are cut into RUN_CHARS pieces; `budget` ([characters left],
    shared by the documents of one training; RUN_BUDGET when not given) bounds how many
    characters of such runs are kept, the rest is left out."""
    budget = [RUN_BUDGET] if budget is None else budget
    out, start = [], 0
    for m in _LONG_RUN.finditer(text):  # the look-behind: matches start where runs start
        out.append(text[start:m.start()])
        run = text[m.start():m.start() + min(m.end() - m.start(), budget[0])]
        out += [run[i:i + RUN_CHARS] for i in range(0, len(run), RUN_CHARS)]
        budget[0] -= len(run)
        start = m.end()
    if start == 0:
        return [text]
    out.append(text[start:])
    return [t for t in out if t]


def _bounded(texts: Iterable[str], max_chars: int, counted: list[int]) -> Iterator[str]:
    seen, budget = 0, [RUN_BUDGET]
    for t in texts:
        counted[0] += 1
        yield from training_pieces(t[: max_chars - seen], budget)
        seen += len(t)
        if seen >= max_chars:
            return


def train_tokenizer(texts: Iterable[str], kind: str, vocab_size: int,
                    max_chars: int = 50_000_000, skipped: dict[str, int] | None = None
                    ) -> Tokenizer:
    """Train a tokenizer on at most `max_chars` characters of `texts`. No text at all is
    an error (`skipped`: the documents the caller left out, by reason, for its message)."""
    specials = list(SPECIALS[kind].values())
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                      show_progress=False)
    else:
        tok = Tokenizer(models.WordPiece(unk_token=SPECIALS["wordpiece"]["unk"]))
        tok.normalizer = normalizers.BertNormalizer(lowercase=False)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.decoder = decoders.WordPiece()
        # For users of the exported tokenizer; lmforge's loader frames blocks itself.
        cls, sep = SPECIALS["wordpiece"]["cls"], SPECIALS["wordpiece"]["sep"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{cls} $A {sep}", pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, specials.index(cls)), (sep, specials.index(sep))])
        trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=specials,
                                            show_progress=False)
    counted = [0]
    tok.train_from_iterator(_bounded(texts, max_chars, counted), trainer=trainer)
    if counted[0] == 0:
        why = f" ({sum(skipped.values())} skipped: {dict(skipped)})" if skipped else ""
        raise ConfigError(f"no usable document to train the tokenizer on{why}; check "
                          "data.paths, data.format and data.text_field")
    # A freshly trained Tokenizer encodes ~2x slower than a reloaded one.
    text = tok.to_str() if kind == "bpe" else _canonical_wordpiece(tok.to_str(), specials)
    return Tokenizer.from_str(text)


def _canonical_wordpiece(text: str, specials: list[str]) -> str:
    """The WordPiece trainer numbers the same vocabulary differently from run to run (its
    alphabet comes out of a hash map); WordPiece encodes by longest match, whatever the ids,
    so ids are reassigned in a fixed order: specials, then by length and text."""
    spec = json.loads(text)
    vocab = spec["model"]["vocab"]
    rest = sorted((t for t in vocab if t not in specials),
                  key=lambda t: (len(t.removeprefix("##")), t.startswith("##"), t))
    spec["model"]["vocab"] = {t: i for i, t in enumerate([*specials, *rest])}
    for added in spec.get("added_tokens", []):
        added["id"] = specials.index(added["content"])
    return json.dumps(spec, ensure_ascii=False)


PIECE_CHARS = 1 << 18  # long documents are encoded in pieces of at most this many characters


def pieces(text: str, limit: int = PIECE_CHARS) -> list[str]:
    """`text` cut before a newline (else a space) at most every `limit` characters: a 50 MB
    line encodes in bounded memory, and tokens rarely straddle a cut."""
    out, start = [], 0
    while len(text) - start > limit:
        end = start + limit
        cut = max(text.rfind("\n", start + 1, end), text.rfind(" ", start + 1, end))
        end = cut if cut > start else end
        out.append(text[start:end])
        start = end
    out.append(text[start:])
    return out


def encode_documents(tok: Tokenizer, texts: list[str], group_chars: int = 1 << 22
                     ) -> list[np.ndarray]:
    """Token ids of each text (no special tokens), as int64 arrays. Long texts are encoded
    piece by piece and pieces in groups of about `group_chars` characters, so memory holds
    a few MB of tokenizer output whatever the document sizes."""
    flat = [(d, p) for d, t in enumerate(texts) for p in pieces(t)]
    ids: list[list[np.ndarray]] = [[] for _ in texts]
    start = 0
    while start < len(flat):
        end, size = start, 0
        while end < len(flat) and (end == start or size + len(flat[end][1]) <= group_chars):
            size += len(flat[end][1])
            end += 1
        group = flat[start:end]
        # _fast: no character offsets, which lmforge never uses (~1.6x faster here).
        for (d, _), enc in zip(group, tok.encode_batch_fast([p for _, p in group],
                                                            add_special_tokens=False)):
            got = enc.ids
            ids[d].append(np.fromiter(got, dtype=np.int64, count=len(got)))
        start = end
    return [np.concatenate(parts) if parts else np.zeros(0, np.int64) for parts in ids]


def save_tokenizer(tok: Tokenizer, path: str | Path) -> None:
    """Write `tok` as `path` (what Tokenizer.save writes), whole or not at all."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with writing(path):
            tmp.write_text(tok.to_str(pretty=True), encoding="utf-8")
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load a tokenizer.json, with a clear error when it is missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"tokenizer.path={str(path)!r} does not exist; point it at a "
                          "tokenizer.json or leave it null to train one")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise ConfigError(f"tokenizer.path={str(path)!r} is not a valid tokenizer.json: "
                          f"{str(e).splitlines()[0]}") from None


# End-of-text tokens of pretrained tokenizers (model.init_from): GPT-2's and lmforge's, Llama
# 2's, Llama 3's. The first one a tokenizer has separates documents.
EOS_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>")


def special_ids(tok: Tokenizer, kind: str) -> dict[str, int]:
    """Ids of the kind's special tokens; a tokenizer that lacks one is an error."""
    ids = {}
    for role, token in SPECIALS[kind].items():
        names = EOS_TOKENS if (kind, role) == ("bpe", "eos") else (token,)
        i = next((tok.token_to_id(t) for t in names if tok.token_to_id(t) is not None), None)
        if i is None:
            raise ConfigError(f"the tokenizer has no {' or '.join(map(repr, names))} token, "
                              f"which a {kind} model needs as {role}; train one with "
                              "tokenizer.path=null")
        ids[role] = i
    return ids
