"""`lmforge-train`: compose the Hydra config, validate it, build, fit."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from lmforge.config import ConfigError, TrainConfig, known_keys, register_configs, validate

EXIT_CONFIG = 2  # bad config or input: fix and re-run
EXIT_DIVERGED = 3  # too many non-finite steps; the last good checkpoint is kept
EXIT_REQUEUE = 75  # stopped by SIGTERM/SIGUSR1/Ctrl-C after a checkpoint: run again to resume
CONF_DIR = str(Path(__file__).resolve().parents[2] / "conf")
log = logging.getLogger("lmforge")

register_configs()
OmegaConf.register_new_resolver(
    "run_name", lambda model, overrides: model + (f"__{overrides}" if overrides else ""),
    replace=True)


def to_schema(cfg: DictConfig) -> TrainConfig:
    """The typed, validated config (raises ConfigError)."""
    obj = OmegaConf.to_object(cfg)
    validate(obj)
    return obj


def one_line(e: BaseException) -> str:
    """An error and its causes in one line; an unknown key also lists the known ones."""
    parts, hint = [], ""
    while e is not None:
        text = str(e).split("full_key:")[0].split("Config search path:")[0]
        # Hydra's "+key" advice is wrong for a typo in a structured config.
        text = " ".join(l for l in text.splitlines() if not l.startswith("To append")).strip()
        text = " ".join(text.split()).rstrip(".")
        if text and text not in parts:
            parts.append(text)
        full_key = getattr(e, "full_key", None)
        if full_key and "not in" in str(e):
            try:
                hint = f" (known keys: {', '.join(known_keys(full_key.rpartition('.')[0]))})"
            except (KeyError, TypeError):
                pass
        e = e.__cause__
    return ": ".join(parts) + hint


def precheck(argv: list[str]) -> None:
    """Compose and validate before Hydra runs, so a bad override is one line, exit 2."""
    from hydra import compose, initialize_config_dir

    # Overrides have "=" (or are deletions "~key"); flags like --cfg job are Hydra's own.
    overrides = [a for a in argv if not a.startswith("-") and ("=" in a or a.startswith("~"))]
    try:
        with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
            to_schema(compose("train", overrides=overrides))
    except Exception as e:
        fail(e)


def setup_logging(rank: int, run_dir: Path) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if rank == 0:
        handlers.append(logging.FileHandler(run_dir / "train.log"))
    logging.basicConfig(level=level, handlers=handlers, force=True,
                        format=f"[%(asctime)s r{rank}] %(message)s", datefmt="%H:%M:%S")
    for noisy in ("DeepSpeed", "deepspeed", "torch.distributed", "datasets", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


@hydra.main(config_path=CONF_DIR, config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from lmforge import distributed
    from lmforge.engine import check_precision
    from lmforge.trainer import NonFiniteError, build

    try:
        schema = to_schema(cfg)
    except ConfigError as e:
        fail(e)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    info = distributed.setup()
    setup_logging(info.rank, run_dir)
    try:
        check_precision(schema.precision.dtype, info.device)
    except ConfigError as e:
        fail(e)
    log.info("run dir %s, world size %d, %s", run_dir, info.world_size, info.device)
    try:
        trainer = build(schema, run_dir, info)
        summary: dict = {}
        if trainer is None:
            log.info("trainer.max_steps=0: wrote %s and stopped (dry run)", run_dir / "summary.json")
        else:
            summary = trainer.fit()
    except ConfigError as e:
        fail(e)
    except NonFiniteError as e:
        log.error("%s", e)
        code = EXIT_DIVERGED
    else:
        code = EXIT_REQUEUE if summary.get("stopped") else 0
    finally:
        distributed.teardown()
    if code:
        sys.exit(code)


def fail(e: Exception) -> None:
    # SystemExit passes through Hydra's error reporting, which would print a traceback.
    print(f"lmforge-train: config error: {one_line(e)}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def cli() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK is in the environment too.
    sys.argv[1:] = [a for a in sys.argv[1:]
                    if not a.startswith(("--local_rank=", "--local-rank="))]
    precheck(sys.argv[1:])
    main()


if __name__ == "__main__":
    cli()
