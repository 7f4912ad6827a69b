"""A pretrained source's weights (lmforge.pretrained.Source) under lmforge names, checked
against its config, and their copy into a model one tensor at a time (under ZeRO-3: one
gathered partitioned tensor at a time)."""
from __future__ import annotations

import contextlib
import json
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

import torch
from safetensors import safe_open
from torch import Tensor, nn

from lmforge.config import ModelConfig
from lmforge.consolidate import CheckpointError, check_state_dict, consolidate
from lmforge.export import hf_pieces
from lmforge.manifest import load_error
from lmforge.models import build_model
from lmforge.pretrained import Source, SourceError, read_tokenizer, resolve_source

if TYPE_CHECKING:
    from tokenizers import Tokenizer


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every parameter of cfg's model (a tied one once) and its shape."""
    with torch.device("meta"):
        return {k: tuple(p.shape) for k, p in build_model(cfg).named_parameters()}


def load_weights(src: Source) -> Mapping[str, Tensor]:
    """src's weights under lmforge names, every parameter of its model (a tied one once),
    their names and shapes checked against its config (SourceError)."""
    expected = expected_shapes(src.model)
    if src.kind == "hf":
        return HFWeights(src.path, src.model, expected)
    try:
        sd = consolidate(src.path)
        check_state_dict(src.model, sd)
    except CheckpointError as e:
        raise SourceError(str(e)) from None
    return {k: sd[k] for k in expected}


def _canonical(name: str) -> str:
    """HF's own renames on load: old BERT files name LayerNorm parameters gamma and beta."""
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight",
                  re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


class HFWeights(Mapping):
    """The tensors of an HF directory under lmforge names; each is read (its pieces joined,
    Conv1D ones transposed: export.hf_pieces) only when asked for, so a model can be filled
    one tensor at a time. Names and shapes are checked on opening, from the file headers."""

    def __init__(self, root: Path, cfg: ModelConfig, expected: dict[str, tuple[int, ...]]
                 ) -> None:
        self.root, self.files = root, _TensorFiles(root)
        aliases = {_canonical(n): n for n in self.files.names}
        stored: dict[str, list[tuple[str | None, bool]]] = {}
        missing = []
        for key, pieces in hf_pieces(cfg).items():
            stored[key] = []
            for names, transposed in pieces:
                # The base-model prefix may be left out (the hub's gpt2 holds GPT2Model's names).
                found = next((aliases[a] for n in names for a in (n, n.partition(".")[2])
                              if a in aliases), None)
                stored[key].append((found, transposed))
                missing += [names[0]] if found is None else []
        if missing:
            more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
            raise SourceError(f"the weights in {root} miss {missing[0]}{more}, which its "
                              "config.json needs")
        self.stored = stored
        for key, want in expected.items():
            got = self._shape(key)
            if got != want:
                names = ", ".join(n for n, _ in stored[key])
                raise SourceError(f"the weights in {root} do not match its config.json: "
                                  f"{key} (from {names}) has shape {list(got)}, the config "
                                  f"needs {list(want)}")

    def _shape(self, key: str) -> tuple[int, ...]:
        shapes = [self.files.shape(n)[::-1] if tr else self.files.shape(n)
                  for n, tr in self.stored[key]]
        if any(s[1:] != shapes[0][1:] for s in shapes):
            return tuple(shapes[0])  # pieces that cannot be joined: reported as a mismatch
        return (sum(s[0] for s in shapes), *shapes[0][1:])

    def __getitem__(self, key: str) -> Tensor:
        parts = [self.files.get(n) for n, _ in self.stored[key]]
        parts = [p.t() if tr else p for p, (_, tr) in zip(parts, self.stored[key])]
        return parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)

    def __iter__(self) -> Iterator[str]:
        return iter(self.stored)

    def __len__(self) -> int:
        return len(self.stored)


class _TensorFiles:
    """Tensors by name in model.safetensors, pytorch_model.bin or their sharded index; .bin
    files are read weights-only (a file that would run code is refused)."""

    def __init__(self, root: Path) -> None:
        self.where: dict[str, Path] = {}
        self._bins: dict[Path, dict[str, Tensor]] = {}
        for index, single in [("model.safetensors.index.json", "model.safetensors"),
                              ("pytorch_model.bin.index.json", "pytorch_model.bin")]:
            if (root / index).is_file():
                weight_map = json.loads((root / index).read_text())["weight_map"]
                self.where = {k: root / f for k, f in weight_map.items()}
                break
            if (root / single).is_file():
                self.where = {k: root / single for k in self._keys(root / single)}
                break
        self.names = list(self.where)

    def _keys(self, path: Path) -> list[str]:
        if path.suffix == ".bin":
            return list(self._bin(path))
        with safe_open(str(path), "pt") as f:
            return list(f.keys())

    def _bin(self, path: Path) -> dict[str, Tensor]:
        if path not in self._bins:
            try:
                self._bins[path] = torch.load(path, map_location="cpu", weights_only=True,
                                              mmap=True)
            except Exception as e:  # not a zip file, or not plain tensors: refused
                raise SourceError(f"cannot read {path}: {load_error(e)}") from None
        return self._bins[path]

    def shape(self, name: str) -> tuple[int, ...]:
        path = self.where[name]
        if path.suffix == ".bin":
            return tuple(self._bin(path)[name].shape)
        with safe_open(str(path), "pt") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> Tensor:
        path = self.where[name]
        if path.suffix == ".bin":
            return self._bin(path)[name]
        with safe_open(str(path), "pt") as f:
            return f.get_tensor(name)


def copy_weights(model: nn.Module, weights: Mapping[str, Tensor] | None,
                 gather: Callable[[nn.Parameter], Any] | None = None) -> None:
    """Every parameter of `model` from `weights`, one tensor at a time. Under ZeRO-3 `gather`
    gathers one partitioned parameter, and only rank 0 passes `weights` (its copy is what
    the partitions receive)."""
    gather = gather or (lambda p: contextlib.nullcontext())
    with torch.no_grad():
        for name, p in model.named_parameters():
            with gather(p):
                if weights is not None:
                    p.copy_(weights[name])


def load_model(given: str | Source, device: str = "cpu"
               ) -> tuple[nn.Module, Tokenizer, Source]:
    """The plain lmforge model (eval mode) of any source, with its tokenizer."""
    src = given if isinstance(given, Source) else resolve_source(given)
    tok = read_tokenizer(src.tokenizer)
    if tok.get_vocab_size() > src.model.vocab_size:
        raise SourceError(f"{src.tokenizer} has {tok.get_vocab_size()} tokens, more than the "
                          f"model's vocab_size={src.model.vocab_size}: not this model's tokenizer")
    weights = load_weights(src)
    model = build_model(src.model)
    copy_weights(model, weights)
    return model.to(device).eval(), tok, src
