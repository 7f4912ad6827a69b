"""Layers shared by GPT and BERT: norms, RoPE, fused-qkv SDPA attention, MLP, a transformer
block, the masked cross-entropy and the parameter counter."""
from __future__ import annotations

import contextlib
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from lmforge.config import ModelConfig

IGNORE_INDEX = -100


def ff_dim(cfg: ModelConfig) -> int:
    """Hidden width of the MLP; 4 * d_model unless set."""
    return cfg.d_ff or 4 * cfg.d_model


def kv_heads(cfg: ModelConfig) -> int:
    """Number of key/value heads; n_heads unless grouped-query attention is set."""
    return cfg.n_kv_heads or cfg.n_heads


class RMSNorm(nn.Module):
    """RMSNorm as in HF Llama: normalize in fp32, scale in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """LayerNorm (bias follows cfg.bias) or RMSNorm over d_model."""
    if cfg.norm == "rmsnorm":
        return RMSNorm(cfg.d_model, cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=cfg.bias)


class Rotary(nn.Module):
    """RoPE cos/sin tables in the HF Llama rotate_half layout, computed in fp32 on first use
    and cast to the activations' dtype. Not buffers: construction under ZeRO-3's
    partitioned init (which casts new tensors to the training dtype) or on the meta device
    cannot degrade them, and checkpoints and HF exports never carry them."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta = head_dim, max_seq_len, theta
        self._tables: tuple[Tensor, Tensor] | None = None

    def forward(self, seq_len: int, like: Tensor) -> tuple[Tensor, Tensor]:
        """(cos, sin), each (T, hd) in like's dtype, for positions 0..seq_len-1."""
        if self._tables is None or self._tables[0].device != like.device:
            hd, dev = self.head_dim, like.device
            inv_freq = 1.0 / self.theta ** (torch.arange(0, hd, 2, dtype=torch.float32,
                                                         device=dev) / hd)
            freqs = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32, device=dev),
                                inv_freq)
            emb = torch.cat([freqs, freqs], dim=-1)  # (S, hd)
            self._tables = (emb.cos(), emb.sin())
        cos, sin = self._tables
        return cos[:seq_len].to(like.dtype), sin[:seq_len].to(like.dtype)


def rotate_half(x: Tensor) -> Tensor:
    """(x1, x2) -> (-x2, x1) over the last dim."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate (B, H, T, hd) queries or keys by position."""
    return x * cos.to(x.dtype) + rotate_half(x) * sin.to(x.dtype)


class Attention(nn.Module):
    """Multi-head (or grouped-query) self-attention with one fused qkv projection."""

    def __init__(self, cfg: ModelConfig, causal: bool) -> None:
        super().__init__()
        self.n_heads, self.n_kv = cfg.n_heads, kv_heads(cfg)
        self.head_dim = cfg.d_model // cfg.n_heads
        self.causal = causal
        self.dropout = cfg.dropout
        kv_dim = self.n_kv * self.head_dim
        self.qkv = nn.Linear(cfg.d_model, cfg.d_model + 2 * kv_dim, bias=cfg.bias)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)
        self.resid_drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                mask: Tensor | None = None) -> Tensor:
        """x (B, T, D); mask is additive, broadcastable to (B, H, T, T)."""
        B, T, D = x.shape
        kv_dim = self.n_kv * self.head_dim
        q, k, v = self.qkv(x).split([D, kv_dim, kv_dim], dim=-1)
        q = q.view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = k.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)  # (B, Hkv, T, hd)
        v = v.view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=self.causal and mask is None,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.n_kv != self.n_heads)  # (B, H, T, hd)
        y = y.transpose(1, 2).reshape(B, T, D)
        return self.resid_drop(self.proj(y))


class MLP(nn.Module):
    """Two-layer MLP (tanh or erf GELU) or SwiGLU with one fused gate+up projection."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        d_ff = ff_dim(cfg)
        self.activation = cfg.activation
        fc_out = 2 * d_ff if cfg.activation == "swiglu" else d_ff
        self.fc = nn.Linear(cfg.d_model, fc_out, bias=cfg.bias)
        self.proj = nn.Linear(d_ff, cfg.d_model, bias=cfg.bias)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        h = self.fc(x)  # (B, T, d_ff) or (B, T, 2 * d_ff)
        if self.activation == "swiglu":
            gate, up = h.chunk(2, dim=-1)
            h = F.silu(gate) * up
        else:
            h = F.gelu(h, approximate="tanh" if self.activation == "gelu_tanh" else "none")
        return self.drop(self.proj(h))


class Block(nn.Module):
    """Transformer layer: pre-LN (GPT, Llama) or post-LN (BERT)."""

    def __init__(self, cfg: ModelConfig, causal: bool, pre_norm: bool) -> None:
        super().__init__()
        self.pre_norm = pre_norm
        self.norm1 = make_norm(cfg)
        self.attn = Attention(cfg, causal)
        self.norm2 = make_norm(cfg)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor] | None = None,
                mask: Tensor | None = None) -> Tensor:
        """(B, T, D) -> (B, T, D)."""
        if self.pre_norm:
            x = x + self.attn(self.norm1(x), rope, mask)
            return x + self.mlp(self.norm2(x))
        x = self.norm1(x + self.attn(x, rope, mask))
        return self.norm2(x + self.mlp(x))


def residual_projections(blocks: nn.ModuleList) -> list[nn.Linear]:
    """The Linear layers that write into the residual stream (scaled at init)."""
    return [m for b in blocks for m in (b.attn.proj, b.mlp.proj)]


def init_normal(module: nn.Module, std: float, scaled: list[nn.Linear] = (),
                scaled_std: float = 0.0, gather: Callable[[nn.Parameter], Any] = None) -> None:
    """normal(0, std) for Linear and Embedding weights (scaled_std for the Linears in
    `scaled`), zeros for biases, norms at 1/0. Each tensor is initialised inside
    `gather(param)`: under ZeRO-3 that context gathers one partitioned tensor at a time."""
    gather = gather or (lambda p: contextlib.nullcontext())
    scaled_ids = {id(m) for m in scaled}

    def init(p: nn.Parameter | None, fn: Callable[[Tensor], Any]) -> None:
        if p is not None:
            with gather(p):
                fn(p)

    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            init(m.weight, lambda w: nn.init.normal_(w, mean=0.0, std=std))
        if isinstance(m, (nn.Linear, nn.LayerNorm)):
            init(m.bias, nn.init.zeros_)
        if isinstance(m, (nn.LayerNorm, RMSNorm)):
            init(m.weight, nn.init.ones_)
    # GPT-2: residual writes scaled so the stream's variance does not grow with depth.
    for m in module.modules():
        if id(m) in scaled_ids:
            init(m.weight, lambda w: nn.init.normal_(w, mean=0.0, std=scaled_std))


def masked_cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean CE over labels != -100 in fp32; an all-ignored batch gives 0 with a grad_fn."""
    flat = logits.float().reshape(-1, logits.size(-1))  # (N, V)
    labels = labels.reshape(-1)
    total = F.cross_entropy(flat, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    # Dividing by a clamped count (no host sync) turns 0/0 into 0 instead of NaN.
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


# Logits of more elements than this (tokens x vocab) are made one chunk of rows at a time.
CHUNK_ELEMENTS = 1 << 25  # 32 M: 128 MB of fp32 logits


def _chunk_loss(head: nn.Module, h: Tensor, labels: Tensor) -> Tensor:
    return F.cross_entropy(head(h).float(), labels, ignore_index=IGNORE_INDEX, reduction="sum")


def head_cross_entropy(head: nn.Module, h: Tensor, labels: Tensor, vocab_size: int,
                       chunk_elements: int | None = None) -> Tensor:
    """masked_cross_entropy(head(h), labels) without ever holding all logits: when tokens x
    vocab exceeds chunk_elements, rows go through the head and the loss a chunk at a time,
    each chunk's logits recomputed in backward (activation checkpointing). A 50k vocab at
    8 x 1024 tokens would otherwise hold 1.6 GB of fp32 logits and as much of their grads.
    Small heads take one piece, exactly as masked_cross_entropy."""
    rows = max(1, (chunk_elements or CHUNK_ELEMENTS) // vocab_size)
    if labels.numel() <= rows:
        return masked_cross_entropy(head(h), labels)
    h, labels = h.reshape(-1, h.size(-1)), labels.reshape(-1)  # (N, D), (N,)
    total = sum(checkpoint(_chunk_loss, head, h[i:i + rows], labels[i:i + rows],
                           use_reentrant=False) for i in range(0, labels.numel(), rows))
    return total / (labels != IGNORE_INDEX).sum().clamp(min=1)


def count_params(module: nn.Module, exclude: list[nn.Parameter]) -> int:
    """Unique parameters (tied ones once), leaving out the tensors in exclude."""
    skip = {id(p) for p in exclude}
    # ds_numel: the full size of a parameter that ZeRO-3 holds partitioned.
    return sum(getattr(p, "ds_numel", p.numel()) for p in module.parameters() if id(p) not in skip)
