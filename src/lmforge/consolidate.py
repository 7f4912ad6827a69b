"""A run's checkpoint read back: the run and checkpoint directories, the model config, and
one full fp32 state dict on CPU merged from the shards of any ZeRO stage, read without
unpickling anything but tensors, containers and a few plain DeepSpeed records."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import pickle
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from lmforge import engine
from lmforge.config import ModelConfig, pad_vocab
from lmforge.manifest import load_error

# weights_only=True is a real sandbox only from torch 2.6 (CVE-2025-32434).
MIN_TORCH = (2, 6)


class CheckpointError(ValueError):
    """A checkpoint cannot be read (safely); the message is one line."""


def resolve(path: Path) -> tuple[Path, Path]:
    """(run dir, checkpoint dir) for a run directory (its checkpoints/latest) or a
    checkpoint directory RUN/checkpoints/<tag>."""
    from lmforge.checkpoint import LATEST

    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not path.is_dir():
        raise CheckpointError(f"{path} is not a directory: pass a run directory or "
                              "RUN/checkpoints/step_XXXXXXXX")
    if any(path.glob("*_model_states.pt")):
        return path.parent.parent, path
    pointer = path / "checkpoints" / LATEST
    if not pointer.is_file():
        if (path / "config.yaml").is_file():
            raise CheckpointError(f"{path} has no checkpoint yet ({pointer} is missing)")
        raise CheckpointError(f"{path} is neither a run directory (no config.yaml, no "
                              "checkpoints/latest) nor a checkpoint (no *_model_states.pt)")
    tag = pointer.read_text().strip()
    if not (path / "checkpoints" / tag).is_dir():
        raise CheckpointError(f"{pointer} names {tag!r}, which is not in {pointer.parent}")
    return path, path / "checkpoints" / tag


def run_model_config(run_dir: Path, ckpt: Path, vocab_size: int) -> ModelConfig:
    """The model config of the run's config.yaml, vocab_size resolved as the trainer does,
    checked against the one the checkpoint's trainer state recorded."""
    from omegaconf import OmegaConf

    path = ckpt / "config.yaml" if (ckpt / "config.yaml").is_file() else run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{path} is missing: the run's resolved config is needed")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), OmegaConf.load(path).model)
        cfg = OmegaConf.to_object(merged)
    except Exception as e:  # OmegaConf's errors span several lines
        raise CheckpointError(f"{path} has no valid model config: "
                              f"{str(e).splitlines()[0]}") from None
    # config.yaml keeps model.vocab_size=null when the trainer took it from the tokenizer.
    cfg = dataclasses.replace(cfg, vocab_size=cfg.vocab_size or pad_vocab(vocab_size))
    trained = _trained_model(ckpt / "trainer_rank0.pt")
    ours = dataclasses.asdict(cfg)
    for k in sorted(set(ours) & set(trained)):
        if trained[k] != ours[k]:
            raise CheckpointError(f"{path} has model.{k}={ours[k]!r} but {ckpt.name} was "
                                  f"trained with {trained[k]!r} (config.yaml rewritten by a "
                                  "later run?)")
    return cfg


def _trained_model(path: Path) -> dict[str, Any]:
    """The model config the trainer recorded in its state (tensors and plain types only)."""
    if not path.is_file():
        return {}
    _check_torch()
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # unreadable or not plain data: refused, never unpickled
        raise CheckpointError(f"cannot read {path}: {load_error(e)}") from None
    model = state.get("model") if isinstance(state, dict) else None
    return model if isinstance(model, dict) else {}


def check_state_dict(cfg: ModelConfig, sd: dict[str, Tensor]) -> None:
    """The consolidated weights have exactly the names and shapes of cfg's model."""
    from lmforge.models import build_model

    with torch.device("meta"):
        expected = build_model(cfg).state_dict(keep_vars=True)
    first: dict[int, str] = {}
    for k, v in expected.items():
        first.setdefault(id(v), k)
    tied = {k for k, v in expected.items() if first[id(v)] != k}  # may be left out
    problems = [("misses", sorted(set(expected) - set(sd) - tied)),
                ("has unexpected", sorted(set(sd) - set(expected))),
                ("has wrong shapes for",
                 [k for k in expected if k in sd and sd[k].shape != expected[k].shape])]
    for what, keys in problems:
        if keys:
            raise CheckpointError(f"the checkpoint {what} {keys[:3]} for the model of "
                                  "config.yaml")


def _check_torch() -> None:
    if torch.torch_version.TorchVersion(torch.__version__) < MIN_TORCH:
        need = ".".join(map(str, MIN_TORCH))
        raise CheckpointError(f"safe checkpoint loading needs torch>={need}, "
                              f"this is {torch.__version__}")


def _to_fp32(sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Floating tensors as fp32; entries that share memory (a tied head) stay one tensor."""
    done: dict[tuple, Tensor] = {}
    out = {}
    for k, v in sd.items():
        key = (v.data_ptr(), v.shape, v.stride(), v.dtype)
        if key not in done:
            done[key] = v.float() if v.is_floating_point() else v
        out[k] = done[key]
    return out


def _stage0(ckpt: Path) -> dict[str, Tensor]:
    # Stage 0 keeps whole weights in the model-states file. Under bf16/fp16 they are the
    # half-precision copies: the optimizer's fp32 masters there are unnamed.
    path = ckpt / "mp_rank_00_model_states.pt"
    if not path.is_file():
        raise CheckpointError(f"{ckpt} has no DeepSpeed model states "
                              "(mp_rank_00_model_states.pt): not a DeepSpeed checkpoint?")
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)["module"]


def consolidate(ckpt: Path) -> dict[str, Tensor]:
    """The full fp32 state dict (CPU) of the DeepSpeed checkpoint directory `ckpt`
    (`.../checkpoints/<tag>`), merged from the shards of every rank."""
    _check_torch()
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt} is not a directory")
    sharded = any(ckpt.glob("*_optim_states.pt"))  # ZeRO 1-3; stage 0 writes none
    # DeepSpeed prints progress and tqdm bars: kept out of the CLI's output.
    quiet = io.StringIO()
    try:
        with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), \
                engine.weights_only():
            if not sharded:
                sd = _stage0(ckpt)
            else:
                sd = engine.zero_fp32_state_dict(ckpt)
    except CheckpointError:
        raise
    except (pickle.UnpicklingError, RuntimeError, ValueError, OSError, KeyError,
            TypeError, NotImplementedError) as e:
        raise CheckpointError(f"cannot consolidate {ckpt}: {load_error(e)}") from None
    return _to_fp32(sd)
