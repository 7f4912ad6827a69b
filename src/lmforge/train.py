"""`lmforge-train`: compose the Hydra config, validate it, build, fit."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lmforge.config import ConfigError, check_cli, conf_dir, error_kind, one_line, register_configs, to_schema

EXIT_CONFIG = 2  # bad config or input: fix and re-run
EXIT_DIVERGED = 3  # too many non-finite steps; the last good checkpoint is kept
EXIT_REQUEUE = 75  # stopped by SIGTERM/SIGUSR1/Ctrl-C after a checkpoint: run again to resume
register_configs()


@hydra.main(config_path=str(conf_dir()), config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from lmforge import distributed
    from lmforge.assembly import build, release_run_dir
    from lmforge.loggers import setup_logging
    from lmforge.trainer import NonFiniteError, StopSignals

    StopSignals.install()  # from the start: a signal during set-up still exits 75
    code = 0
    try:
        schema = to_schema(cfg, list(HydraConfig.get().overrides.task))
        run_dir = Path(HydraConfig.get().runtime.output_dir)
        info = distributed.setup(schema.trainer.dist_timeout_s, schema.trainer.device)
        setup_logging(info.rank, run_dir)
        trainer = build(schema, run_dir, info)  # None: a dry run
        if trainer is not None and trainer.fit().get("stopped"):
            code = EXIT_REQUEUE
        distributed.barrier()  # leave together: no rank tears down while a peer still talks
        release_run_dir(run_dir)
    except ConfigError as e:  # set-up checks fail alike on every rank: nothing to report
        fail(e)
    except NonFiniteError as e:
        logging.getLogger("lmforge").error("%s", e)
        code = EXIT_DIVERGED
    except Exception as e:  # one line for a peer's or the disk's failure; a bug's traceback
        code = distributed.stop_on_error(e)
    finally:
        distributed.teardown()
    if code:
        sys.exit(code)


def fail(e: Exception) -> None:
    # SystemExit passes through Hydra's error reporting, which would print a traceback.
    print(f"lmforge-train: {error_kind(e)}: {one_line(e)}", file=sys.stderr)
    sys.exit(EXIT_CONFIG)


def cli() -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    # The deepspeed launcher appends --local_rank=N; LOCAL_RANK is in the environment too.
    sys.argv[1:] = [a for a in sys.argv[1:]
                    if not a.startswith(("--local_rank=", "--local-rank="))]
    try:
        check_cli(sys.argv[1:])
    except Exception as e:  # Hydra's and OmegaConf's many error types: one line each
        fail(e)
    from lmforge.distributed import exit_process

    try:
        main()
    except SystemExit as e:
        exit_process(e.code)
    exit_process(0)


if __name__ == "__main__":
    cli()
