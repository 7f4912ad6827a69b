"""Pretrained models from wherever lmforge can read them: an HF model directory (GPT-2, Llama,
BERT; an lmforge export is one), a run or checkpoint directory, or a hub name. What PATH is,
with its model config and tokenizer (`resolve_source`; no weights read, no torch needed for an
HF directory), and model.init_from applied to a config. lmforge.weights reads the weights."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from lmforge.config import ConfigError, ModelConfig, TrainConfig

if TYPE_CHECKING:
    from tokenizers import Tokenizer

FAMILIES = {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "bert": "BertForMaskedLM"}
SUPPORTED = ", ".join(f"{k} ({v})" for k, v in FAMILIES.items())
KINDS = ("an HF model directory (config.json), an lmforge export, a run directory (config.yaml, "
         "checkpoints/latest), a checkpoint directory (*_model_states.pt) or a hub name")
# The model keys a source fixes (its architecture); dropout and init_std stay the user's.
ARCH_KEYS = ("arch", "n_layers", "n_heads", "n_kv_heads", "d_model", "d_ff", "max_seq_len",
             "vocab_size", "norm", "norm_eps", "activation", "pos_emb", "rope_theta", "bias",
             "tie_embeddings", "type_vocab_size")
# What transformers' config classes assume for a key a config.json leaves out (older files,
# such as the hub's gpt2, omit keys at their default).
_HF_DEFAULTS: dict[str, dict[str, Any]] = {
    "gpt2": {"vocab_size": 50257, "n_positions": 1024, "n_embd": 768, "n_layer": 12,
             "n_head": 12, "n_inner": None, "activation_function": "gelu_new",
             "layer_norm_epsilon": 1e-5, "tie_word_embeddings": True, "scale_attn_weights": True,
             "scale_attn_by_inverse_layer_idx": False, "reorder_and_upcast_attn": False},
    "llama": {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": None,
              "head_dim": None, "hidden_act": "silu", "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0,
              "rope_scaling": None, "rope_parameters": None, "attention_bias": False,
              "mlp_bias": False},
    "bert": {"vocab_size": 30522, "hidden_size": 768, "num_hidden_layers": 12,
             "num_attention_heads": 12, "intermediate_size": 3072, "hidden_act": "gelu",
             "max_position_embeddings": 512, "type_vocab_size": 2, "layer_norm_eps": 1e-12,
             "tie_word_embeddings": True, "position_embedding_type": "absolute",
             "is_decoder": False},
}
_ACTIVATIONS = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


class SourceError(ConfigError):
    """PATH cannot be used as a pretrained model; the message is one line."""


@dataclass(frozen=True)
class Source:
    given: str  # as the user wrote it
    kind: str  # "hf" (a transformers directory: an lmforge export, a hub snapshot) | "run"
    path: Path  # the HF directory, or the run's checkpoint directory
    model: ModelConfig  # vocab_size set
    tokenizer: Path
    family: str  # gpt2 | llama | bert for "hf"; the lmforge arch for "run"

    def describe(self) -> dict[str, str]:
        return {"path": self.given, "resolved": str(self.path), "kind": self.kind,
                "family": self.family}


def resolve_source(given: str) -> Source:
    """What `given` is, with its model config and tokenizer file (SourceError if none)."""
    path = Path(given).expanduser()
    if not path.exists() and re.fullmatch(r"[A-Za-z0-9][\w.-]*(/[\w.-]+)?", given) \
            and ".." not in given:
        path = _download(given)
    if not path.exists():
        raise SourceError(f"{given} does not exist; pass {KINDS}")
    if not path.is_dir():
        raise SourceError(f"{given} is a file; pass {KINDS}")
    if (path / "config.json").is_file():
        return _hf_source(given, path)
    return _run_source(given, path)


def _download(name: str) -> Path:
    """A hub snapshot of what lmforge reads: configs, tokenizer, weights (.bin only if the
    repository has no safetensors)."""
    from huggingface_hub import snapshot_download

    try:
        d = Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors"]))
        if not any(d.glob("*.safetensors")):
            d = Path(snapshot_download(name, allow_patterns=["*.json", "pytorch_model*.bin"]))
    except Exception as e:  # offline, unknown, gated: the hub's many error types
        why = (str(e).strip().splitlines() or [""])[0]
        raise SourceError(f"{name} is not a local path, and the hub did not give it "
                          f"({type(e).__name__}: {why})") from None
    return d


def _hf_source(given: str, path: Path) -> Source:
    try:
        d = json.loads((path / "config.json").read_text())
    except ValueError as e:
        raise SourceError(f"{path / 'config.json'} is not valid JSON ({e})") from None
    model = from_hf_config(d, str(path / "config.json"))
    if not any((path / f).is_file() for f in WEIGHT_FILES):
        raise SourceError(f"{path} has a config.json but no weights (none of "
                          f"{', '.join(WEIGHT_FILES)})")
    tok = path / "tokenizer.json"
    if not tok.is_file():
        raise SourceError(f"{path} has no tokenizer.json (lmforge reads the fast-tokenizer "
                          "file: AutoTokenizer.from_pretrained(...).save_pretrained(DIR) "
                          "writes one)")
    return Source(given, "hf", path, model, tok, d["model_type"])


def _run_source(given: str, path: Path) -> Source:
    from lmforge.consolidate import CheckpointError, resolve, run_model_config

    try:
        run_dir, ckpt = resolve(path)
        tok = next((p for p in (ckpt / "tokenizer.json", run_dir / "tokenizer.json")
                    if p.is_file()), None)
        if tok is None:
            raise SourceError(f"{run_dir / 'tokenizer.json'} is missing: the run's "
                              "tokenizer is needed")
        model = run_model_config(run_dir, ckpt, read_tokenizer(tok).get_vocab_size())
    except CheckpointError as e:
        if "is neither" in str(e):
            raise SourceError(f"{given} is none of {KINDS}") from None
        raise SourceError(str(e)) from None
    # The source's own init_from is its history, not its architecture.
    return Source(given, "run", ckpt, dataclasses.replace(model, init_from=None), tok,
                  model.arch)


def read_tokenizer(path: Path) -> Tokenizer:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # the tokenizers library raises a bare Exception
        raise SourceError(f"{path} is not a valid tokenizer.json: "
                          f"{str(e).splitlines()[0]}") from None


def from_hf_config(d: dict[str, Any], where: str = "config.json") -> ModelConfig:
    """The lmforge model of a transformers config dict (export.hf_config run backwards);
    SourceError names what lmforge does not build."""
    family = d.get("model_type")
    if family not in FAMILIES:
        raise SourceError(f"{where}: model_type={family!r} is not a model family lmforge "
                          f"builds; supported: {SUPPORTED}")

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise SourceError(f"{where}: {what} is not part of the {family} lmforge builds")

    reader = {"gpt2": _gpt2, "llama": _llama, "bert": _bert}[family]
    return reader({**_HF_DEFAULTS[family], **d}, need)


Need = Callable[[bool, str], None]


def _gpt2(c: dict[str, Any], need: Need) -> ModelConfig:
    need(c["activation_function"] in _ACTIVATIONS,
         f"activation_function={c['activation_function']!r}")
    need(c["scale_attn_weights"] and not c["scale_attn_by_inverse_layer_idx"]
         and not c["reorder_and_upcast_attn"], "non-standard attention scaling")
    return ModelConfig(arch="gpt", n_layers=c["n_layer"], n_heads=c["n_head"],
                       d_model=c["n_embd"], d_ff=c["n_inner"], max_seq_len=c["n_positions"],
                       vocab_size=c["vocab_size"], norm="layernorm",
                       norm_eps=c["layer_norm_epsilon"],
                       activation=_ACTIVATIONS[c["activation_function"]], pos_emb="learned",
                       bias=True, tie_embeddings=c["tie_word_embeddings"])


def _llama(c: dict[str, Any], need: Need) -> ModelConfig:
    # transformers 5 writes rope_parameters; older config.json files rope_theta/rope_scaling.
    rope = c["rope_parameters"] or c["rope_scaling"] or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    need(kind == "default", f"rope type {kind!r} (scaled RoPE)")
    need(c["hidden_act"] == "silu", f"hidden_act={c['hidden_act']!r}")
    need(c["attention_bias"] == c["mlp_bias"], "attention_bias != mlp_bias")
    heads, width = c["num_attention_heads"], c["hidden_size"]
    need((c["head_dim"] or width // heads) * heads == width,
         f"head_dim={c['head_dim']} x {heads} heads != hidden_size={width}")
    kv = c["num_key_value_heads"] or heads
    return ModelConfig(arch="gpt", n_layers=c["num_hidden_layers"], n_heads=heads,
                       n_kv_heads=None if kv == heads else kv, d_model=width,
                       d_ff=c["intermediate_size"], max_seq_len=c["max_position_embeddings"],
                       vocab_size=c["vocab_size"], norm="rmsnorm", norm_eps=c["rms_norm_eps"],
                       activation="swiglu", pos_emb="rope",
                       rope_theta=float(rope.get("rope_theta", c["rope_theta"])),
                       bias=c["attention_bias"], tie_embeddings=c["tie_word_embeddings"])


def _bert(c: dict[str, Any], need: Need) -> ModelConfig:
    need(c["hidden_act"] in _ACTIVATIONS, f"hidden_act={c['hidden_act']!r}")
    need(c["position_embedding_type"] == "absolute",
         f"position_embedding_type={c['position_embedding_type']!r}")
    need(not c["is_decoder"], "is_decoder=true")
    return ModelConfig(arch="bert", n_layers=c["num_hidden_layers"],
                       n_heads=c["num_attention_heads"], d_model=c["hidden_size"],
                       d_ff=c["intermediate_size"], max_seq_len=c["max_position_embeddings"],
                       vocab_size=c["vocab_size"], norm="layernorm", norm_eps=c["layer_norm_eps"],
                       activation=_ACTIVATIONS[c["hidden_act"]], pos_emb="learned", bias=True,
                       tie_embeddings=c["tie_word_embeddings"],
                       type_vocab_size=c["type_vocab_size"])


# ------------------------------------------------------------ model.init_from in the config

def effective(m: ModelConfig, key: str) -> Any:
    """The value of an architecture key as the model uses it (d_ff None = 4 x d_model, ...)."""
    if key == "d_ff":
        return m.d_ff or 4 * m.d_model
    if key == "n_kv_heads":
        return m.n_kv_heads or m.n_heads
    if (key == "rope_theta" and m.pos_emb != "rope") or (key == "type_vocab_size"
                                                        and m.arch != "bert"):
        return None  # not read by this model
    return getattr(m, key)


def apply_init_from(cfg: TrainConfig, overrides: list[str]) -> None:
    """Set cfg's architecture and tokenizer from model.init_from's source. A model value the
    command line sets (model.KEY=..., or model=GROUP) that contradicts it is refused."""
    src = resolve_source(str(cfg.model.init_from))
    keys, group = set(), None
    for o in overrides:
        key, _, value = o.lstrip("+~").partition("=")
        if key == "model":
            group = value
        elif key.startswith("model."):
            keys.add(key.split(".", 1)[1])
    for k in ARCH_KEYS:
        ours, theirs = effective(cfg.model, k), effective(src.model, k)
        if (k in keys or group) and ours != theirs and not (k == "vocab_size" and ours is None):
            said = f"model.{k}={ours}" if k in keys else f"model={group} (its {k}={ours})"
            raise SourceError(f"{said} contradicts model.init_from={src.given}, whose model has "
                              f"{k}={theirs}; drop it (model.init_from sets the architecture)")
    if cfg.tokenizer.path and Path(cfg.tokenizer.path).resolve() != src.tokenizer.resolve():
        raise SourceError(f"tokenizer.path={cfg.tokenizer.path} is set, but model.init_from "
                          f"brings its own tokenizer ({src.tokenizer}); drop tokenizer.path")
    cfg.model = dataclasses.replace(cfg.model, **{k: getattr(src.model, k) for k in ARCH_KEYS})
    cfg.tokenizer = dataclasses.replace(cfg.tokenizer, path=str(src.tokenizer))
