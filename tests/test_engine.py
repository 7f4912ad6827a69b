"""The pure parts of the DeepSpeed wiring: config dict, parameter groups, LR schedule."""
from __future__ import annotations

import math

import pytest

from conftest import compose
from lmforge.config import ConfigError, resolve_grad_accum
from lmforge.engine import ds_config, lr_lambda, param_groups
from lmforge.models import build_model


def _ds(*overrides: str, world: int = 1) -> dict:
    cfg = compose(list(overrides))
    t = cfg.trainer
    return ds_config(cfg.parallel, cfg.precision, cfg.optim, t.micro_batch_size,
                     t.grad_accum_steps, world)


def test_ds_config_batch_arithmetic_and_stage() -> None:
    d = _ds("parallel=zero2", "precision=bf16", "trainer.micro_batch_size=4",
            "trainer.grad_accum_steps=3", world=2)
    assert d["train_batch_size"] == 4 * 3 * 2
    assert d["train_micro_batch_size_per_gpu"] == 4 and d["gradient_accumulation_steps"] == 3
    assert d["zero_optimization"]["stage"] == 2
    assert d["bf16"]["enabled"] and not d["fp16"]["enabled"]


def test_global_batch_sets_accumulation_per_world_size() -> None:
    t = compose(["trainer.micro_batch_size=4", "trainer.global_batch_size=32"]).trainer
    assert [resolve_grad_accum(t, w) for w in (1, 2, 4, 8)] == [8, 4, 2, 1]
    with pytest.raises(ConfigError, match="not a multiple of trainer.micro_batch_size x ranks"):
        resolve_grad_accum(t, 16)
    t = compose(["trainer.micro_batch_size=4", "trainer.global_batch_size=32",
                 "trainer.grad_accum_steps=2"]).trainer
    with pytest.raises(ConfigError, match="contradicts trainer.global_batch_size=32"):
        resolve_grad_accum(t, 1)
    assert resolve_grad_accum(t, 4) == 2


def test_inconsistent_raw_batch_keys_are_a_config_error() -> None:
    with pytest.raises(ConfigError, match="train_batch_size=100 != micro batch 4"):
        _ds("trainer.micro_batch_size=4", "+parallel.ds_extra={train_batch_size: 100}", world=2)


def test_ds_config_offload_and_extra_keys_merge() -> None:
    d = _ds("parallel=zero3_offload", "+parallel.ds_extra={zero_optimization: {reduce_bucket_size: 1000}}")
    z = d["zero_optimization"]
    assert z["stage"] == 3 and z["offload_param"]["device"] == "cpu"
    assert z["offload_optimizer"]["device"] == "cpu" and z["reduce_bucket_size"] == 1000


def test_fp16_has_dynamic_loss_scaling() -> None:
    d = _ds("precision=fp16")
    assert d["fp16"]["enabled"] and d["fp16"]["loss_scale"] == 0


def test_no_weight_decay_on_biases_norms_embeddings(tiny_cfg) -> None:
    import dataclasses
    model = build_model(dataclasses.replace(tiny_cfg.model, vocab_size=64))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all(p.ndim == 2 for p in decay["params"])
    assert not any("emb" in names[id(p)] or "wte" in names[id(p)] or "wpe" in names[id(p)]
                   for p in decay["params"])
    assert no_decay["weight_decay"] == 0.0
    n_all = sum(p.numel() for p in model.parameters())
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == n_all


def test_lr_schedule_warmup_then_cosine() -> None:
    cfg = compose(["optim.warmup_steps=10", "optim.min_lr_ratio=0.1"])
    f = lr_lambda(cfg.optim, max_steps=110)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(110) == pytest.approx(0.1) and f(500) == pytest.approx(0.1)
    assert all(f(s) >= f(s + 1) for s in range(10, 120))


def test_the_generated_config_never_syncs_for_timers_and_is_tuned_on_gpus() -> None:
    cfg = compose(["parallel=zero3", "precision=bf16", "model=gpt2_124m"])
    t = cfg.trainer
    cpu = ds_config(cfg.parallel, cfg.precision, cfg.optim, t.micro_batch_size, 1, 2)
    gpu = ds_config(cfg.parallel, cfg.precision, cfg.optim, t.micro_batch_size, 1, 2,
                    on_gpu=True, d_model=768)
    for d in (cpu, gpu):
        assert d["timers"]["throughput"]["enabled"] is False
    assert "overlap_comm" not in cpu["zero_optimization"]  # gloo: DeepSpeed's defaults
    z = gpu["zero_optimization"]
    assert z["overlap_comm"] and z["contiguous_gradients"] and z["reduce_bucket_size"] == 768**2
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * 768**2)
    assert z["stage3_param_persistence_threshold"] == 7680
    assert gpu["communication_data_type"] == "fp32"
    extra = compose(["parallel=zero2", "+parallel.ds_extra={zero_optimization: "
                     "{reduce_bucket_size: 1000}}"])
    d = ds_config(extra.parallel, extra.precision, extra.optim, 4, 1, 2, on_gpu=True,
                  d_model=768)
    assert d["zero_optimization"]["reduce_bucket_size"] == 1000  # ds_extra still wins
    assert "stage3_prefetch_bucket_size" not in d["zero_optimization"]


@pytest.mark.parametrize("parallel,dtype,on_device", [
    ("zero0", "fp32", True), ("zero1", "bf16", True), ("zero3", "bf16", True),
    ("zero0", "bf16", False), ("zero2", "fp16", False), ("zero3_offload", "bf16", False),
    ("zero1", "bf16|+parallel.ds_extra={zero_optimization: {compute_grad_norm: false}}", False)])
def test_deepspeeds_host_overflow_check_is_off_only_where_lmforge_guards_on_device(
        parallel: str, dtype: str, on_device: bool) -> None:
    from lmforge.engine import guards_on_device

    dtype, *extra = dtype.split("|")
    cfg = compose([f"parallel={parallel}", f"precision={dtype}", *extra])
    assert guards_on_device(cfg.parallel, cfg.precision) is on_device
    d = _ds(f"parallel={parallel}", f"precision={dtype}", *extra)
    assert d["bf16"]["check_grad_overflow"] is not on_device
    if not extra:
        again = _ds(f"parallel={parallel}", f"precision={dtype}",
                    "+parallel.ds_extra={bf16: {check_grad_overflow: true}}")
        assert again["bf16"]["check_grad_overflow"] is True  # ds_extra still wins


def test_ds_extra_may_not_contradict_the_typed_keys() -> None:
    cfg = compose(["parallel=zero2", "+parallel.ds_extra={zero_optimization: {stage: 3}}"])
    with pytest.raises(ConfigError, match="zero_optimization.stage=3, which contradicts"):
        ds_config(cfg.parallel, cfg.precision, cfg.optim, 4, 1, 1)


def test_vocab_left_to_the_tokenizer_is_padded_to_64() -> None:
    from lmforge.config import pad_vocab

    assert pad_vocab(50257) == 50304 and pad_vocab(8192) == 8192 and pad_vocab(1) == 64
