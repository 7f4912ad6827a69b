"""Structured-config schemas (registered in Hydra's ConfigStore) and validation that runs
before anything is allocated. No torch import here."""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """A config value is wrong; the message is one line naming the key and the fix."""


class OutputError(ConfigError):
    """A file could not be written (full disk, file-size limit, no permission)."""


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """An OSError raised inside becomes an OutputError: one line that names `path`
    (a failed write() does not name its file)."""
    try:
        yield
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e.strerror or e}; free space (or raise the "
                          "file-size limit) or write somewhere else") from None


@dataclass
class ModelConfig:
    arch: str = "gpt"  # gpt | bert
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: Optional[int] = None  # grouped-query attention; None = n_heads
    d_model: int = 256
    d_ff: Optional[int] = None  # None = 4 * d_model
    max_seq_len: int = 1024  # size of the learned position table (RoPE: max positions)
    vocab_size: Optional[int] = None  # None = the tokenizer's, padded to a multiple of 64
    norm: str = "layernorm"  # layernorm | rmsnorm
    norm_eps: float = 1e-5
    activation: str = "gelu_tanh"  # gelu_tanh | gelu | swiglu
    pos_emb: str = "learned"  # learned | rope
    rope_theta: float = 10000.0
    bias: bool = True
    tie_embeddings: bool = True
    type_vocab_size: int = 2  # BERT token-type embeddings; 0 drops them
    dropout: float = 0.0
    init_std: float = 0.02
    # Start from pretrained weights: an HF model directory (GPT-2, Llama, BERT), an lmforge
    # export, run or checkpoint, or a hub name. Its config sets the architecture keys above
    # (and vocab_size) and its tokenizer.json becomes tokenizer.path (lmforge.pretrained).
    init_from: Optional[str] = None


@dataclass
class SourceConfig:
    """One entry of a data mixture, or a held-out set of trainer.eval_sets: exactly one of
    path, shards_dir, paths, hub_name."""
    name: Optional[str] = None  # logged as val/<name>_loss; a mixture entry may leave it unset
    weight: float = 1.0
    path: Optional[str] = None  # a shards dir (it has manifest.json), else a file or glob
    shards_dir: Optional[str] = None
    paths: list[str] = field(default_factory=list)
    format: str = "auto"
    text_field: str = "text"
    hub_name: Optional[str] = None
    hub_config: Optional[str] = None
    hub_split: str = "train"

    @property
    def kind(self) -> str:
        if self.path:
            return "shards" if (Path(self.path) / "manifest.json").is_file() else "files"
        return "shards" if self.shards_dir else "hub" if self.hub_name else "files"

    @property
    def shards(self) -> Optional[str]:
        return self.shards_dir or (self.path if self.kind == "shards" else None)

    @property
    def files(self) -> list[str]:
        return list(self.paths) or ([self.path] if self.path and self.kind == "files" else [])


@dataclass
class DataConfig:
    source: str = "embedded"  # embedded | files | hub | shards | mixture (of data.sources)
    paths: list[str] = field(default_factory=list)  # files or globs for source=files
    format: str = "auto"  # auto | text | json | parquet
    text_field: str = "text"
    hub_name: Optional[str] = None  # datasets hub name for source=hub
    hub_config: Optional[str] = None
    hub_split: str = "train"
    shards_dir: Optional[str] = None  # lmforge-prepare shards output for source=shards
    sources: list[SourceConfig] = field(default_factory=list)  # for source=mixture
    seq_len: int = 256
    val_percent: float = 2.0  # documents held out for validation, chosen by content hash
    # How plain-text files become documents: auto (file for the embedded corpus, paragraph
    # for data.paths) | file (one per file) | paragraph (split at blank lines).
    text_split: str = "auto"
    # A longer paragraph or file is cut, at a line end where one is in reach; None = 10_000
    # for paragraphs (a file without blank lines still yields many), 1_000_000 for files.
    doc_max_chars: Optional[int] = None
    shuffle_buffer: int = 1024  # training blocks mixed at random (0 = in stream order)
    num_workers: int = 0  # loader processes per rank (0 = in the training process)
    mlm_probability: float = 0.15

    def shard_sources(self) -> list[tuple[str, float]]:
        """(shards dir, weight) of each pre-tokenized source, or [] when the corpus is
        tokenized on the fly: the one place that picks between the two data paths."""
        if self.source == "shards":
            return [(str(self.shards_dir), 1.0)]
        if self.source == "mixture" and self.sources and self.sources[0].kind == "shards":
            return [(str(s.shards), s.weight) for s in self.sources]
        return []


@dataclass
class TokenizerConfig:
    path: Optional[str] = None  # an existing tokenizer.json; None = train one on the corpus
    kind: str = "auto"  # auto (bpe for gpt, wordpiece for bert) | bpe | wordpiece
    vocab_size: int = 8192
    train_max_chars: int = 50_000_000  # bound on the text the tokenizer is trained on


@dataclass
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 20
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping


@dataclass
class ParallelConfig:
    zero_stage: int = 0
    offload_optimizer: bool = False
    offload_params: bool = False
    activation_checkpointing: bool = False
    ds_extra: dict[str, Any] = field(default_factory=dict)  # raw DeepSpeed keys, merged last


@dataclass
class PrecisionConfig:
    dtype: str = "fp32"  # fp32 | bf16 | fp16
    initial_scale_power: int = 16  # fp16 dynamic loss scaling starts at 2**this
    loss_scale_window: int = 1000


@dataclass
class WandbConfig:
    mode: str = "online"  # online (offline when no API key) | offline | disabled
    project: str = "lmforge"
    entity: Optional[str] = None
    name: Optional[str] = None
    tags: list[str] = field(default_factory=list)
    init_timeout_s: float = 20.0


@dataclass
class LoggingConfig:
    console: bool = True  # progress bar on rank 0
    jsonl: bool = True
    peak_tflops: float = 0.0  # per-device peak for MFU; 0 = GPU table or CPU measurement
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class TrainerConfig:
    max_steps: int = 300
    micro_batch_size: int = 16
    grad_accum_steps: int = 1
    global_batch_size: Optional[int] = None  # samples per step over all ranks; sets grad_accum_steps
    eval_every: int = 100
    eval_batches: int = 8  # per validation set: the mixture, each of its sources, each eval set
    # Extra held-out sets, each evaluated whole (no hash split) at every eval and logged as
    # val/<name>_loss: [{name: wiki, paths: [wiki.txt]}], entries shaped as data.sources'.
    eval_sets: list[SourceConfig] = field(default_factory=list)
    save_every: int = 0  # steps between checkpoints (0: by time only)
    save_every_min: float = 30.0  # wall-clock minutes between checkpoints (0: by steps only)
    keep_last: int = 2  # checkpoints kept, by write order; 0 keeps all
    # A checkpoint dir to start from, used until this run dir has newer checkpoints of its
    # own; None = the newest good checkpoint of this run dir.
    resume_from: Optional[str] = None
    start_fresh: bool = False  # a run dir whose checkpoints all fail verification: set them aside
    dist_timeout_s: float = 600.0  # a collective or a silent rank older than this ends the job
    device: str = "auto"  # auto (CUDA when usable, else CPU) | cuda (refused without CUDA) | cpu
    # torch.compile each transformer block (in place: checkpoints unchanged); the first
    # steps pay the compilation (tens of seconds), later ones run fused kernels.
    compile: bool = False
    max_bad_steps: int = 5  # non-finite loss/grad steps in a row before the run stops
    # Steps between reads of the on-device health (non-finite streak) and of stop requests:
    # other steps make no host-device sync in lmforge. Log, eval and save steps read too.
    check_every: int = 10
    log_every: int = 10
    seed: int = 1337
    sample_tokens: int = 64  # GPT text sample printed at the end; 0 disables
    sample_prompt: str = "def "


@dataclass
class PlanConfig:
    """What lmforge-plan plans for (hardware, budget, goal). A training run checks its plan
    before it starts (`check`) on the device it actually runs on, with `device_memory_gb`."""
    gpu: str = "H100"  # a kind from lmforge.metrics.PEAK_TFLOPS ("H100_SXM" = "H100 SXM"), or cpu
    gpus_per_node: int = 8  # cpu: processes per machine (they share its cores and memory)
    nodes: int = 1
    bandwidth_gb_s: Optional[float] = None  # collective (bus) bandwidth per device; None = by kind
    price_per_gpu_hour: float = 2.5  # USD; a rough cloud H100 price, set your own
    target_tokens: Optional[int] = None  # None = 20 tokens per parameter (Chinchilla)
    device_memory_gb: Optional[float] = None  # None = the kind's (cpu: RAM / gpus_per_node)
    mfu: Optional[float] = None  # None = measured for the kind where known, else assumed
    check: bool = True  # refuse to start a run predicted not to fit (one line, exit 2)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)


NAME = re.compile(r"[A-Za-z0-9._-]+")  # a set's name, as it appears in val/<name>_loss


def source_names(sources: list[SourceConfig]) -> list[str]:
    """Each mixture source's name in val/<name>_loss: its `name`, else the last part of its
    shards dir, single file or hub dataset (source<i> for several files or a glob), made
    unique with _<i>. It depends on the config only, so a resumed run logs the same keys."""
    given = {s.name for s in sources if s.name}
    out: list[str] = []
    for i, s in enumerate(sources):
        name = s.name
        if not name:
            files = s.files
            where = s.shards or s.hub_name or (files[0] if len(files) == 1 else "")
            stem = Path(where).stem if where in files else Path(where).name
            name = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("_.-") or f"source{i}"
            name = f"{name}_{i}" if name in given or name in out else name
        out.append(name)
    return out


def single_source(d: DataConfig, s: SourceConfig) -> DataConfig:
    """`d` reading the one source `s` (a mixture entry or an eval set), as data=files, hub
    or shards would."""
    return dataclasses.replace(d, source=s.kind, paths=s.files, format=s.format,
                               text_field=s.text_field, hub_name=s.hub_name,
                               hub_config=s.hub_config, hub_split=s.hub_split,
                               shards_dir=s.shards, sources=[])


def conf_dir() -> Path:
    """The Hydra config tree: inside the installed package (a wheel maps the repository's
    conf/ to lmforge/conf), else the checkout's conf/ (editable install, source tree)."""
    here = Path(__file__).resolve().parent
    packaged = here / "conf"
    return packaged if packaged.is_dir() else here.parents[1] / "conf"


def run_name(model: str, overrides: str) -> str:
    """The default run-dir name: the model plus the overrides, made safe for a directory
    name (no "/", "[", "*"...) and kept short; the same on every rank."""
    if not overrides:
        return model
    safe = re.sub(r"[^A-Za-z0-9._=,+-]+", "-", overrides).strip("-")
    if len(safe) > 96 or safe != overrides:
        digest = hashlib.sha1(overrides.encode()).hexdigest()[:10]
        safe = f"{safe[:80].rstrip('-,')}-{digest}"
    return f"{model}__{safe}"


def register_configs() -> None:
    """Put the schema where conf/train.yaml's `defaults` names it, and the run-dir resolver."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
    OmegaConf.register_new_resolver("run_name", run_name, replace=True)


def to_schema(cfg: DictConfig, overrides: list[str] = ()) -> "TrainConfig":
    """The typed, validated config (raises ConfigError); `overrides`: the command line's, which
    model.init_from checks its source's architecture against."""
    obj = OmegaConf.to_object(cfg)
    if obj.model.init_from:
        from lmforge.pretrained import apply_init_from  # reads the source's config files

        apply_init_from(obj, list(overrides))
    validate(obj)
    return obj


def compose(overrides: list[str] | None = None, config_dir: str | None = None,
            config_name: str = "train") -> "TrainConfig":
    """The typed config `lmforge-train` builds for these overrides (`config_dir`: a user's
    extra config dir, as Hydra's --config-dir adds it)."""
    return to_schema(compose_dict(overrides, config_dir, config_name), list(overrides or []))


def compose_dict(overrides: list[str] | None = None, config_dir: str | None = None,
                 config_name: str = "train") -> DictConfig:
    """compose() before validation, for a caller that fills in more (lmforge-eval)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    extra = [f"hydra.searchpath=[file://{Path(config_dir).resolve()}]"] if config_dir else []
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return hydra_compose(config_name, overrides=extra + list(overrides or []))


def run_dir(overrides: list[str] | None = None) -> Path:
    """The run dir `lmforge-train` uses for these overrides (Hydra's run.dir, resolved)."""
    from hydra import compose as hydra_compose, initialize_config_dir

    register_configs()
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = hydra_compose("train", overrides=list(overrides or []), return_hydra_config=True)
        return Path(cfg.hydra.run.dir)


def check_cli(argv: list[str]) -> None:
    """Compose and validate every job Hydra would run for these arguments (each job of a -m
    sweep, with a -cd config dir), so that a bad override is one line before Hydra starts.
    Hydra's own modes (--help, -sc, --info) and a replaced primary config (-cp) pass."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra._internal.utils import get_args_parser
    from hydra.core.override_parser.overrides_parser import OverridesParser

    args = get_args_parser().parse_args(argv)
    if (args.help or args.hydra_help or args.shell_completion or args.info is not None
            or args.config_path is not None):
        return
    check_dir_names(args.overrides)
    jobs = [args.overrides]
    if args.multirun:
        parsed = OverridesParser.create().parse_overrides(args.overrides)
        jobs = [job for batch in BasicSweeper.split_arguments(parsed, None) for job in batch]
    for job in jobs:
        compose(job, args.config_dir, args.config_name or "train")


NAME_MAX = 255  # bytes in one file name on Linux and macOS file systems


def check_dir_names(overrides: list[str]) -> None:
    """A run directory given with a name too long for the file system is one line here,
    not Hydra's traceback from mkdir (default names are kept short by run_name)."""
    for o in overrides:
        key, _, value = o.partition("=")
        if key.lstrip("+~") not in ("hydra.run.dir", "hydra.sweep.dir", "hydra.sweep.subdir"):
            continue
        for part in Path(value).parts:
            if len(part.encode()) > NAME_MAX:
                raise ConfigError(f"{key.lstrip('+~')}: the name {part[:20]!r}... is "
                                  f"{len(part.encode())} bytes, more than a file name may have "
                                  f"({NAME_MAX}); shorten it")


def error_kind(e: BaseException) -> str:
    """How a one-line message is labelled: an output that cannot be written (a full disk)
    is no config error."""
    return "error" if isinstance(e, OutputError) else "config error"


def one_line(e: BaseException) -> str:
    """An error and its causes in one line; an unknown key also lists the known ones."""
    parts, hint = [], ""
    while e is not None:
        text = str(e).split("full_key:")[0].split("Config search path:")[0]
        # Hydra 1.3 advises "+key" for any missing key, wrong for a typo in a structured
        # config: that line is dropped (tests/test_config.py notices when Hydra changes it).
        text = " ".join(l for l in text.splitlines() if not l.startswith("To append")).strip()
        text = " ".join(text.split()).rstrip(".")
        if text and text not in parts:
            parts.append(text)
        full_key = getattr(e, "full_key", None)
        if full_key and "not in" in str(e):
            node = getattr(e, "object_type", None)  # a list entry's full_key lacks its path
            try:
                names = ([f.name for f in fields(node)] if dataclasses.is_dataclass(node)
                         else known_keys(full_key.rpartition('.')[0]))
                hint = f" (known keys: {', '.join(names)})"
            except (KeyError, TypeError):
                pass
        e = e.__cause__
    return ": ".join(parts) + hint


def known_keys(dotted_parent: str) -> list[str]:
    """Field names of the schema node at `dotted_parent` ("" = top level)."""
    node: Any = TrainConfig
    for part in filter(None, dotted_parent.split(".")):
        node = {f.name: f for f in fields(node)}[part].default_factory
    return [f.name for f in fields(node)]


CHOICES = {
    "model.arch": ("gpt", "bert"),
    "model.norm": ("layernorm", "rmsnorm"),
    "model.activation": ("gelu_tanh", "gelu", "swiglu"),
    "model.pos_emb": ("learned", "rope"),
    "data.source": ("embedded", "files", "hub", "shards", "mixture"),
    "data.format": ("auto", "text", "json", "parquet"),
    "data.text_split": ("auto", "file", "paragraph"),
    "tokenizer.kind": ("auto", "bpe", "wordpiece"),
    "parallel.zero_stage": (0, 1, 2, 3),
    "trainer.device": ("auto", "cuda", "cpu"),
    "precision.dtype": ("fp32", "bf16", "fp16"),
    "logging.wandb.mode": ("online", "offline", "disabled"),
}

POSITIVE = ["model.n_layers", "model.n_heads", "model.d_model", "model.max_seq_len",
            "data.seq_len", "tokenizer.vocab_size", "trainer.micro_batch_size",
            "trainer.grad_accum_steps", "trainer.log_every", "trainer.max_bad_steps", "trainer.eval_batches",
            "trainer.check_every",
            "trainer.dist_timeout_s", "optim.lr", "tokenizer.train_max_chars", "model.norm_eps",
            "plan.gpus_per_node", "plan.nodes"]
NON_NEGATIVE = ["trainer.max_steps", "trainer.eval_every", "trainer.save_every",
                "trainer.save_every_min",
                "trainer.sample_tokens", "trainer.keep_last", "data.shuffle_buffer", "data.num_workers", "optim.warmup_steps", "optim.weight_decay",
                "optim.grad_clip", "optim.eps", "model.type_vocab_size",
                "model.init_std", "plan.price_per_gpu_hour"]
# Optional keys: None means "derive it"; a value must be > 0.
POSITIVE_IF_SET = ["model.d_ff", "model.n_kv_heads", "model.vocab_size",
                   "trainer.global_batch_size", "data.doc_max_chars"]
# [low, high): values outside make torch raise mid-set-up, or silently train nothing.
HALF_OPEN = {"optim.beta1": (0.0, 1.0), "optim.beta2": (0.0, 1.0), "model.dropout": (0.0, 1.0)}


def pad_vocab(tokenizer_vocab: int) -> int:
    """model.vocab_size when left to the tokenizer: rounded up to a multiple of 64, so the
    LM head's GEMM is aligned (50257 -> 50304); an explicit model.vocab_size stays exact."""
    return -(-tokenizer_vocab // 64) * 64


def resolve_grad_accum(t: TrainerConfig, world_size: int) -> int:
    """Accumulation steps so that micro batch x accumulation x ranks = the global batch."""
    if t.global_batch_size is None:
        return t.grad_accum_steps
    per_step = t.micro_batch_size * world_size
    ga, rest = divmod(t.global_batch_size, per_step)
    _check(rest == 0 and ga > 0, f"trainer.global_batch_size={t.global_batch_size} is not a "
           f"multiple of trainer.micro_batch_size x ranks = {t.micro_batch_size} x {world_size}")
    _check(t.grad_accum_steps in (1, ga), f"trainer.grad_accum_steps={t.grad_accum_steps} "
           f"contradicts trainer.global_batch_size={t.global_batch_size} (which needs {ga} on "
           f"{world_size} ranks); set only one of them")
    return ga


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


# The data.* keys each data.source reads; any other of these set is a user's intent that
# this source would silently ignore.
_TEXT_KEYS = {"text_split", "doc_max_chars"}
_DATA_READS = {"embedded": _TEXT_KEYS, "files": {"paths", "format", "text_field", *_TEXT_KEYS},
               "hub": {"hub_name", "hub_config", "hub_split", "text_field"},
               "shards": {"shards_dir"}, "mixture": {"sources", *_TEXT_KEYS}}


def _unused(cfg: Any) -> list[str]:
    """One message per key set to a non-default value that the chosen groups never read."""
    d, m, t = cfg.data, cfg.model, cfg.tokenizer
    dd, md, td = DataConfig(), ModelConfig(), TokenizerConfig()
    out = []
    for key in sorted(set().union(*_DATA_READS.values()) - _DATA_READS[d.source]):
        if getattr(d, key) != getattr(dd, key):
            owners = " or ".join(f"data={s}" for s, keys in _DATA_READS.items() if key in keys)
            out.append(f"data.{key} is set but data.source={d.source} does not read it; "
                       f"choose {owners}, or drop data.{key}")
    shards = d.shard_sources()
    if shards:
        for key in ("val_percent", "shuffle_buffer", *sorted(_TEXT_KEYS)):
            if getattr(d, key) != getattr(dd, key):
                out.append(f"data.{key} has no effect on pre-tokenized shards (documents and "
                           "the split are fixed by lmforge-prepare shards, blocks are permuted "
                           f"per epoch); drop data.{key}")
    if d.source == "embedded" and d.text_split == "auto" and d.doc_max_chars is not None:
        out.append("data.doc_max_chars is set but the embedded corpus is read a whole file per "
                   "document (data.text_split=auto); set data.text_split=file or paragraph, "
                   "or drop data.doc_max_chars")
    if t.path or shards:
        given = "the shards' tokenizer" if shards else "tokenizer.path"
        for key in ("vocab_size", "train_max_chars", "kind"):
            if getattr(t, key) != getattr(td, key):
                out.append(f"tokenizer.{key} has no effect when {given} is used (no tokenizer "
                           f"is trained); drop tokenizer.{key}")
    if m.arch == "gpt" and d.mlm_probability != dd.mlm_probability:
        out.append("data.mlm_probability is set but model.arch=gpt does not mask tokens; "
                   "drop it or choose a BERT model")
    if m.arch == "gpt" and m.type_vocab_size != md.type_vocab_size:
        out.append("model.type_vocab_size is set but model.arch=gpt has no token types; drop it")
    if m.pos_emb != "rope" and m.rope_theta != md.rope_theta:
        out.append(f"model.rope_theta is set but model.pos_emb={m.pos_emb}; set "
                   "model.pos_emb=rope or drop it")
    pd = PrecisionConfig()
    for key in ("initial_scale_power", "loss_scale_window"):
        if cfg.precision.dtype != "fp16" and getattr(cfg.precision, key) != getattr(pd, key):
            out.append(f"precision.{key} scales fp16 losses only; set precision=fp16 or drop it")
    return out


def _check_source(src: SourceConfig, where: str) -> None:
    given = [k for k in ("path", "shards_dir", "paths", "hub_name") if getattr(src, k)]
    _check(len(given) == 1, f"{where} must set exactly one of path, shards_dir, paths, "
           f"hub_name (it sets {given or 'none'})")
    ignored = [k for k, v in [("format", src.format != "auto"),
                              ("text_field", src.text_field != "text")]
               if v and src.kind == "shards"]
    ignored += [k for k, v in [("hub_config", src.hub_config is not None),
                               ("hub_split", src.hub_split != "train")]
                if v and not src.hub_name]
    _check(not ignored, f"{where} sets {ignored[0] if ignored else ''}, which its {src.kind} "
           "source does not read; drop it")


def _check_names(names: list[Optional[str]], key: str, taken: set[str]) -> None:
    """Set names are metric keys: plain characters, each used once, none already `taken`
    (a mixture source's)."""
    seen: set[str] = set()
    for i, name in enumerate(names):
        if name is None:
            continue
        _check(bool(NAME.fullmatch(name)), f"{key}[{i}].name={name!r} may hold only letters, "
               "digits, '.', '_' and '-' (it is logged as val/<name>_loss)")
        _check(name not in seen, f"{key}[{i}].name={name!r} is used twice in {key}; "
               "give each a name of its own")
        _check(name not in taken, f"{key}[{i}].name={name!r} is also a data.sources name "
               "(val/<name>_loss would be logged twice); rename one")
        seen.add(name)


def validate(cfg: Any) -> None:
    """Raise ConfigError (one line: key, bad value, how to fix) on any inconsistent value."""
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        _check(value in allowed, f"{key}={value!r} is not allowed; choose one of {list(allowed)}")
    for key in POSITIVE:
        _check(_get(cfg, key) > 0, f"{key}={_get(cfg, key)} must be > 0")
    for key in NON_NEGATIVE:
        _check(_get(cfg, key) >= 0, f"{key}={_get(cfg, key)} must be >= 0")
    for key in POSITIVE_IF_SET:
        _check(_get(cfg, key) is None or _get(cfg, key) > 0,
               f"{key}={_get(cfg, key)} must be > 0 (or null: derived)")
    for key, (low, high) in HALF_OPEN.items():
        _check(low <= _get(cfg, key) < high,
               f"{key}={_get(cfg, key)} must be in [{low:g}, {high:g})")
    m, d = cfg.model, cfg.data
    _check(m.d_model % m.n_heads == 0,
           f"model.d_model={m.d_model} must be divisible by model.n_heads={m.n_heads}")
    kv = m.n_kv_heads or m.n_heads
    _check(m.n_heads % kv == 0,
           f"model.n_kv_heads={kv} must divide model.n_heads={m.n_heads}")
    if m.pos_emb == "rope":
        _check(m.rope_theta > 0, f"model.rope_theta={m.rope_theta} must be > 0")
        _check((m.d_model // m.n_heads) % 2 == 0, "model.pos_emb=rope needs an even head dim "
               f"(d_model/n_heads = {m.d_model // m.n_heads})")
    _check(d.seq_len <= m.max_seq_len,
           f"data.seq_len={d.seq_len} exceeds model.max_seq_len={m.max_seq_len}; "
           "lower data.seq_len or raise model.max_seq_len")
    if m.arch == "bert":
        _check(m.pos_emb == "learned", "model.arch=bert supports only model.pos_emb=learned")
        _check(d.seq_len >= 3, "data.seq_len must be >= 3 for BERT ([CLS] x [SEP])")
    _check(0.0 <= d.val_percent < 100.0, f"data.val_percent={d.val_percent} must be in [0, 100)")
    _check(0.0 < d.mlm_probability < 1.0,
           f"data.mlm_probability={d.mlm_probability} must be in (0, 1)")
    if d.source == "files":
        _check(len(d.paths) > 0, "data.source=files needs data.paths=[file_or_glob,...]")
    if d.source == "shards":
        _check(bool(d.shards_dir), "data.source=shards needs data.shards_dir=<lmforge-prepare "
               "shards output>")
    if d.source == "hub":
        _check(bool(d.hub_name), "data.source=hub needs data.hub_name=<dataset on the hub>")
    if d.source == "mixture":
        _check(len(d.sources) > 0, "data.source=mixture needs data.sources=[{shards_dir: a, "
               "weight: 0.7}, {shards_dir: b, weight: 0.3}] (or paths / hub_name entries)")
        for i, src in enumerate(d.sources):
            _check_source(src, f"data.sources[{i}]")
            _check(src.weight > 0, f"data.sources[{i}].weight={src.weight} must be > 0")
        shards = {src.kind == "shards" for src in d.sources}
        _check(len(shards) == 1, "data.sources mixes shards with on-the-fly sources; "
               "prepare every source with lmforge-prepare shards, or none")
        _check_names([s.name for s in d.sources], "data.sources", set())
    mixed = set(source_names(d.sources)) if d.source == "mixture" else set()
    for i, src in enumerate(cfg.trainer.eval_sets):
        where = f"trainer.eval_sets[{i}]"
        _check(bool(src.name), f"{where} needs a name, e.g. {{name: wiki, paths: [wiki.txt]}}"
               " (its loss is logged as val/<name>_loss)")
        _check_source(src, where)
        _check(src.weight == 1.0, f"{where}.weight={src.weight} is not read (an eval set is "
               "not mixed); drop it")
    _check_names([s.name for s in cfg.trainer.eval_sets], "trainer.eval_sets", mixed)
    if cfg.tokenizer.kind != "auto":
        want = "bpe" if m.arch == "gpt" else "wordpiece"
        _check(cfg.tokenizer.kind == want or cfg.tokenizer.path is not None,
               f"tokenizer.kind={cfg.tokenizer.kind} does not fit model.arch={m.arch}; use {want}")
    _check(0.0 <= cfg.optim.min_lr_ratio <= 1.0,
           f"optim.min_lr_ratio={cfg.optim.min_lr_ratio} must be in [0, 1]")
    p = cfg.parallel
    _check(not p.offload_params or p.zero_stage == 3,
           "parallel.offload_params needs parallel.zero_stage=3")
    _check(not p.offload_optimizer or p.zero_stage >= 1,
           "parallel.offload_optimizer needs parallel.zero_stage >= 1")
    for section in ("zero_optimization", "bf16", "fp16"):  # merged into lmforge's own
        value = dict(p.ds_extra).get(section, {})
        _check(isinstance(value, dict),
               f"parallel.ds_extra.{section}={value!r} must be a mapping of DeepSpeed's "
               f"{section} keys, e.g. {{{section}: {{key: value}}}}")
    for key in ("bandwidth_gb_s", "target_tokens", "device_memory_gb", "mfu"):
        value = getattr(cfg.plan, key)
        _check(value is None or value > 0, f"plan.{key}={value} must be > 0 (or null)")
    _check(cfg.plan.mfu is None or cfg.plan.mfu <= 1, f"plan.mfu={cfg.plan.mfu} must be <= 1")
    for problem in _unused(cfg)[:1]:
        raise ConfigError(problem)
