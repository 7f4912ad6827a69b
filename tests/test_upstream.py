"""Canaries: lmforge works around bugs and limitations of the libraries it uses; each test
here asserts that one of them is STILL present in the installed version. The day an upgrade
fixes it, the test fails with "upstream fixed <what>: remove <workaround>", because from
then on the workaround corrects twice or is dead code. Each checks the library's real
behaviour, in one CPU process, in a second or two (DeepSpeed: a gloo group of one)."""
from __future__ import annotations

import importlib
import os
import types
from pathlib import Path

import pytest
import torch

from conftest import Payload
from lmforge.distributed import free_port


def fixed(what: str, workaround: str) -> str:
    """The failure message: what upstream fixed, which workaround (file:function) to remove."""
    return f"upstream fixed {what}: remove {workaround}"


# ---------------------------------------------------------------------------- DeepSpeed

@pytest.fixture(scope="module")
def deepspeed():
    """DeepSpeed on a gloo process group of one. Its shared-memory comm op (JIT-built, ~100 s
    on a fresh machine, never used by one rank) is not built."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    mp = pytest.MonkeyPatch()
    for k, v in dict(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())).items():
        mp.setenv(k, v)
    mp.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op", lambda: None)
    ours = not torch.distributed.is_initialized()
    if ours:
        torch.distributed.init_process_group("gloo", rank=0, world_size=1)
    deepspeed.init_distributed(dist_backend="gloo")
    yield deepspeed
    mp.undo()
    if ours:  # as before: no process group, and DeepSpeed's comm backend forgotten
        torch.distributed.destroy_process_group()
        importlib.import_module("deepspeed.comm.comm").cdb = None
        # DeepSpeed caches groups of the destroyed process group: the next module's (this
        # fixture is also test_plan's) would hand DeepSpeed a group torch no longer knows.
        groups = importlib.import_module("deepspeed.utils.groups")
        for name in ("_WORLD_GROUP", "_DATA_PARALLEL_GROUP", "_MODEL_PARALLEL_GROUP",
                     "_TENSOR_MODEL_PARALLEL_GROUP", "_ZERO_PARAM_INTRA_PARALLEL_GROUP",
                     "mesh_device", "mpu"):
            setattr(groups, name, None)


def _engine(deepspeed, dtype: str = "fp32", grad_clip: float = 1.0, scale_power: int = 16):
    """(engine, DeepSpeed's optimizer) as lmforge configures them (lmforge.engine.ds_config,
    ZeRO-0, one rank) for y = w.x with w = 1 (4 weights) and plain SGD, lr 1."""
    from lmforge.config import OptimConfig, ParallelConfig, PrecisionConfig
    from lmforge.engine import ds_config

    precision = PrecisionConfig(dtype=dtype, initial_scale_power=scale_power)
    config = ds_config(ParallelConfig(), precision, OptimConfig(grad_clip=grad_clip),
                       micro_batch_size=1, grad_accum_steps=1, world_size=1)
    model = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=torch.optim.SGD(model.parameters(), lr=1.0), config=config)
    return engine, optimizer


def _step(engine, x: torch.Tensor, loss_factor: float = 1.0) -> torch.Tensor:
    """One micro-batch and optimizer step of loss = sum(w.x) (so d loss/dw = x); the
    weights after it."""
    engine.backward(engine(x).sum().float() * loss_factor)
    engine.step()
    return engine.module.weight.detach().float().clone()


def test_deepspeed_zero0_fp16_backward_does_not_scale_the_loss(deepspeed, monkeypatch) -> None:
    """deepspeedai/DeepSpeed#8393 (open PR): at ZeRO-0 with fp16, engine.backward() scales
    the loss only for ZeRO optimizers, yet FP16_UnfusedOptimizer.step() divides the
    gradients by the loss scale: updates come out loss_scale times too small."""
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.fp16.unfused_optimizer import FP16_UnfusedOptimizer

    # DeepSpeed refuses fp16 on CPUs without fp16 kernels; torch computes it anyway, and the
    # loss-scaling arithmetic under test is the same on every device.
    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
    engine, optimizer = _engine(deepspeed, "fp16", grad_clip=0.0, scale_power=4)
    assert isinstance(optimizer, FP16_UnfusedOptimizer), (
        f"DeepSpeed now wraps a torch optimizer at ZeRO-0 fp16 in {type(optimizer).__name__}, "
        "not FP16_UnfusedOptimizer: re-check engine.py:Engine.__init__ (_scale_loss), which "
        "keys the #8393 workaround on that class")
    scale = optimizer.loss_scale
    assert scale == 16
    x = torch.ones(1, 4, dtype=torch.half)
    w = _step(engine, x)  # SGD, lr 1, gradient 1: w should go from 1 to 0
    assert not torch.allclose(w, torch.zeros(4)), fixed(
        "DeepSpeed #8393 (engine.backward now scales the loss for FP16_UnfusedOptimizer at "
        "ZeRO-0 fp16)", "the extra loss scaling in engine.py:Engine.train_step and "
        "Engine.__init__ (_scale_loss; lmforge would now scale twice)")
    assert torch.allclose(w, torch.full((4,), 1 - 1 / scale)), \
        f"unexpected fp16 ZeRO-0 update: w={w.tolist()}"
    # What lmforge does instead (loss * loss_scale before engine.backward) is exact.
    assert torch.allclose(_step(engine, x, loss_factor=scale), w - 1)


def test_deepspeed_unfused_fp16_optimizer_reports_the_scaled_grad_norm(deepspeed,
                                                                       monkeypatch) -> None:
    """FP16_UnfusedOptimizer (ZeRO-0 fp16) keeps the norm of the still-scaled gradients as
    the global grad norm; FP16_Optimizer and the ZeRO optimizers keep the unscaled one
    (deepspeedai/DeepSpeed#8588, open PR)."""
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)
    engine, optimizer = _engine(deepspeed, "fp16", grad_clip=0.0, scale_power=4)
    scale = optimizer.loss_scale
    # The loss scaled as lmforge does (#8393, above); whoever scales it, step() sees
    # gradients `scale` times the true ones.
    engine.backward(engine(torch.ones(1, 4, dtype=torch.half)).sum().float() * scale)
    scaled = engine.module.weight.grad.float().norm().item()
    engine.step()
    assert scaled > 0 and engine.get_global_grad_norm() == pytest.approx(scaled), fixed(
        f"FP16_UnfusedOptimizer reporting the loss-scaled grad norm (now "
        f"{engine.get_global_grad_norm()}; scaled gradients {scaled}, scale {scale})",
        "the division of the grad norm by the loss scale in engine.py:Engine.train_step")


def test_deepspeed_unfused_optimizer_steps_once_when_built(deepspeed) -> None:
    """DeepSpeed's unfused optimizer (bf16 at ZeRO-0) runs one optimizer step on zero
    gradients in its constructor: AdamW's step count is 1 and weight decay has shrunk the
    fp32 master weights before any training."""
    from lmforge.config import OptimConfig, ParallelConfig, PrecisionConfig
    from lmforge.engine import ds_config

    config = ds_config(ParallelConfig(), PrecisionConfig(dtype="bf16"), OptimConfig(),
                       micro_batch_size=1, grad_accum_steps=1, world_size=1)
    model = torch.nn.Linear(4, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    adamw = torch.optim.AdamW(model.parameters(), lr=1.0, weight_decay=0.5)
    _, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=adamw, config=config)
    steps = [float(s["step"]) for s in adamw.state.values()]
    master = optimizer.fp32_groups[0][0]
    assert steps == [1.0] and torch.allclose(master, torch.full_like(master, 0.5)), fixed(
        f"the unfused optimizer's step at construction (AdamW steps {steps}, master "
        f"{master.tolist()})", "engine.py:Engine._undo_construction_step")


def test_deepspeed_plain_fp32_step_has_no_norm_and_no_overflow_guard(deepspeed) -> None:
    """At ZeRO-0 in fp32, DeepSpeed clips the gradients but keeps no norm
    (get_global_grad_norm() is None), and applies an update from inf/NaN gradients instead
    of skipping the step, unlike its ZeRO, bf16 and fp16 optimizers."""
    engine, _ = _engine(deepspeed, "fp32", grad_clip=1.0)
    _step(engine, torch.ones(1, 4))
    assert engine.get_global_grad_norm() is None, fixed(
        "DeepSpeed's plain fp32 (ZeRO-0) path not recording the gradient norm",
        "the norm computation in engine.py:Engine._plain_fp32_norm_and_guard")
    w = _step(engine, torch.full((1, 4), float("nan")))
    assert engine.skipped_steps == 0 and not torch.isfinite(w).any(), fixed(
        "DeepSpeed's plain fp32 (ZeRO-0) path applying non-finite gradients",
        "the overflow guard in engine.py:Engine._plain_fp32_norm_and_guard")


def test_deepspeed_all_reduces_gradients_over_a_group_of_one(deepspeed, monkeypatch) -> None:
    """With one rank, DeepSpeed still flattens and all-reduces the gradients after every
    backward (~25% of a small model's CPU step)."""
    engine, _ = _engine(deepspeed, "fp32")
    assert engine.enable_backward_allreduce  # DeepSpeed's default; lmforge turns it off
    calls = []
    real = torch.distributed.all_reduce
    monkeypatch.setattr(torch.distributed, "all_reduce",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    engine.backward(engine(torch.ones(1, 4)).sum())
    assert calls, fixed("DeepSpeed's gradient all-reduce over a data-parallel group of one",
                        "`enable_backward_allreduce = False` in engine.py:Engine.__init__")


def test_deepspeed_zero3_universal_load_mixes_up_param_groups(tmp_path: Path) -> None:
    """DeepSpeed 0.19.8's ZeRO-3 universal-checkpoint load
    (DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3)
    gives every parameter group group 0's hyperparameters (the no-decay group gets weight
    decay) and every sub-group's Adam state one shared `step` tensor. Called here on a
    stand-in for the ZeRO-3 optimizer: two sub-groups of one parameter each, one per
    parameter group (decay 0.1 and 0.0), as DeepSpeed builds them for lmforge's groups."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from deepspeed.checkpoint.constants import OPTIMIZER_STATE_DICT
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3

    (tmp_path / "zero").mkdir()
    saved = [{"lr": 1e-3, "weight_decay": 0.1, "params": [0]},
             {"lr": 1e-3, "weight_decay": 0.0, "params": [1]}]
    torch.save({OPTIMIZER_STATE_DICT: {"state": {0: {"step": torch.tensor(7.0)}},
                                       "param_groups": saved}},
               tmp_path / "zero" / "optimizer_state.pt")
    params = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(2))]
    flat = [torch.zeros(3), torch.zeros(2)]  # fp32 partitions, one per sub-group
    adam = torch.optim.AdamW([{"params": [flat[0]], "weight_decay": 0.1},
                              {"params": [flat[1]], "weight_decay": 0.0}], lr=1e-3)
    zero3 = types.SimpleNamespace(
        _load_global_state_stage3=lambda sd: None,
        fp16_groups=[[params[0]], [params[1]]],
        fp32_partitioned_groups_flat=flat,
        param_names={params[0]: "a", params[1]: "b"},
        load_hp_checkpoint_state=lambda folder, key, param: torch.ones(param.numel()),
        optimizer=adam, swap_optimizer=False,
        fp16_partitioned_groups_flat=[torch.zeros(3), torch.zeros(2)],
        fp16_partitioned_groups=[[torch.zeros(3)], [torch.zeros(2)]],
        unflatten=lambda flat, tensors: [flat[:t.numel()].view_as(t) for t in tensors])
    load = DeepSpeedZeroOptimizer_Stage3.load_hp_checkpoint_state_from_checkpoint_dir_stage3
    try:
        load(zero3, str(tmp_path))
    except (AttributeError, TypeError, KeyError) as e:
        pytest.fail(f"DeepSpeed's ZeRO-3 universal load changed ({type(e).__name__}: {e}): "
                    "re-check both fixes in engine.py:Engine.load_universal and this canary")
    assert [g["weight_decay"] for g in adam.param_groups] == [0.1, 0.1], fixed(
        "DeepSpeed's ZeRO-3 universal load giving every param group group 0's "
        "hyperparameters", "the param_groups restore in engine.py:Engine.load_universal")
    assert adam.state[flat[0]]["step"] is adam.state[flat[1]]["step"], fixed(
        "DeepSpeed's ZeRO-3 universal load sharing one Adam `step` tensor across sub-groups",
        "the per-sub-group step clone in engine.py:Engine.load_universal")




def _poisoned_checkpoint(tmp_path: Path) -> Path:
    ckpt = tmp_path / "checkpoints" / "step_00000001"
    ckpt.mkdir(parents=True)
    for name in ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"):
        torch.save({"module": Payload(tmp_path / "pwned"),
                    "optimizer_state_dict": Payload(tmp_path / "pwned")}, ckpt / name)
    return ckpt


def _zero_to_fp32(ckpt: Path) -> None:
    from lmforge.engine import zero_fp32_state_dict  # DeepSpeed's zero_to_fp32, bare

    zero_fp32_state_dict(ckpt)


def _load_checkpoint(ckpt: Path) -> None:
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import (
        TorchCheckpointEngine,
    )

    TorchCheckpointEngine().load(str(ckpt / "mp_rank_00_model_states.pt"), map_location="cpu")


def _ds_to_universal(ckpt: Path) -> None:
    import argparse

    from deepspeed.checkpoint import (
        ds_to_universal,  # bare, as engine.to_universal calls it
    )

    ds_to_universal.main(argparse.Namespace(
        input_folder=str(ckpt), output_folder=str(ckpt.parent / "universal"),
        num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False, strict=True,
        inject_missing_state=True))


@pytest.mark.parametrize("reader, then", [
    (_zero_to_fp32, "remove engine.weights_only() around engine.zero_fp32_state_dict in "
                    "consolidate.py:consolidate"),
    (_load_checkpoint, "remove engine.weights_only() around load_checkpoint in "
                       "engine.py:Engine.load"),
    (_ds_to_universal, "remove engine.weights_only() around ds_to_universal in "
                       "engine.py:to_universal"),
], ids=["zero_to_fp32", "load_checkpoint", "ds_to_universal"])
def test_deepspeed_checkpoint_readers_unpickle_anything(tmp_path: Path, reader, then: str,
                                                        monkeypatch) -> None:
    """DeepSpeed's checkpoint readers (zero_to_fp32, the engine's load_checkpoint via
    TorchCheckpointEngine, ds_to_universal) call torch.load(weights_only=False), explicitly
    since deepspeedai/DeepSpeed#6751: a checkpoint runs arbitrary code as it is read. (Its
    optimizer states pickle DeepSpeed classes, e.g. ZeroStageEnum, deepspeedai/DeepSpeed#8500,
    hence engine.py:deepspeed_safe_globals.)"""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    for k in ("TORCH_FORCE_WEIGHTS_ONLY_LOAD", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"):
        monkeypatch.delenv(k, raising=False)
    ckpt = _poisoned_checkpoint(tmp_path)
    try:
        reader(ckpt)
    except Exception:  # what the payload returned is no checkpoint; it already ran
        pass
    assert (tmp_path / "pwned").exists(), (
        f"upstream fixed DeepSpeed's {reader.__name__.strip('_')} unpickling arbitrary "
        f"objects (torch.load weights_only=False): {then}")


def test_deepspeed_init_distributed_falls_back_to_mpi_discovery(monkeypatch) -> None:
    """deepspeed.init_distributed() in a plain process without launcher variables
    (RANK, WORLD_SIZE, ...) tries MPI discovery, which fails without mpi4py, instead of
    starting a process group of one (deepspeedai/DeepSpeed#8444, open PR)."""
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed

    comm = importlib.import_module("deepspeed.comm.comm")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
              "OMPI_COMM_WORLD_RANK", "PMI_RANK", "SLURM_PROCID", "AZUREML_EXPERIMENT_ID",
              "SM_TRAINING_ENV", "DLTS_JOB_ID"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setattr(comm, "cdb", None)  # as in a fresh process
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(importlib.import_module("deepspeed.comm.torch"), "build_shm_op",
                        lambda: None)

    class MPIDiscovery(Exception):
        pass

    def mpi_discovery(*args, **kwargs):
        raise MPIDiscovery

    monkeypatch.setattr(comm, "mpi_discovery", mpi_discovery)
    try:
        deepspeed.init_distributed(dist_backend="gloo")
    except MPIDiscovery:
        return
    except Exception:
        pass
    pytest.fail(fixed("deepspeed.init_distributed's MPI-discovery fallback without launcher "
                      "variables", "that reason in distributed.py:setup's docstring "
                      "(initialising torch.distributed before DeepSpeed, with env defaults, "
                      "is then a choice, not a need)"))


# ---------------------------------------------------------------------------- Hydra

def test_hydra_advises_plus_key_for_a_typo_in_a_structured_config() -> None:
    """Hydra 1.3 answers a misspelt key of a structured config with "To append to your
    config use +key=...", which would add a key the schema rejects anyway."""
    from lmforge.config import compose

    with pytest.raises(Exception) as e:
        compose(["trainer.max_stepz=3"])
    assert "To append to your config use +trainer.max_stepz=3" in str(e.value), fixed(
        "Hydra's '+key' advice for a typo in a structured config",
        "the 'To append' line filter in config.py:one_line")


# ---------------------------------------------------------------------------- datasets

def _text_stream(tmp_path: Path, n_files: int = 4):
    import datasets

    files = []
    for i in range(n_files):
        (tmp_path / f"f{i}.txt").write_text(f"document {i}\n")
        files.append(str(tmp_path / f"f{i}.txt"))
    return datasets.load_dataset("text", data_files=files, split="train", streaming=True,
                                 sample_by="document")


def _in_loader_worker(monkeypatch, ds, worker: int, workers: int) -> None:
    """What torch.utils.data.get_worker_info() says inside DataLoader worker `worker`."""
    info = types.SimpleNamespace(id=worker, num_workers=workers, seed=0, dataset=ds)
    monkeypatch.setattr(torch.utils.data, "get_worker_info", lambda: info)


def test_datasets_iter_in_a_loader_worker_reads_only_its_files(tmp_path, monkeypatch) -> None:
    """iter(ds) of a streaming IterableDataset inside a DataLoader worker hands that worker
    only its share of the files (datasets' own worker sharding)."""
    ds = _text_stream(tmp_path)
    _in_loader_worker(monkeypatch, ds, 0, 2)
    got = [ex["text"] for ex in ds]
    assert len(got) == 2, fixed(
        f"datasets' file sharding of iter(ds) in DataLoader workers (worker 0 of 2 read "
        f"{len(got)} of 4 files)", "the reason data/sources.py:iter_examples gives for "
        "ds.iter() (iter(ds) would do as well; ds.iter() must stay whole: next test)")


def test_datasets_iter_method_in_a_loader_worker_reads_every_file(tmp_path, monkeypatch) -> None:
    """lmforge relies on the opposite for ds.iter(batch_size): it reads every document in
    any process, and lmforge shards documents by index itself. If this fails, loader
    workers silently skip documents."""
    ds = _text_stream(tmp_path)
    _in_loader_worker(monkeypatch, ds, 0, 2)
    got = [t for batch in ds.iter(batch_size=3) for t in batch["text"]]
    assert sorted(got) == [f"document {i}\n" for i in range(4)], (
        "datasets' IterableDataset.iter() now shards by DataLoader worker: "
        "data/sources.py:iter_examples would read a fraction of the corpus in loader workers")


def test_datasets_state_dict_loses_the_shuffle_buffer() -> None:
    """IterableDataset.state_dict() does not hold .shuffle()'s buffer: a resumed stream
    neither continues the original order nor yields the same examples
    (huggingface/datasets#7901; open PR huggingface/datasets#8408)."""
    import datasets

    ds = datasets.Dataset.from_dict({"x": list(range(40))}).to_iterable_dataset(num_shards=4)
    uninterrupted = [ex["x"] for ex in ds.shuffle(seed=0, buffer_size=8)]
    first = ds.shuffle(seed=0, buffer_size=8)
    it = iter(first)
    head = [next(it)["x"] for _ in range(10)]
    resumed = ds.shuffle(seed=0, buffer_size=8)
    resumed.load_state_dict(first.state_dict())
    assert head + [ex["x"] for ex in resumed] != uninterrupted, fixed(
        "datasets' IterableDataset.state_dict() dropping the shuffle buffer",
        "lmforge's own shuffle buffer in data/loader.py (buffer_size=1 in "
        "BlockLoader._epoch_stream, buffer and RNG in the loader state) if it is worth it")


# ---------------------------------------------------------------------------- accelerate

def test_accelerate_launch_cpu_starts_one_process(monkeypatch, tmp_path) -> None:
    """`accelerate launch --cpu --num_processes 2` goes to accelerate's single-process
    launcher (CPU multi-process means MPI there), so launch/accelerate/cpu_2proc.yaml uses
    its MULTI_GPU (torchrun) launcher, which starts N gloo ranks on CPU too."""
    launch = importlib.import_module("accelerate.commands.launch")
    monkeypatch.setattr(launch, "default_config_file", str(tmp_path / "none.yaml"))
    used = []
    for name in ("simple_launcher", "multi_gpu_launcher", "deepspeed_launcher"):
        monkeypatch.setattr(launch, name, lambda args, name=name: used.append(name))
    args = launch.launch_command_parser().parse_args(
        ["--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", "train.py"])
    launch.launch_command(args)
    assert used == ["simple_launcher"], fixed(
        f"accelerate launch --cpu --num_processes 2 (now uses {used})",
        "the MULTI_GPU choice in launch/accelerate/cpu_2proc.yaml (and its comment)")
