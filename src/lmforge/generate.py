"""`lmforge-generate PATH --prompt ...`: a GPT continuation streamed to stdout token by token
(temperature, top-k, top-p, seeded), or a BERT's top-k fillers of each [MASK]; PATH is
anything lmforge.pretrained reads (run, checkpoint, export, HF directory, hub name). One CPU
process, the plain model: no DeepSpeed."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Iterator, TextIO

import torch
from tokenizers import Tokenizer
from torch import Tensor, nn

from lmforge.config import ConfigError
from lmforge.data.tokenizer import special_ids


def pick(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None,
         generator: torch.Generator) -> int:
    """The next token from (V,) logits: argmax at temperature 0, else a draw from the
    softmax at `temperature` restricted to the top_k tokens and to the smallest set whose
    probability reaches top_p (nucleus)."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        order = torch.argsort(logits, descending=True)
        probs = torch.softmax(logits[order], dim=-1)
        # A token goes when the ones ranked above it already reach top_p (the first stays).
        drop = order[(probs.cumsum(0) - probs) >= top_p]
        logits[drop] = float("-inf")
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


@torch.no_grad()
def sample(model: nn.Module, ids: list[int], max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, top_p: float | None = None, seed: int = 0,
           vocab: int | None = None) -> Iterator[int]:
    """Yield max_new_tokens tokens continuing `ids`, one at a time (the model sees at most its
    max_seq_len last tokens); only ids below `vocab` (the tokenizer's: a model's vocabulary
    may be padded past it) are drawn."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.tensor([ids], dtype=torch.long, device=next(model.parameters()).device)
    window = model.cfg.max_seq_len
    for _ in range(max_new_tokens):
        logits = model.logits(x[:, -window:])[0, -1, :vocab]  # (V,)
        nxt = pick(logits.cpu(), temperature, top_k, top_p, generator)
        yield nxt
        x = torch.cat([x, x.new_tensor([[nxt]])], dim=1)


class Stream:
    """Writes the text of a growing token list as it grows. A byte-level token may end in the
    middle of a UTF-8 character: text is held back while it ends in U+FFFD."""

    def __init__(self, tok: Tokenizer, out: TextIO) -> None:
        self.tok, self.out, self.ids, self.shown = tok, out, [], ""

    def push(self, token: int) -> None:
        self.ids.append(token)
        self._show(final=False)

    def _show(self, final: bool) -> None:
        text = self.tok.decode(self.ids, skip_special_tokens=False)
        if (final or not text.endswith("\ufffd")) and text.startswith(self.shown):
            self.out.write(text[len(self.shown):])
            self.out.flush()
            self.shown = text

    def close(self) -> None:
        self._show(final=True)
        self.out.write("\n")
        self.out.flush()


def continue_text(model: nn.Module, tok: Tokenizer, prompt: str, args: argparse.Namespace
                  ) -> int:
    """Stream the continuation of `prompt` to stdout; returns the number of tokens made."""
    ids = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
    if not ids:  # unconditional: start a new document after an end of text
        ids = [special_ids(tok, "bpe")["eos"]]
    stream, n = Stream(tok, sys.stdout), 0
    for token in sample(model, ids, args.max_new_tokens, args.temperature, args.top_k,
                        args.top_p, args.seed, tok.get_vocab_size()):
        stream.push(token)
        n += 1
    stream.close()
    return n


@torch.no_grad()
def fill_masks(model: nn.Module, tok: Tokenizer, prompt: str, top_k: int
               ) -> tuple[str, list[list[tuple[str, float]]]]:
    """BERT: the prompt with each [MASK] replaced by its most likely token, and per [MASK] the
    top_k (token, probability) pairs."""
    specials = {r: tok.token_to_id(t) for r, t in [("cls", "[CLS]"), ("sep", "[SEP]"),
                                                   ("mask", "[MASK]")]}
    if None in specials.values():
        raise ConfigError("the tokenizer lacks [CLS], [SEP] or [MASK]: not a BERT tokenizer")
    ids = [specials["cls"], *tok.encode(prompt, add_special_tokens=False).ids, specials["sep"]]
    where = [i for i, t in enumerate(ids) if t == specials["mask"]]
    if not where:
        raise ConfigError("the prompt has no [MASK] for a BERT model to fill")
    if len(ids) > model.cfg.max_seq_len:
        raise ConfigError(f"the prompt is {len(ids)} tokens, more than the model's "
                          f"max_seq_len={model.cfg.max_seq_len}")
    x = torch.tensor([ids], device=next(model.parameters()).device)
    logits = model.logits(x)[0, where, :tok.get_vocab_size()]  # past it: vocabulary padding
    probs = torch.softmax(logits.float().cpu(), dim=-1)
    top = torch.topk(probs, min(top_k, probs.size(-1)), dim=-1)
    choices = [[(tok.id_to_token(int(i)), float(p)) for p, i in zip(ps, idx)]
               for ps, idx in zip(top.values, top.indices)]
    filled = list(ids)
    for pos, idx in zip(where, top.indices[:, 0]):
        filled[pos] = int(idx)
    return tok.decode(filled[1:-1]), choices


def parse(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="lmforge-generate", description="Continue a prompt with a GPT model (streamed to "
        "stdout), or fill the [MASK]s of a prompt with a BERT model.")
    p.add_argument("path", help="a run or checkpoint directory, an lmforge export, an HF "
                   "model directory (GPT-2, Llama, BERT) or a hub name")
    p.add_argument("--prompt", help="the text to continue (GPT) or with [MASK]s (BERT)")
    p.add_argument("--prompt-file", type=Path, help="read the prompt from this file")
    p.add_argument("--max-new-tokens", type=int, default=64, help="GPT: tokens to generate")
    p.add_argument("--temperature", type=float, default=1.0, help="GPT: 0 = greedy")
    p.add_argument("--top-k", type=int, default=None,
                   help="GPT: sample among the k most likely tokens; BERT: fillers shown "
                   "per [MASK] (default 5)")
    p.add_argument("--top-p", type=float, default=None, help="GPT: nucleus sampling mass")
    p.add_argument("--seed", type=int, default=0, help="GPT: the sampling seed")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    args = p.parse_args(argv)
    for ok, msg in [(args.max_new_tokens >= 0, "--max-new-tokens must be >= 0"),
                    (args.top_k is None or args.top_k > 0, "--top-k must be > 0"),
                    (args.top_p is None or 0 < args.top_p <= 1, "--top-p must be in (0, 1]"),
                    (args.prompt is None or args.prompt_file is None,
                     "give --prompt or --prompt-file, not both")]:
        if not ok:
            p.error(msg)
    return args


def main(argv: list[str]) -> int:
    args = parse(argv)
    from lmforge.weights import load_model

    try:
        prompt = args.prompt_file.read_text() if args.prompt_file else (args.prompt or "")
        model, tok, _ = load_model(args.path, args.device)
        t0 = time.perf_counter()
        if model.cfg.arch == "bert":
            filled, choices = fill_masks(model, tok, prompt, args.top_k or 5)
            print(filled)
            for i, top in enumerate(choices, 1):
                print(f"[MASK] {i}: " + "  ".join(f"{t} {p:.4f}" for t, p in top))
            return 0
        n = continue_text(model, tok, prompt, args)
    except (ValueError, OSError) as e:  # ConfigError / SourceError, unreadable files
        print(f"lmforge-generate: error: {e}", file=sys.stderr)
        return 2
    wall = time.perf_counter() - t0
    print(f"generated {n} tokens in {wall:.2f}s ({n / max(wall, 1e-9):.1f} tokens/s)",
          file=sys.stderr)
    return 0


def cli() -> None:
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
