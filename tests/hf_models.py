"""Tiny Hugging Face models (GPT-2, Llama, BERT) saved with a trained lmforge tokenizer, as
`save_pretrained` writes them, for the pretrained-weights, eval and generate tests. Every
weight is random, norm weights and biases too, so a mis-mapped tensor cannot hide."""
from __future__ import annotations

import random
from pathlib import Path

import torch

from lmforge.data.tokenizer import train_tokenizer
from lmforge.export import write_tokenizer

WORDS = ("the model reads a token stream and learns which word follows which; shards ranks "
         "and steps make the loss fall while héllo wörld ünïcode stays bytes").split()


def corpus_text(n_docs: int, seed: int = 0, lengths: tuple[int, int] = (20, 80)) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(*lengths)))
            for _ in range(n_docs)]


def hf_config(family: str, vocab_size: int):
    import transformers

    if family == "gpt2":
        return transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, n_positions=128,
                                       vocab_size=vocab_size, bos_token_id=0, eos_token_id=0)
    if family == "llama":
        return transformers.LlamaConfig(num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, hidden_size=32,
                                        intermediate_size=48, max_position_embeddings=128,
                                        vocab_size=vocab_size, rope_theta=500.0,
                                        bos_token_id=0, eos_token_id=0)
    return transformers.BertConfig(num_hidden_layers=2, num_attention_heads=2, hidden_size=32,
                                   intermediate_size=64, max_position_embeddings=128,
                                   vocab_size=vocab_size)


def tiny_hf(root: Path, family: str, seed: int = 0) -> Path:
    """root/<family>: config.json, model.safetensors and the tokenizer files of a tiny HF
    model whose every parameter is random; returns the directory."""
    import transformers

    out = root / family
    out.mkdir(parents=True)
    arch = "bert" if family == "bert" else "gpt"
    tok = train_tokenizer(corpus_text(200), "wordpiece" if arch == "bert" else "bpe", 300)
    tok.save(str(root / f"{family}-tokenizer.json"))
    write_tokenizer(root / f"{family}-tokenizer.json", tok, out, arch, 128)
    torch.manual_seed(seed)
    cfg = hf_config(family, tok.get_vocab_size())
    auto = transformers.AutoModelForMaskedLM if arch == "bert" else \
        transformers.AutoModelForCausalLM
    model = auto.from_config(cfg)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    model.save_pretrained(out)
    return out


def hf_model(path: Path):
    """The transformers model of an HF directory, in eval mode."""
    import transformers

    family = transformers.AutoConfig.from_pretrained(path).model_type
    auto = transformers.AutoModelForMaskedLM if family == "bert" else \
        transformers.AutoModelForCausalLM
    return auto.from_pretrained(path).eval()
