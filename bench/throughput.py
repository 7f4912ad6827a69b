"""Training tokens/s of lmforge vs a plain PyTorch loop vs Hugging Face `transformers.Trainer`:
the same model size, the same token batches and warm-up, run in lock-step in one process so
all three see the same machine load. Usage: .venv/bin/python bench/throughput.py [--quick] [--out FILE]"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

os.environ.update(WANDB_MODE="disabled", HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1",
                  TOKENIZERS_PARALLELISM="false", DS_ACCELERATOR="cpu",
                  TRANSFORMERS_VERBOSITY="error")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Size:
    """The shape of both models, of the data, and how many steps each cell runs."""
    n_layers: int
    n_heads: int
    d_model: int
    vocab: int
    seq_len: int
    train_max_chars: int  # text the tokenizers are trained on
    # dtype -> (micro batch, warm-up steps, timed steps)
    plan: dict[str, tuple[int, int, int]] = field(default_factory=dict)

    @property
    def d_ff(self) -> int:
        return 4 * self.d_model  # what gpt_tiny's d_ff=null means; bert_tiny's must be set

    def overrides(self, arch: str, trained: bool = False) -> list[str]:
        """The size keys; the tokenizer keys only while its tokenizer is to be trained (with
        tokenizer.path they would do nothing, which lmforge refuses)."""
        return [f"model.n_layers={self.n_layers}", f"model.n_heads={self.n_heads}",
                f"model.d_model={self.d_model}",
                *([f"model.d_ff={self.d_ff}"] if arch == "bert" else []),
                f"model.vocab_size={self.vocab}", f"data.seq_len={self.seq_len}",
                *([] if trained else [f"tokenizer.vocab_size={self.vocab}",
                                      f"tokenizer.train_max_chars={self.train_max_chars}"])]


# bf16 matmuls are ~10x slower than fp32 on a CPU without AVX512_BF16, hence fewer bf16 steps.
FULL = Size(6, 6, 384, 8192, 256, 20_000_000, {"fp32": (8, 3, 12), "bf16": (8, 3, 8)})
# --quick: the same code path on a tiny model and a few steps; its numbers mean nothing.
QUICK = Size(2, 2, 64, 512, 64, 2_000_000, {"fp32": (4, 1, 3), "bf16": (4, 1, 3)})
PRESET = {"gpt": ["model=gpt_tiny"], "bert": ["model=bert_tiny"]}
QUICK_NOTE = ("QUICK MODE (--quick): tiny models and a few steps; the numbers below are "
              "meaningless, this run only shows that the benchmark works")
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
NAMES = ("lmforge", "plain", "hf_trainer")
Batch = dict[str, torch.Tensor]


def config(size: Size, arch: str, dtype: str, mb: int, steps: int,
           tok: Path | None = None) -> Any:
    """The typed config lmforge-train would build for this benchmark."""
    from lmforge.config import compose

    return compose(PRESET[arch] + size.overrides(arch, trained=tok is not None) + [
        f"precision={dtype}", "parallel=zero0", "logging=quiet", f"trainer.micro_batch_size={mb}",
        f"trainer.max_steps={steps}", "trainer.eval_every=0", "trainer.eval_batches=1",
        "trainer.sample_tokens=0"] + ([f"tokenizer.path={tok}"] if tok else []))


def make_batches(size: Size, arch: str, mb: int, n: int, work: Path,
                 info: Any) -> tuple[list[Batch], Path]:
    """n micro-batches of the embedded corpus with lmforge's own tokenizer, packing and (BERT)
    masking, made once so every contender trains on identical tensors."""
    from lmforge.assembly import build_tokenizer, open_corpus
    from lmforge.data.loader import BlockLoader

    cfg = config(size, arch, "fp32", mb, 1)
    (work / arch).mkdir(parents=True, exist_ok=True)
    corpus = open_corpus(cfg)
    tok = build_tokenizer(cfg, work / arch, info, corpus)
    loader = BlockLoader(corpus.stream, tok, arch, cfg.data, mb, 0, 1, cfg.trainer.seed)
    return [next(loader) for _ in range(n)], work / arch / "tokenizer.json"


def plain_loop(cfg: Any, dtype: str) -> Callable[[Batch], None]:
    """One step of the lmforge model in a hand-written loop. bf16 follows the engine's
    algorithm: bf16 weights and grads, fp32 master weights updated by fused AdamW."""
    from lmforge.engine import param_groups
    from lmforge.models import build_model

    torch.manual_seed(cfg.trainer.seed)
    model, o = build_model(cfg.model).train(), cfg.optim
    params = list(model.parameters())
    groups, masters = param_groups(model, o.weight_decay), params
    if dtype == "bf16":
        model.to(torch.bfloat16)
        master = {p: p.detach().float().requires_grad_() for p in params}
        groups = [{**g, "params": [master[p] for p in g["params"]]} for g in groups]
        masters = [master[p] for p in params]
    opt = torch.optim.AdamW(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, fused=True)

    def step(batch: Batch) -> None:
        model(batch).backward()
        if dtype == "bf16":
            for p, m in zip(params, masters):
                m.grad = p.grad.float()
        torch.nn.utils.clip_grad_norm_(masters, o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dtype == "bf16":
            torch._foreach_copy_([p.data for p in params], [m.detach() for m in masters])
            model.zero_grad(set_to_none=True)
    return step


def hf_model(size: Size, arch: str) -> torch.nn.Module:
    """GPT2LMHeadModel / BertForMaskedLM of the lmforge shape, dropout off as in lmforge."""
    import transformers as tf

    torch.manual_seed(0)
    if arch == "gpt":
        return tf.GPT2LMHeadModel(tf.GPT2Config(
            vocab_size=size.vocab, n_positions=1024, n_embd=size.d_model,
            n_layer=size.n_layers, n_head=size.n_heads, n_inner=size.d_ff,
            activation_function="gelu_new", resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
            layer_norm_epsilon=1e-5, tie_word_embeddings=True))
    return tf.BertForMaskedLM(tf.BertConfig(
        vocab_size=size.vocab, hidden_size=size.d_model, num_hidden_layers=size.n_layers,
        num_attention_heads=size.n_heads, intermediate_size=size.d_ff, max_position_embeddings=512, type_vocab_size=2,
        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, layer_norm_eps=1e-12,
        hidden_act="gelu"))


class HFTrainerThread:
    """`transformers.Trainer.train()` in a thread that runs one optimizer step per `step()`:
    it waits in on_train_begin and on_step_end until released. A step is timed from its
    release to its on_step_end, so the Trainer's logging and next-batch fetch count."""

    def __init__(self, size: Size, arch: str, dtype: str, batches: list[Batch], work: Path,
                 threads: int):
        import transformers as tf

        self.go, self.done = threading.Semaphore(0), threading.Semaphore(0)
        self.times: list[float] = []
        self.error: BaseException | None = None
        self.t_go = 0.0
        outer = self

        class Pace(tf.TrainerCallback):
            def on_train_begin(self, *a: Any, **kw: Any) -> None:
                outer.done.release()  # set-up finished
                outer._wait()

            def on_step_end(self, *a: Any, **kw: Any) -> None:
                outer.times.append(time.perf_counter() - outer.t_go)
                outer.done.release()
                outer._wait()

        mb = batches[0]["input_ids"].size(0)
        # GPT-2 shifts labels itself: give it the unshifted ids (same T, same compute).
        rows = [{"input_ids": b["input_ids"][i], "labels": b["input_ids"][i]} if arch == "gpt"
                else {k: v[i] for k, v in b.items()} for b in batches for i in range(mb)]
        # As a user runs it (python script.py): with our launcher variables set, accelerate
        # would see a 1-process "cluster" and wrap the model in DDP (find_unused_parameters).
        saved = {k: os.environ.pop(k) for k in LAUNCH_VARS if k in os.environ}
        try:
            args = tf.TrainingArguments(
                output_dir=tempfile.mkdtemp(dir=work), per_device_train_batch_size=mb,
                max_steps=len(batches), learning_rate=1e-3, weight_decay=0.1, adam_beta1=0.9,
                adam_beta2=0.95, max_grad_norm=1.0, warmup_steps=20, lr_scheduler_type="cosine",
                optim="adamw_torch_fused", use_cpu=True, bf16=dtype == "bf16", report_to=[],
                save_strategy="no", eval_strategy="no", logging_steps=10, disable_tqdm=True,
                dataloader_num_workers=0, train_sampling_strategy="sequential", seed=1337)
            self.trainer = tf.Trainer(model=hf_model(size, arch), args=args, train_dataset=rows,
                                      callbacks=[Pace()])
        finally:
            os.environ.update(saved)
        self.trainer.remove_callback(tf.PrinterCallback)  # its log lines would split our table
        self.thread = threading.Thread(target=self._run, args=(threads,), daemon=True)
        self.thread.start()
        self._join_step()

    def _wait(self) -> None:
        self.go.acquire()
        self.t_go = time.perf_counter()

    def _run(self, threads: int) -> None:
        torch.set_num_threads(threads)
        try:
            self.trainer.train()
        except BaseException as e:  # re-raised in the main thread
            self.error = e
        self.done.release()

    def _join_step(self) -> None:
        self.done.acquire()
        if self.error is not None:
            raise RuntimeError("transformers.Trainer failed") from self.error

    def step(self) -> None:
        self.go.release()
        self._join_step()

    def finish(self) -> None:
        self.go.release()
        self.thread.join()


class Lockstep:
    """lmforge's loader: at each lmforge step boundary it runs one plain step and one Trainer
    step on the same batch index, then hands lmforge its batch. An lmforge step is timed from
    the return of one next() to the following call: the whole body of fit()'s loop."""

    layout_free = True  # a fresh run dir: nothing to resume, any rank layout

    def __init__(self, batches: list[Batch], plain: Callable[[Batch], None],
                 hf: HFTrainerThread) -> None:
        self.batches, self.plain, self.hf = batches, plain, hf
        self.k, self.t_back = 0, 0.0
        self.times: dict[str, list[float]] = {"lmforge": [], "plain": []}

    def __iter__(self) -> "Lockstep":
        return self

    def __next__(self) -> Batch:
        t = time.perf_counter()
        if self.k > 0:
            self.times["lmforge"].append(t - self.t_back)
        if self.k == len(self.batches):
            raise StopIteration
        self.plain(self.batches[self.k])
        self.times["plain"].append(time.perf_counter() - t)
        self.hf.step()
        self.k += 1
        self.t_back = time.perf_counter()
        return self.batches[self.k - 1]

    # What fit() asks of its loader besides batches. The batches were made before the run
    # (make_batches), so this loader reads no documents, skips none and holds no workers.
    skipped: dict[str, int] = {}

    def close(self) -> None:
        pass

    def state_dict(self) -> dict[str, Any]:
        return {}  # fit()'s final checkpoint asks for it


def bench_cell(size: Size, arch: str, dtype: str, work: Path, info: Any,
               threads: int) -> dict[str, Any]:
    """The three contenders in lock-step on one (model, dtype)."""
    from lmforge.assembly import build

    mb, warmup, timed = size.plan[dtype]
    batches, tok = make_batches(size, arch, mb, warmup + timed, work, info)
    cfg = config(size, arch, dtype, mb, len(batches), tok)
    torch.set_num_threads(threads)
    hf = HFTrainerThread(size, arch, dtype, batches, work, threads)
    trainer = build(cfg, Path(tempfile.mkdtemp(dir=work)), info)
    trainer.loader = lock = Lockstep(batches, plain_loop(cfg, dtype), hf)
    step = trainer.engine.train_step

    def last_aware_step(micro: list[Batch]) -> Any:
        out = step(micro)
        if lock.k == len(batches):  # the last step ends here: eval and checkpoint follow
            lock.times["lmforge"].append(time.perf_counter() - lock.t_back)
        return out

    trainer.engine.train_step = last_aware_step
    trainer.fit()
    hf.finish()
    times = {**lock.times, "hf_trainer": hf.times}
    times = {k: v[warmup:] for k, v in times.items()}
    assert all(len(v) == timed for v in times.values()), {k: len(v) for k, v in times.items()}
    tokens = mb * size.seq_len
    # Paired: step k of each contender ran back to back, so their ratio shares the load.
    paired = {f"lmforge/{k}": statistics.median(o / l for o, l in zip(times[k], times["lmforge"]))
              for k in ("plain", "hf_trainer")}
    return {"micro_batch": mb, "seq_len": size.seq_len, "warmup_steps": warmup, "timed_steps": timed,
            "step_s": times, "speed_ratio": paired,
            "tokens_per_s": {k: tokens / statistics.median(v) for k, v in times.items()},
            "tokens_per_s_mean": {k: tokens * len(v) / sum(v) for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true",
                    help="tiny models, a few steps: checks that the benchmark runs (numbers "
                         "meaningless; results go to a temporary directory, not bench/results/)")
    ap.add_argument("--out", type=Path, help="the JSON results (default: "
                    "bench/results/throughput.json; with --quick, a temporary file)")
    a = ap.parse_args()
    size = QUICK if a.quick else FULL
    import logging

    from lmforge import distributed
    from lmforge.metrics import flops_per_token, head_fraction, measure_cpu_peak_tflops

    logging.disable(logging.WARNING)
    start, threads, load0 = time.perf_counter(), torch.get_num_threads(), os.getloadavg()
    info = distributed.setup()
    peaks = {"fp32": measure_cpu_peak_tflops(torch.float32),
             "bf16": measure_cpu_peak_tflops(torch.bfloat16)}
    print(f"torch {torch.__version__}, {threads} threads, CPU peak TFLOP/s "
          f"fp32 {peaks['fp32']:.3f} bf16 {peaks['bf16']:.3f}, load average {load0[0]:.1f}",
          flush=True)
    if a.quick:
        print(QUICK_NOTE, flush=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        # A quick run never overwrites real results: its JSON goes away with `tmp`.
        out = a.out or (Path(tmp) / "throughput.json" if a.quick
                        else REPO / "bench" / "results" / "throughput.json")
        for arch in ("gpt", "bert"):
            cfg = config(size, arch, "fp32", 8, 1)
            fpt = flops_per_token(cfg.model, size.seq_len, head_share=head_fraction(
                cfg.model, size.seq_len, cfg.data.mlm_probability))
            for dtype in ("fp32", "bf16"):
                t = time.perf_counter()
                c = bench_cell(size, arch, dtype, Path(tmp), info, threads)
                c["flops_per_token"] = fpt
                c["mfu"] = {k: v * fpt / (peaks[dtype] * 1e12) for k, v in c["tokens_per_s"].items()}
                results[f"{arch} {dtype}"] = c
                write_json(results, peaks, threads, time.perf_counter() - start, out, a.quick)
                print(f"  {arch} {dtype}: {time.perf_counter() - t:.0f}s, median step s " +
                      " ".join(f"{k} {statistics.median(v):.3f}" for k, v in c["step_s"].items()),
                      flush=True)
        distributed.teardown()
        report(results, time.perf_counter() - start, a.quick)
        write_json(results, peaks, threads, time.perf_counter() - start, out, a.quick)
        print(f"wrote {out}" + (" (temporary: deleted at exit)" if out.parent == Path(tmp)
                                else ""))


def report(results: dict[str, Any], wall_s: float, quick: bool = False) -> None:
    """Print the table."""
    if quick:
        print(f"\n{QUICK_NOTE}")
    print(f"\n{'model dtype':11s} {'tokens/s: lmforge':>17s} {'plain':>7s} {'hf':>7s}   "
          f"{'lmf/plain':>9s} {'lmf/hf':>7s}   MFU lmforge / plain / hf")
    for key, c in results.items():
        tps, mfu, r = c["tokens_per_s"], c["mfu"], c["speed_ratio"]
        print(f"{key:11s} {tps['lmforge']:17,.0f} {tps['plain']:7,.0f} {tps['hf_trainer']:7,.0f}"
              f"   {r['lmforge/plain']:8.3f}x {r['lmforge/hf_trainer']:6.3f}x   "
              f"{mfu['lmforge']:.1%} / {mfu['plain']:.1%} / {mfu['hf_trainer']:.1%}"
              + ("   (quick: meaningless)" if quick else ""))
    load = os.getloadavg()
    print("tokens/s from the median timed step; ratios: median of paired per-step speed ratios")
    print(f"total {wall_s:.0f}s; load average at the end {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")


def write_json(results: dict[str, Any], peaks: dict[str, float], threads: int, wall_s: float,
               out: Path, quick: bool) -> None:
    """Results so far (rewritten after every model/dtype cell) with the run's conditions."""
    from lmforge.metrics import cpu_kind

    import transformers

    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"torch": torch.__version__, "transformers": transformers.__version__,
            "threads": threads, "cpu": cpu_kind(),
            "cpu_count": os.cpu_count(), "peak_tflops": peaks, "wall_s": round(wall_s, 1),
            "loadavg": os.getloadavg(), "python": sys.version.split()[0], "quick": quick}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=1) + "\n")


if __name__ == "__main__":
    main()
