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
    conf/local/slurm.yaml, docs/slurm.md) joins the config search path when it exists."""
    if Path("conf/local").is_dir() and not any(a.startswith("hydra.searchpath") for a in sys.argv[1:]):
        sys.argv.insert(1, "hydra.searchpath=[file://conf]")
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

    try:
        validate(cfg)  # before any model or data is loaded
    except ConfigError as err:
        refuse(err, f"config error: {err}")

    from lpc.errors import Interrupted, RunDirInUse
    from lpc.run import run

    try:
        metrics = run(cfg, HydraConfig.get().runtime.output_dir)
    except ConfigError as err:  # found in the run directory (another config's checkpoint)
        refuse(err, f"config error: {err}")
    except RunDirInUse as err:
        refuse(err, str(err))
    except Interrupted as err:
        log.warning("%s", err)
        sys.exit(128 + err.signum)
    print(f"eval/pref_accuracy={metrics['eval/pref_accuracy']:.4f}")
    return metrics["eval/pref_accuracy"]  # the value Hydra sweepers optimise


if __name__ == "__main__":
    main()
