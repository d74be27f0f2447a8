"""``lpc-train`` (and ``python src/train.py``): train DPO, SimPO or IPO, with or without Latent Preference
Coding. ``lpc-train --help`` lists the config groups and the composed defaults."""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

log = logging.getLogger("lpc.train")


def main() -> None:
    """``lpc-train``: conf/local/ in the working directory (git-ignored cluster defaults such as
    conf/local/slurm.yaml, docs/slurm.md) joins the config search path when it exists; ``codebook=K`` selects
    the discrete latent (lpc.conf.codebook_implies_latent) before Hydra composes anything."""
    from lpc.conf import codebook_implies_latent

    if Path("conf/local").is_dir() and not any(a.startswith("hydra.searchpath") for a in sys.argv[1:]):
        sys.argv.insert(1, "hydra.searchpath=[file://conf]")
    flags = [a for a in sys.argv[1:] if a.startswith("-") or "=" not in a]
    overrides = [a for a in sys.argv[1:] if a not in flags]
    try:
        implied = codebook_implies_latent(overrides)
    except ValueError as err:
        print(f"lpc-train: config error: {err}", file=sys.stderr)
        sys.exit(2)
    if len(implied) > len(overrides):  # next to the last override: Hydra's overrides are one run of arguments
        at = max(i for i, a in enumerate(sys.argv) if a in overrides) + 1
        sys.argv[at:at] = implied[len(overrides) :]
    train()


def refuse(err: Exception, message: str) -> None:
    """A refused job: exit 2 for a single run. In a multirun the job fails and Hydra goes on with the
    others (an exception, not SystemExit), then reports the failure and exits non-zero at the end."""
    from hydra.types import RunMode

    log.error(message)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise err
    sys.exit(2)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")  # lpc/conf/
def train(cfg: DictConfig) -> float:
    from lpc.config import ConfigError, validate
    from lpc.environment import check_environment

    try:
        check_environment()  # OMP_NUM_THREADS: before accelerate parses it in a launch of several processes
        validate(cfg)  # before any model or data is loaded
    except ConfigError as err:
        refuse(err, f"config error: {err}")

    from lpc.errors import DataError, Interrupted, ModelUnavailable, RunDirInUse
    from lpc.run import run

    try:
        metrics = run(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as err:  # found in the run directory (another config's checkpoint)
        refuse(err, f"config error: {err}")
    except DataError as err:  # bad data, found before training (most of it before any model loads)
        refuse(err, f"data error: {err}")
    except ModelUnavailable as err:
        refuse(err, f"model unavailable: {err}")
    except RunDirInUse as err:
        refuse(err, str(err))
    except Interrupted as err:
        log.warning("%s", err)
        sys.exit(128 + err.signum)
    print(f"eval/pref_accuracy={metrics['eval/pref_accuracy']:.4f}")
    return metrics["eval/pref_accuracy"]  # the value Hydra sweepers optimise


if __name__ == "__main__":
    main()
