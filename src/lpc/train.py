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


@hydra.main(version_base="1.3", config_path="conf", config_name="config")  # lpc/conf/
def train(cfg: DictConfig) -> float:
    from lpc.config import ConfigError, validate

    try:
        validate(cfg)  # before any model or data is loaded
    except ConfigError as err:
        log.error("config error: %s", err)
        sys.exit(2)

    from lpc.run import run

    metrics = run(cfg, HydraConfig.get().runtime.output_dir)
    print(f"eval/pref_accuracy={metrics['eval/pref_accuracy']:.4f}")
    return metrics["eval/pref_accuracy"]  # the value Hydra sweepers optimise


if __name__ == "__main__":
    main()
