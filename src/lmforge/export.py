"""lmforge models as Hugging Face transformers checkpoints: the pure mappings (a GPT2 / Llama
/ Bert config dict, a renamed, split, transposed state dict) and `lmforge-export`, which
writes model.safetensors, config.json and the tokenizer files of a run's checkpoint."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
from torch import Tensor

from lmforge.config import ModelConfig, writing
from lmforge.models.layers import ff_dim, kv_heads

if TYPE_CHECKING:
    from tokenizers import Tokenizer

Take = Callable[[str], Tensor]  # reads one key of our state dict and marks it mapped


def _require(ok: bool, family: str, what: str) -> None:
    if not ok:
        raise ValueError(f"cannot export to HF {family}: it needs {what}")


def hf_family(cfg: ModelConfig) -> str:
    """Which HF architecture cfg maps onto: 'gpt2', 'llama' or 'bert' (ValueError if none)."""
    if cfg.arch == "bert":
        family = "bert"
    elif cfg.pos_emb == "learned":
        family = "gpt2"
    else:
        family = "llama"
    if family == "llama":
        _require(cfg.norm == "rmsnorm", family, "model.norm=rmsnorm")
        _require(cfg.activation == "swiglu", family, "model.activation=swiglu")
        return family
    _require(cfg.pos_emb == "learned", family, "model.pos_emb=learned")
    _require(cfg.norm == "layernorm", family, "model.norm=layernorm")
    _require(cfg.bias, family, "model.bias=true")
    _require(cfg.activation in ("gelu", "gelu_tanh"), family, "model.activation=gelu|gelu_tanh")
    _require(kv_heads(cfg) == cfg.n_heads, family, "model.n_kv_heads=null (no GQA)")
    return family


def _gelu_name(cfg: ModelConfig) -> str:
    return "gelu_new" if cfg.activation == "gelu_tanh" else "gelu"


def hf_config(cfg: ModelConfig) -> dict[str, Any]:
    """A transformers config dict (for AutoConfig.for_model(**d)) equivalent to cfg."""
    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is None; set it from the tokenizer first")
    family = hf_family(cfg)
    # Special-token ids belong to the tokenizer, not the model: left for the writer to fill.
    common = {"vocab_size": cfg.vocab_size, "initializer_range": cfg.init_std,
              "tie_word_embeddings": cfg.tie_embeddings,
              "bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if family == "gpt2":
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], **common,
                "n_positions": cfg.max_seq_len, "n_embd": cfg.d_model, "n_layer": cfg.n_layers,
                "n_head": cfg.n_heads, "n_inner": ff_dim(cfg),
                "activation_function": _gelu_name(cfg),
                "layer_norm_epsilon": cfg.norm_eps, "resid_pdrop": cfg.dropout,
                "embd_pdrop": cfg.dropout, "attn_pdrop": cfg.dropout}
    if family == "llama":
        return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], **common,
                "hidden_size": cfg.d_model, "intermediate_size": ff_dim(cfg),
                "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
                "num_key_value_heads": kv_heads(cfg), "head_dim": cfg.d_model // cfg.n_heads,
                "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
                "rms_norm_eps": cfg.norm_eps, "rope_theta": cfg.rope_theta,
                "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                "attention_bias": cfg.bias, "mlp_bias": cfg.bias,
                "attention_dropout": cfg.dropout}
    return {"model_type": "bert", "architectures": ["BertForMaskedLM"], **common,
            "hidden_size": cfg.d_model, "num_hidden_layers": cfg.n_layers,
            "num_attention_heads": cfg.n_heads, "intermediate_size": ff_dim(cfg),
            "hidden_act": _gelu_name(cfg), "hidden_dropout_prob": cfg.dropout,
            "attention_probs_dropout_prob": cfg.dropout,
            "max_position_embeddings": cfg.max_seq_len,
            # HF always adds a token-type table; one zero row is exact when we have none.
            "type_vocab_size": max(cfg.type_vocab_size, 1), "layer_norm_eps": cfg.norm_eps}


def to_hf_state_dict(cfg: ModelConfig, state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our names -> HF names for hf_config(cfg)'s model (loads there with strict=True)."""
    # Fused qkv and gate+up are split into copies, GPT-2 Conv1D weights transposed. A tied head
    # maps to the embedding tensor itself: a safetensors writer must drop or clone that key.
    family = hf_family(cfg)
    used: set[str] = set()

    def take(key: str) -> Tensor:
        used.add(key)
        return state_dict[key]

    mapper = {"gpt2": _gpt2, "llama": _llama, "bert": _bert}[family]
    out = mapper(cfg, take, state_dict)
    left = sorted(set(state_dict) - used)
    if left:
        raise ValueError(f"unmapped keys in the lmforge state dict: {left[:5]}")
    return out


def _head(cfg: ModelConfig, take: Take, sd: dict[str, Tensor], head: str, emb: str) -> Tensor:
    """The output projection; a tied one may be absent from a deduplicated state dict."""
    if cfg.tie_embeddings and head not in sd:
        return take(emb)
    return take(head)


def _split(t: Tensor, sizes: list[int]) -> list[Tensor]:
    # Clones, so each HF tensor owns its storage (safetensors refuses shared memory).
    return [p.clone() for p in t.split(sizes, dim=0)]


def _gpt2(cfg: ModelConfig, take: Take, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {"transformer.wte.weight": take("tok_emb.weight"),
           "transformer.wpe.weight": take("pos_emb.weight")}
    conv1d = {"attn.qkv": "attn.c_attn", "attn.proj": "attn.c_proj",
              "mlp.fc": "mlp.c_fc", "mlp.proj": "mlp.c_proj"}
    for i in range(cfg.n_layers):
        p, h = f"blocks.{i}.", f"transformer.h.{i}."
        for ours, theirs in [("norm1", "ln_1"), ("norm2", "ln_2")]:
            for s in ("weight", "bias"):
                out[f"{h}{theirs}.{s}"] = take(f"{p}{ours}.{s}")
        for ours, theirs in conv1d.items():
            # HF GPT-2 uses Conv1D: weight is (in, out), the transpose of nn.Linear's.
            out[f"{h}{theirs}.weight"] = take(f"{p}{ours}.weight").t().contiguous()
            out[f"{h}{theirs}.bias"] = take(f"{p}{ours}.bias")
    out["transformer.ln_f.weight"] = take("norm.weight")
    out["transformer.ln_f.bias"] = take("norm.bias")
    out["lm_head.weight"] = _head(cfg, take, sd, "lm_head.weight", "tok_emb.weight")
    return out


def _llama(cfg: ModelConfig, take: Take, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    out = {"model.embed_tokens.weight": take("tok_emb.weight")}
    kv_dim = kv_heads(cfg) * (cfg.d_model // cfg.n_heads)
    suffixes = ("weight", "bias") if cfg.bias else ("weight",)
    for i in range(cfg.n_layers):
        p, h = f"blocks.{i}.", f"model.layers.{i}."
        out[f"{h}input_layernorm.weight"] = take(f"{p}norm1.weight")
        out[f"{h}post_attention_layernorm.weight"] = take(f"{p}norm2.weight")
        for s in suffixes:
            q, k, v = _split(take(f"{p}attn.qkv.{s}"), [cfg.d_model, kv_dim, kv_dim])
            gate, up = _split(take(f"{p}mlp.fc.{s}"), [ff_dim(cfg), ff_dim(cfg)])
            out.update({f"{h}self_attn.q_proj.{s}": q, f"{h}self_attn.k_proj.{s}": k,
                        f"{h}self_attn.v_proj.{s}": v,
                        f"{h}self_attn.o_proj.{s}": take(f"{p}attn.proj.{s}"),
                        f"{h}mlp.gate_proj.{s}": gate, f"{h}mlp.up_proj.{s}": up,
                        f"{h}mlp.down_proj.{s}": take(f"{p}mlp.proj.{s}")})
    out["model.norm.weight"] = take("norm.weight")
    out["lm_head.weight"] = _head(cfg, take, sd, "lm_head.weight", "tok_emb.weight")
    return out


def _bert(cfg: ModelConfig, take: Take, sd: dict[str, Tensor]) -> dict[str, Tensor]:
    e = "bert.embeddings."
    word = take("word_emb.weight")
    types = (take("type_emb.weight") if cfg.type_vocab_size > 0
             else torch.zeros(1, cfg.d_model, dtype=word.dtype, device=word.device))
    out = {f"{e}word_embeddings.weight": word,
           f"{e}position_embeddings.weight": take("pos_emb.weight"),
           f"{e}token_type_embeddings.weight": types,
           f"{e}LayerNorm.weight": take("emb_norm.weight"),
           f"{e}LayerNorm.bias": take("emb_norm.bias")}
    d = cfg.d_model
    plain = {"attn.proj": "attention.output.dense", "norm1": "attention.output.LayerNorm",
             "mlp.fc": "intermediate.dense", "mlp.proj": "output.dense",
             "norm2": "output.LayerNorm"}
    for i in range(cfg.n_layers):
        p, h = f"blocks.{i}.", f"bert.encoder.layer.{i}."
        for s in ("weight", "bias"):
            q, k, v = _split(take(f"{p}attn.qkv.{s}"), [d, d, d])
            out.update({f"{h}attention.self.query.{s}": q, f"{h}attention.self.key.{s}": k,
                        f"{h}attention.self.value.{s}": v})
            for ours, theirs in plain.items():
                out[f"{h}{theirs}.{s}"] = take(f"{p}{ours}.{s}")
    c = "cls.predictions."
    for s in ("weight", "bias"):
        out[f"{c}transform.dense.{s}"] = take(f"head_dense.{s}")
        out[f"{c}transform.LayerNorm.{s}"] = take(f"head_norm.{s}")
    out[f"{c}decoder.weight"] = _head(cfg, take, sd, "decoder.weight", "word_emb.weight")
    out[f"{c}decoder.bias"] = take("decoder.bias")
    out[f"{c}bias"] = out[f"{c}decoder.bias"]  # HF ties these two
    return out


# A piece of an lmforge tensor in an HF checkpoint: the HF names that hold it (tied copies
# are alternatives) and whether it is stored transposed (GPT-2's Conv1D).
Piece = tuple[tuple[str, ...], bool]


def hf_pieces(cfg: ModelConfig) -> dict[str, list[Piece]]:
    """to_hf_state_dict run backwards: for each lmforge key of cfg's model (a tied head left
    out), the HF tensors it is made of, concatenated along dim 0 in this order. Found by
    mapping a small model of the same structure whose entries are their own positions, so the
    mapping above stays the only one."""
    small = dataclasses.replace(cfg, d_model=8, n_heads=2, d_ff=12, vocab_size=5, max_seq_len=3,
                                n_kv_heads=None if kv_heads(cfg) == cfg.n_heads else 1,
                                type_vocab_size=min(cfg.type_vocab_size, 2))
    from lmforge.models import build_model

    with torch.device("meta"):
        named = dict(build_model(small).named_parameters())  # tied parameters once
    probe, start = {}, 1  # 0 marks an HF entry made of nothing of ours (BERT's zero types)
    for k, p in named.items():
        probe[k] = torch.arange(start, start + p.numel(), dtype=torch.float64).view(p.shape)
        start += p.numel()
    found: dict[str, dict[int, tuple[int, Piece]]] = {k: {} for k in probe}
    for hf_key, t in to_hf_state_dict(small, probe).items():
        first = float(t.flatten()[0])
        if first == 0:
            continue
        key = next(k for k, v in probe.items() if v.flatten()[0] <= first <= v.flatten()[-1])
        src = probe[key]
        row = int(first - src.flatten()[0]) // (src.numel() // src.shape[0])
        transposed = next(tr for tr in (False, True) if _same(src, row, t.t() if tr else t))
        names = found[key][row][1][0] if row in found[key] else ()
        found[key][row] = (len(t.t() if transposed else t), (names + (hf_key,), transposed))
    out = {}
    for key, rows in found.items():
        ends = [0] + [r + rows[r][0] for r in sorted(rows)]
        if not rows or ends[:-1] != sorted(rows) or ends[-1] != len(probe[key]):
            raise AssertionError(f"to_hf_state_dict does not cover {key} exactly once")
        out[key] = [rows[r][1] for r in sorted(rows)]
    return out


def _same(src: Tensor, row: int, piece: Tensor) -> bool:
    return piece.shape[1:] == src.shape[1:] and torch.equal(src[row:row + len(piece)], piece)


# ---------------------------------------------------------------- lmforge-export

# Copies HF re-ties on load (tie_word_embeddings; BERT's decoder bias is cls.predictions.bias):
# written once, since safetensors refuses tensors that share memory.
TIED_COPIES = ("lm_head.weight", "cls.predictions.decoder.weight", "cls.predictions.decoder.bias")


class ExportError(ValueError):
    """Bad input for lmforge-export; the message is one line."""


def safetensors_ready(hf_sd: dict[str, Tensor]) -> dict[str, Tensor]:
    """Each tensor once (tied copies dropped) and in its own contiguous storage."""
    out: dict[str, Tensor] = {}
    first: dict[int, str] = {}
    for k in sorted(hf_sd, key=lambda k: k in TIED_COPIES):  # tie sources first
        t = hf_sd[k]
        if t.data_ptr() in first:
            if k not in TIED_COPIES:
                raise ExportError(f"{k} shares memory with {first[t.data_ptr()]}, which HF "
                                  "does not tie")
            continue
        first[t.data_ptr()] = k
        # A slice of DeepSpeed's flat buffer would be written with the whole buffer.
        whole = t.untyped_storage().nbytes() == t.numel() * t.element_size()
        out[k] = t.contiguous() if whole else t.clone()
    return out


def write_tokenizer(src: Path, tok: Tokenizer, out: Path, arch: str,
                    max_len: int) -> dict[str, int]:
    """tokenizer.json (as trained) plus the transformers files that name its special tokens
    (read by AutoTokenizer in transformers 4 and 5); returns the special-token ids."""
    from lmforge.data.tokenizer import SPECIALS, kind_for, special_ids

    kind = kind_for(arch)  # what the data loader used, whatever tokenizer.kind says
    ids = special_ids(tok, kind)
    roles = SPECIALS[kind]
    if kind == "bpe":  # GPT-2's convention: one token begins and ends every document
        eos = tok.id_to_token(ids["eos"])
        specials = {"bos_token": eos, "eos_token": eos}
    else:
        specials = {f"{role}_token": token for role, token in roles.items()}
    (out / "tokenizer.json").write_bytes(src.read_bytes())
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
              "clean_up_tokenization_spaces": False, **specials}
    for name, body in [("tokenizer_config.json", config), ("special_tokens_map.json", specials)]:
        (out / name).write_text(json.dumps(body, indent=2) + "\n")
    if kind == "bpe":
        return {"bos_token_id": ids["eos"], "eos_token_id": ids["eos"]}
    return {"pad_token_id": ids["pad"]}


def export(src: Path, out: Path, force: bool = False) -> str:
    """Write the HF model of `src` (a run or checkpoint directory) as the directory `out`
    (refused if it exists, unless `force`: then replaced whole); a summary."""
    from safetensors.torch import save_file

    from lmforge.consolidate import check_state_dict, consolidate, resolve, run_model_config
    from lmforge.data.tokenizer import load_tokenizer

    from lmforge.checkpoint import MANIFEST, verify

    if (out.exists() or out.is_symlink()) and not force:
        raise ExportError(f"{out} already exists; pass --force to replace it, or choose "
                          "another OUT")
    run_dir, ckpt = resolve(src)
    real = out.resolve()
    if any(real == p or real in p.parents for p in (run_dir.resolve(), ckpt.resolve())):
        raise ExportError(f"{out} holds the run being exported ({run_dir}); choose an OUT "
                          "outside it")
    if (ckpt / MANIFEST).is_file() and (problem := verify(ckpt)):
        raise ExportError(f"{ckpt} is damaged: {problem}")
    # A checkpoint carries its own tokenizer and config; older ones rely on the run's.
    tok_path = ckpt / "tokenizer.json" if (ckpt / "tokenizer.json").is_file() \
        else run_dir / "tokenizer.json"
    if not tok_path.is_file():
        raise ExportError(f"{tok_path} is missing: the export needs the run's tokenizer")
    tok = load_tokenizer(tok_path)
    cfg = run_model_config(run_dir, ckpt, tok.get_vocab_size())
    config = hf_config(cfg)  # fails before the (slow) consolidation when HF has no such model
    sd = consolidate(ckpt)
    check_state_dict(cfg, sd)
    tensors = safetensors_ready(to_hf_state_dict(cfg, sd))
    # Everything goes into a sibling first: OUT appears complete or not at all, and never
    # holds a config.json without its weights or files of an earlier export.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        with writing(tmp):
            tmp.mkdir(parents=True)
            config.update(write_tokenizer(tok_path, tok, tmp, cfg.arch, cfg.max_seq_len),
                          torch_dtype="float32")
            save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
            (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        with writing(out):
            _replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    n = sum(t.numel() for t in tensors.values())
    return f"wrote {out} ({config['model_type']}, {n:,} parameters) from {ckpt}"


def _replace(new: Path, out: Path) -> None:
    """Rename the directory `new` to `out`, first moving aside (then deleting) what was there."""
    if not (out.exists() or out.is_symlink()):
        os.replace(new, out)
        return
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    os.replace(out, old)
    os.replace(new, out)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old)
    else:
        old.unlink()


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="lmforge-export", description="Export an lmforge checkpoint as a Hugging Face "
        "model directory (model.safetensors, config.json, tokenizer files).")
    parser.add_argument("src", type=Path, help="a run directory (exports checkpoints/latest) "
                        "or a checkpoint directory RUN/checkpoints/step_XXXXXXXX")
    parser.add_argument("out", type=Path, help="the directory to write (a new one)")
    parser.add_argument("--force", action="store_true", help="replace OUT if it exists")
    args = parser.parse_args(argv)
    try:
        print(export(args.src, args.out, args.force))
    except (ValueError, OSError) as e:  # ours, ConfigError, hf_family's; OUT is a file
        print(f"lmforge-export: error: {e}", file=sys.stderr)
        return 2
    return 0


def cli() -> None:
    sys.exit(main(sys.argv[1:]))


if __name__ == "__main__":
    cli()
