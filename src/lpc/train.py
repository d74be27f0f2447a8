"""``lpc-train`` (and ``python src/train.py``): train DPO, SimPO or IPO, with or without Latent Preference
Coding. ``lpc-train --help`` lists the config groups and the composed defaults."""

import logging
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lpc.conf import CONF_DIR

log = logging.getLogger("lpc.train")


def main() -> None:
    """``lpc-train``: conf/local/ in the working directory (git-ignored cluster defaults such as
    conf/local/slurm.yaml, docs/slurm.md) joins the config search path when it exists and is not the config
    tree's own (a checkout's)."""
    local = Path("conf/local")
    if (
        local.is_dir()
        and local.resolve().parent != Path(CONF_DIR).resolve()
        and not any(a.startswith("hydra.searchpath") for a in sys.argv[1:])
    ):
        sys.argv.insert(1, "hydra.searchpath=[file://conf]")
    train()


def refuse(err: Exception, message: str, code: int = 2) -> None:
    """A refused (exit 2) or failed job: exit ``code`` for a single run. In a multirun the job fails and Hydra
    goes on with the others (an exception, not SystemExit), then reports the failure and exits non-zero at the end."""
    from hydra.types import RunMode

    log.error(message)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        raise err
    sys.exit(code)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def train(cfg: DictConfig) -> float:
    from lpc.config import ConfigError, validate
    from lpc.environment import check_environment

    try:
        check_environment()  # OMP_NUM_THREADS: before accelerate parses it in a launch of several processes
        validate(cfg)  # before any model or data is loaded
    except ConfigError as err:
        refuse(err, f"config error: {err}")

    from lpc.errors import DataError, DiskFull, Interrupted, ModelUnavailable, RunDirInUse, WontFit
    from lpc.preflight import child_overrides, is_main_process, launch, preflight

    run_dir = HydraConfig.get().runtime.output_dir
    try:  # still before any model loads: the sharding, lpc-plan's memory and disk verdicts, the processes
        decision = preflight(cfg, run_dir)
    except WontFit as err:
        refuse(err, f"refused: {err}")
    except ConfigError as err:
        refuse(err, f"config error: {err}")
    if decision.processes > 1:  # N processes on this node, none started by a launcher: start them
        code = launch(cfg, decision.processes, child_overrides(cfg, run_dir))
        if code:
            import signal

            how = f"stopped by {signal.Signals(code - 128).name}" if code - 128 in set(signal.Signals) else "failed"
            message = f"the {decision.processes} training processes {how} (exit code {code}); their messages are above"
            refuse(RuntimeError(message), message, code)
        from lpc.training.rundir import load_metrics

        return (load_metrics(run_dir) or {}).get("eval/pref_accuracy")  # rank 0 printed it

    from lpc.run import run

    try:
        metrics = run(cfg, run_dir)
    except ConfigError as err:  # found in the run directory (another config's checkpoint)
        refuse(err, f"config error: {err}")
    except DataError as err:  # bad data, found before training (most of it before any model loads)
        refuse(err, f"data error: {err}")
    except ModelUnavailable as err:
        refuse(err, f"model unavailable: {err}")
    except RunDirInUse as err:
        refuse(err, str(err))
    except DiskFull as err:  # a checkpoint, final/ or a log that did not fit: the earlier checkpoints are kept
        refuse(err, str(err), 1)
    except Interrupted as err:
        log.warning("%s", err)
        sys.exit(128 + err.signum)
    if is_main_process():  # once, not once per rank
        print(f"eval/pref_accuracy={metrics['eval/pref_accuracy']:.4f}")
    return metrics["eval/pref_accuracy"]  # the value Hydra sweepers optimise


if __name__ == "__main__":
    main()
