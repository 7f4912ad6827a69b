"""Model registry: model.arch picks a builder from MODELS."""
from __future__ import annotations

from torch import nn

from lmforge.config import ModelConfig
from lmforge.models.bert import BERT
from lmforge.models.gpt import GPT

MODELS: dict[str, type[nn.Module]] = {"gpt": GPT, "bert": BERT}


def build_model(cfg: ModelConfig) -> nn.Module:
    """Instantiate the model for cfg.arch; cfg.vocab_size must already be set."""
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is None; set it from the tokenizer before build_model")
    if cfg.arch not in MODELS:
        raise ValueError(f"model.arch={cfg.arch!r} is not allowed; choose one of {list(MODELS)}")
    return MODELS[cfg.arch](cfg)
