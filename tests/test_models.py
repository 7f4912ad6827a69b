"""GPT and BERT: exact parameter counts of the shipped presets, logit parity with HF on shared
weights, masking, gradients, checkpointing, sampling and the export mapping."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from lmforge.config import ModelConfig
from lmforge.export import hf_config, to_hf_state_dict
from lmforge.models import BERT, GPT, MODELS, build_model

PRESETS = Path(__file__).resolve().parents[1] / "conf" / "model"

GPT2_TINY = ModelConfig(arch="gpt", n_layers=2, n_heads=4, d_model=64, max_seq_len=32,
                        vocab_size=101)
LLAMA_TINY = ModelConfig(arch="gpt", n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_ff=96,
                         max_seq_len=64, vocab_size=101, norm="rmsnorm", activation="swiglu",
                         pos_emb="rope", rope_theta=500.0, bias=False, tie_embeddings=False)
BERT_TINY = ModelConfig(arch="bert", n_layers=2, n_heads=4, d_model=64, d_ff=128,
                        max_seq_len=32, vocab_size=101, norm_eps=1e-12, activation="gelu")


def preset(name: str, vocab_size: int) -> ModelConfig:
    """A shipped conf/model preset merged onto the schema, as Hydra would compose it."""
    yaml = OmegaConf.load(PRESETS / f"{name}.yaml")
    merged = OmegaConf.merge(OmegaConf.structured(ModelConfig), yaml)
    merged.vocab_size = vocab_size
    return OmegaConf.to_object(merged)


def seeded(cfg: ModelConfig, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return build_model(cfg)


def perturbed(cfg: ModelConfig) -> torch.nn.Module:
    """Ours with every parameter random (norm weights, biases): a strict test of the mapping."""
    model = seeded(cfg)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1 + (1.0 if p.dim() == 1 else 0.0))
    return model.eval()


def hf_twin(cfg: ModelConfig, model: torch.nn.Module) -> torch.nn.Module:
    """The HF model from hf_config(cfg) loaded (strict) with to_hf_state_dict of ours."""
    transformers = pytest.importorskip("transformers")
    d = hf_config(cfg)
    hf = getattr(transformers, d["architectures"][0])(transformers.AutoConfig.for_model(**d))
    hf.load_state_dict(to_hf_state_dict(cfg, model.state_dict()), strict=True)
    return hf.eval()


def hf_meta_params(cls_name: str, config: object) -> int:
    transformers = pytest.importorskip("transformers")
    with torch.device("meta"):
        return sum(p.numel() for p in getattr(transformers, cls_name)(config).parameters())


@pytest.mark.parametrize("name, vocab, total, non_emb, hf_default", [
    ("gpt2_124m", 50257, 124_439_808, 85_056_000, "GPT2Config"),
    ("bert_base", 30522, 109_514_298, 85_678_650, "BertConfig"),
    ("llama_1b", 32000, 1_100_048_384, 1_034_512_384, None),
])
def test_preset_param_counts(name: str, vocab: int, total: int, non_emb: int,
                             hf_default: str | None) -> None:
    cfg = preset(name, vocab)
    with torch.device("meta"):
        model = build_model(cfg)
    assert model.num_params() == total
    assert model.num_params(non_embedding=True) == non_emb
    transformers = pytest.importorskip("transformers")
    d = hf_config(cfg)
    assert hf_meta_params(d["architectures"][0], transformers.AutoConfig.for_model(**d)) == total
    if hf_default:  # the preset is the HF default model (GPT2Config() / BertConfig())
        assert hf_meta_params(d["architectures"][0], getattr(transformers, hf_default)()) == total


@pytest.mark.parametrize("path", sorted(PRESETS.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_preset_builds_and_exports(path: Path) -> None:
    cfg = preset(path.stem, 8192)
    with torch.device("meta"):
        model = build_model(cfg)
    assert isinstance(model, {"gpt": GPT, "bert": BERT}[cfg.arch]) and len(MODELS) == 2
    d = hf_config(cfg)
    assert d["model_type"] in ("gpt2", "llama", "bert") and d["vocab_size"] == 8192
    assert model.num_params() > model.num_params(non_embedding=True) > 0


def test_build_model_needs_vocab() -> None:
    with pytest.raises(ValueError, match="vocab_size"):
        build_model(ModelConfig())


@pytest.mark.parametrize("cfg", [GPT2_TINY, LLAMA_TINY], ids=["gpt2", "llama"])
def test_causal_lm_matches_hf(cfg: ModelConfig) -> None:
    model = perturbed(cfg)
    hf = hf_twin(cfg, model)
    x = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    hf_labels = x.clone()
    hf_labels[0, 5:9] = -100
    with torch.no_grad():
        ours = model.logits(x)
        out = hf(input_ids=x, labels=hf_labels)
        # HF shifts labels inside; ours come shifted: labels[t] is the token after input_ids[t].
        labels = torch.cat([hf_labels[:, 1:], torch.full_like(hf_labels[:, :1], -100)], dim=1)
        loss = model({"input_ids": x, "labels": labels})
    assert ours.shape == (2, 24, cfg.vocab_size)
    assert ours.abs().max() > 1.0  # the perturbed weights give far-from-uniform logits
    torch.testing.assert_close(ours, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["full", "padded", "no_token_types"])
def test_bert_matches_hf(case: str) -> None:
    padded = case == "padded"
    # No token types: HF still adds a table, exported as one zero row.
    cfg = dataclasses.replace(BERT_TINY, type_vocab_size=0 if case == "no_token_types" else 2)
    model = perturbed(cfg)
    hf = hf_twin(cfg, model)
    g = torch.Generator().manual_seed(3)
    x = torch.randint(0, cfg.vocab_size, (3, 20), generator=g)
    types = torch.randint(0, 2, (3, 20), generator=g) * (cfg.type_vocab_size > 0)
    mask = torch.ones_like(x)
    if padded:
        mask[0, 12:] = 0
        mask[2, 5:] = 0
    labels = torch.where(torch.rand(3, 20, generator=g) < 0.3, x, torch.full_like(x, -100))
    labels = labels.masked_fill(mask == 0, -100)
    with torch.no_grad():
        ours = model.logits(x, token_type_ids=types, attention_mask=mask)
        out = hf(input_ids=x, token_type_ids=types, attention_mask=mask, labels=labels)
        loss = model({"input_ids": x, "labels": labels, "token_type_ids": types,
                      "attention_mask": mask})
    torch.testing.assert_close(ours, out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, out.loss, atol=1e-5, rtol=1e-5)
    if padded:  # padding really is masked: changing padded tokens leaves real positions alone
        real = mask.bool()
        x2 = x.clone()
        x2[~real] = (x2[~real] + 1) % cfg.vocab_size
        with torch.no_grad():
            ours2 = model.logits(x2, token_type_ids=types, attention_mask=mask)
        torch.testing.assert_close(ours2[real], ours[real], atol=1e-6, rtol=0)


def test_export_gpt2_transposes_conv1d_and_rejects_unmappable() -> None:
    model = seeded(GPT2_TINY)
    hf_sd = to_hf_state_dict(GPT2_TINY, model.state_dict())
    qkv = model.blocks[0].attn.qkv.weight  # (3D, D) Linear
    assert hf_sd["transformer.h.0.attn.c_attn.weight"].shape == (64, 192)
    assert torch.equal(hf_sd["transformer.h.0.attn.c_attn.weight"], qkv.detach().t())
    with pytest.raises(ValueError, match="rmsnorm"):
        hf_config(dataclasses.replace(LLAMA_TINY, norm="layernorm"))
    with pytest.raises(ValueError, match="n_kv_heads"):
        hf_config(dataclasses.replace(GPT2_TINY, n_kv_heads=2))


@pytest.mark.parametrize("cfg", [GPT2_TINY, LLAMA_TINY], ids=["gpt2", "llama"])
def test_causal_mask(cfg: ModelConfig) -> None:
    model = perturbed(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 16), generator=torch.Generator().manual_seed(5))
    t, k = 6, 3
    x2 = x.clone()
    x2[:, t + k] = (x2[:, t + k] + 1) % cfg.vocab_size
    with torch.no_grad():
        a, b = model.logits(x), model.logits(x2)
    torch.testing.assert_close(a[:, : t + k], b[:, : t + k], atol=1e-6, rtol=0)
    assert (a[:, t + k] - b[:, t + k]).abs().max() > 1e-3


def test_bert_is_bidirectional() -> None:
    model = perturbed(BERT_TINY)
    x = torch.randint(0, 101, (2, 16), generator=torch.Generator().manual_seed(6))
    x2 = x.clone()
    x2[:, -1] = (x2[:, -1] + 1) % 101
    with torch.no_grad():
        assert (model.logits(x)[:, 0] - model.logits(x2)[:, 0]).abs().max() > 1e-3


TINY = ["gpt_tiny", "llama_tiny", "bert_tiny"]
VOCAB = 1000


def batch_for(cfg: ModelConfig, B: int = 2, T: int = 32, seed: int = 7) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, cfg.vocab_size, (B, T + 1), generator=g)
    if cfg.arch == "gpt":
        return {"input_ids": x[:, :-1], "labels": x[:, 1:]}
    x = x[:, :-1]
    picked = torch.rand(B, T, generator=g) < 0.3
    picked[:, 0] = True
    return {"input_ids": x, "labels": torch.where(picked, x, -100),
            "token_type_ids": torch.randint(0, 2, (B, T), generator=g),
            "attention_mask": torch.ones_like(x)}


@pytest.mark.parametrize("name", TINY)
def test_loss_at_init_and_gradients_reach_every_parameter(name: str) -> None:
    cfg = preset(name, VOCAB)
    model = seeded(cfg).train()
    batch = batch_for(cfg)
    loss = model(batch)
    assert loss.shape == () and loss.dtype == torch.float32
    assert abs(loss.item() - math.log(VOCAB)) < 0.1 * math.log(VOCAB)
    loss.backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
        assert p.grad.abs().sum() > 0, n
    assert model.logits(batch["input_ids"]).shape == (2, 32, VOCAB)


@pytest.mark.parametrize("name", TINY)
def test_all_ignored_labels_give_zero_loss(name: str) -> None:
    cfg = preset(name, VOCAB)
    model = seeded(cfg).train()
    batch = batch_for(cfg)
    batch["labels"] = torch.full_like(batch["labels"], -100)
    loss = model(batch)
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("name", TINY)
def test_gradient_checkpointing_matches(name: str) -> None:
    cfg = preset(name, VOCAB)
    batch = batch_for(cfg)
    results = []
    for ckpt in (False, True):
        model = seeded(cfg).train()
        model.gradient_checkpointing = ckpt
        saved = []  # elements autograd keeps for backward outside checkpointed regions
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel()) or t,
                                                      lambda t: t):
            loss = model(batch)
        loss.backward()
        results.append((loss.detach(), sum(saved),
                        {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss0, kept0, g0), (loss1, kept1, g1) = results
    assert kept1 < 0.5 * kept0  # checkpointing really dropped the block activations
    torch.testing.assert_close(loss1, loss0, atol=0, rtol=0)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], atol=1e-6, rtol=1e-5,
                                   msg=lambda m: f"{n}: {m}")


@pytest.mark.parametrize("name", TINY)
def test_bf16_module_gives_fp32_loss(name: str) -> None:
    cfg = preset(name, VOCAB)
    model = seeded(cfg).to(torch.bfloat16)
    loss = model(batch_for(cfg))
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    assert abs(loss.item() - math.log(VOCAB)) < 0.1 * math.log(VOCAB)


def test_tied_embeddings() -> None:
    gpt, llama, bert = (seeded(preset(n, VOCAB)) for n in TINY)
    assert gpt.lm_head.weight is gpt.tok_emb.weight
    assert gpt.lm_head.weight.data_ptr() == gpt.tok_emb.weight.data_ptr()
    assert bert.decoder.weight.data_ptr() == bert.word_emb.weight.data_ptr()
    assert llama.lm_head.weight.data_ptr() != llama.tok_emb.weight.data_ptr()
    assert llama.pos_emb is None and not any("pos_emb" in n for n, _ in llama.named_parameters())
    # The tied head is counted once; llama's untied head is not an embedding table.
    d, V = 256, VOCAB
    assert gpt.num_params() - gpt.num_params(non_embedding=True) == V * d + 1024 * d
    assert llama.num_params() - llama.num_params(non_embedding=True) == V * d


def test_gpt2_residual_init_is_scaled() -> None:
    cfg = preset("gpt2_124m", 50257)
    cfg = dataclasses.replace(cfg, vocab_size=128, d_model=256, n_heads=4, max_seq_len=64)
    model = seeded(cfg)
    assert abs(model.blocks[0].mlp.fc.weight.std().item() - 0.02) < 0.001
    assert abs(model.blocks[0].mlp.proj.weight.std().item() - 0.02 / math.sqrt(24)) < 0.0005
    assert model.blocks[0].attn.qkv.bias.abs().sum() == 0


def test_generate_shape_crop_and_determinism() -> None:
    cfg = dataclasses.replace(GPT2_TINY, max_seq_len=16)
    model = perturbed(cfg).train()
    prompt = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(8))

    def sample(seed: int, **kw: object) -> torch.Tensor:
        return model.generate(prompt, 10, generator=torch.Generator().manual_seed(seed), **kw)

    a = sample(0, temperature=0.8, top_k=20)
    assert a.shape == (2, 22) and torch.equal(a[:, :12], prompt)
    assert torch.equal(a, sample(0, temperature=0.8, top_k=20))
    assert not torch.equal(a, sample(1, temperature=0.8, top_k=20))
    assert torch.equal(sample(0, top_k=1), sample(5, temperature=0.0))  # top-1 is greedy
    assert model.training  # generate restores the mode it found


@pytest.mark.parametrize("model", ["gpt_tiny", "bert_tiny"])
def test_the_chunked_loss_equals_the_whole_one(model: str, monkeypatch) -> None:
    """Logits made a few rows at a time (recomputed in backward) give the same loss and
    gradients as all logits at once."""
    from lmforge.models import layers

    from lmforge.config import compose

    cfg = dataclasses.replace(compose([f"model={model}"]).model, vocab_size=512, n_layers=2)
    torch.manual_seed(0)
    net = build_model(cfg)
    ids = torch.randint(5, 512, (4, 33))
    if cfg.arch == "gpt":
        batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:].clone()}
        batch["labels"][0, :7] = -100
    else:
        labels = torch.full_like(ids, -100)
        labels[:, ::3] = ids[:, ::3]
        batch = {"input_ids": ids, "labels": labels}

    def loss_and_grads() -> tuple[torch.Tensor, list[torch.Tensor]]:
        net.zero_grad()
        loss = net(batch)
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in net.parameters()]

    whole, g_whole = loss_and_grads()
    monkeypatch.setattr(layers, "CHUNK_ELEMENTS", 7 * 512)  # 7 rows per chunk
    chunked, g_chunked = loss_and_grads()
    assert torch.allclose(chunked, whole, rtol=1e-5, atol=0)
    for a, b in zip(g_chunked, g_whole):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-6)


_PEAK = """
import json, resource, sys, torch
from torch import nn
from lmforge.models import layers
torch.manual_seed(0)
V, B, T, D = 50304, 4, 1024, 128
head = nn.Linear(D, V, bias=False)
h = torch.randn(B, T, D, requires_grad=True)
labels = torch.randint(0, V, (B, T))
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
loss = layers.head_cross_entropy(head, h, labels, V, chunk_elements=int(sys.argv[1]))
loss.backward()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"loss": loss.item(), "mb": (peak - base) / 1024}))
"""


@pytest.mark.slow
def test_the_chunked_loss_needs_far_less_peak_memory() -> None:
    """Vocab 50304 at 4 x 1024 tokens: all fp32 logits (and their grads) at once, against
    lmforge's default chunks; each in a fresh process, peak RSS growth over the inputs."""
    import json
    import subprocess
    import sys

    from lmforge.models.layers import CHUNK_ELEMENTS

    got = [json.loads(subprocess.run([sys.executable, "-c", _PEAK, str(chunk)], check=True,
                                     capture_output=True, text=True).stdout)
           for chunk in (1 << 62, CHUNK_ELEMENTS)]
    whole, chunked = got
    assert whole["mb"] > 2 * chunked["mb"], got
    assert chunked["loss"] == pytest.approx(whole["loss"], rel=1e-5)
