"""BERT encoder with the masked-LM head of HF BertForMaskedLM (post-LN, no pooler)."""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import ModelConfig
from lmforge.models.layers import (IGNORE_INDEX, Block, count_params, init_normal, make_norm,
                                   head_cross_entropy)


class BERT(nn.Module):
    """Bidirectional encoder whose forward(batch) returns the masked-LM loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is None; set it from the tokenizer first")
        self.cfg = cfg
        self.gradient_checkpointing = False
        self.word_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.type_emb = (nn.Embedding(cfg.type_vocab_size, cfg.d_model)
                         if cfg.type_vocab_size > 0 else None)
        self.emb_norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal=False, pre_norm=False)
                                    for _ in range(cfg.n_layers))
        self.head_dense = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.head_norm = make_norm(cfg)
        self.decoder = nn.Linear(cfg.d_model, cfg.vocab_size, bias=True)
        if cfg.tie_embeddings:
            self.decoder.weight = self.word_emb.weight
        self.init_weights()

    def init_weights(self, gather: Callable[[nn.Parameter], Any] | None = None) -> None:
        """(Re-)initialise every parameter; see init_normal for `gather`."""
        init_normal(self, self.cfg.init_std, gather=gather)

    def hidden(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
               attention_mask: Tensor | None = None) -> Tensor:
        """Encoder output (B, T, D); attention_mask (B, T) has 1 for real tokens."""
        T = input_ids.size(1)
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} > model.max_seq_len={self.cfg.max_seq_len}")
        x = self.word_emb(input_ids) + self.pos_emb(torch.arange(T, device=input_ids.device))
        if self.type_emb is not None:
            if token_type_ids is None:
                token_type_ids = torch.zeros_like(input_ids)
            x = x + self.type_emb(token_type_ids)
        x = self.drop(self.emb_norm(x))  # (B, T, D)
        mask = None
        if attention_mask is not None:
            # Additive finfo.min (as HF) instead of a bool mask: an all-padding row stays finite.
            pad = attention_mask[:, None, None, :] == 0  # (B, 1, 1, T)
            mask = torch.zeros(pad.shape, dtype=x.dtype, device=x.device)
            mask = mask.masked_fill(pad, torch.finfo(x.dtype).min)
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, None, mask, use_reentrant=False)
            else:
                x = block(x, None, mask)
        return x

    def head(self, h: Tensor) -> Tensor:
        """MLM head: (..., D) hidden states -> (..., V) logits."""
        approximate = "tanh" if self.cfg.activation == "gelu_tanh" else "none"
        h = self.head_norm(F.gelu(self.head_dense(h), approximate=approximate))
        return self.decoder(h)

    def logits(self, input_ids: Tensor, token_type_ids: Tensor | None = None,
               attention_mask: Tensor | None = None, **kw: object) -> Tensor:
        """MLM logits (B, T, V) at every position."""
        return self.head(self.hidden(input_ids, token_type_ids, attention_mask))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean CE over the masked positions (labels != -100)."""
        h = self.hidden(batch["input_ids"], batch.get("token_type_ids"),
                        batch.get("attention_mask"))  # (B, T, D)
        labels = batch["labels"]
        # The head runs only where there is a label (~15% of tokens): same loss, less compute.
        picked = labels != IGNORE_INDEX  # (B, T)
        return head_cross_entropy(self.head, h[picked], labels[picked],  # (N, D) vs (N,)
                                  self.cfg.vocab_size)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters; non_embedding leaves out word, position and token-type tables."""
        tables = [self.word_emb.weight, self.pos_emb.weight]
        if self.type_emb is not None:
            tables.append(self.type_emb.weight)
        return count_params(self, tables if non_embedding else [])
