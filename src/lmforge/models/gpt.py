"""Decoder-only LM: GPT-2 style (learned positions, LayerNorm, tied head) or Llama style
(RoPE, RMSNorm, SwiGLU, no biases) from the same ModelConfig."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import ModelConfig
from lmforge.models.layers import (Block, Rotary, count_params, init_normal, make_norm,
                                   head_cross_entropy, residual_projections)


class GPT(nn.Module):
    """Causal transformer whose forward(batch) returns the next-token loss."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        if cfg.vocab_size is None:
            raise ValueError("model.vocab_size is None; set it from the tokenizer first")
        self.cfg = cfg
        self.gradient_checkpointing = False
        self.tok_emb = nn.Embedding(cfg.vocab_size, cfg.d_model)
        learned = cfg.pos_emb == "learned"
        self.pos_emb = nn.Embedding(cfg.max_seq_len, cfg.d_model) if learned else None
        self.rope = (None if learned else
                     Rotary(cfg.d_model // cfg.n_heads, cfg.max_seq_len, cfg.rope_theta))
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg, causal=True, pre_norm=True)
                                    for _ in range(cfg.n_layers))
        self.norm = make_norm(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_emb.weight
        self.init_weights()

    def init_weights(self, gather: Callable[[nn.Parameter], Any] | None = None) -> None:
        """(Re-)initialise every parameter; see init_normal for `gather`."""
        init_normal(self, self.cfg.init_std, residual_projections(self.blocks),
                    self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers), gather)

    def hidden(self, input_ids: Tensor) -> Tensor:
        """Final-norm hidden states (B, T, D) for input_ids (B, T)."""
        T = input_ids.size(1)
        if T > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {T} > model.max_seq_len={self.cfg.max_seq_len}")
        x = self.tok_emb(input_ids)  # (B, T, D)
        if self.pos_emb is not None:
            x = x + self.pos_emb(torch.arange(T, device=input_ids.device))
        x = self.drop(x)
        rope = self.rope(T, x) if self.rope is not None else None
        for block in self.blocks:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(block, x, rope, use_reentrant=False)
            else:
                x = block(x, rope)
        return self.norm(x)

    def logits(self, input_ids: Tensor, **kw: object) -> Tensor:
        """Next-token logits (B, T, V)."""
        return self.lm_head(self.hidden(input_ids))

    def forward(self, batch: dict[str, Tensor]) -> Tensor:
        """Mean CE of logits against batch['labels'] (already shifted; -100 ignored)."""
        return head_cross_entropy(self.lm_head, self.hidden(batch["input_ids"]), batch["labels"],
                                  self.cfg.vocab_size)

    def num_params(self, non_embedding: bool = False) -> int:
        """Unique parameters; non_embedding leaves out token and position tables."""
        tables = [self.tok_emb.weight]
        if self.pos_emb is not None:
            tables.append(self.pos_emb.weight)
        return count_params(self, tables if non_embedding else [])

    @torch.no_grad()
    def generate(self, input_ids: Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> Tensor:
        """Append max_new_tokens sampled tokens to input_ids (B, T); temperature 0 is greedy."""
        was_training = self.training
        self.eval()  # dropout would make sampling depend on more than the generator
        for _ in range(max_new_tokens):
            ctx = input_ids[:, -self.cfg.max_seq_len:]
            logits = self.logits(ctx)[:, -1, :].float()  # (B, V)
            if temperature <= 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None:
                    kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, 1, generator=generator)  # (B, 1)
            input_ids = torch.cat([input_ids, nxt], dim=1)
        self.train(was_training)
        return input_ids
