"""``python tests/crash_after.py N <train.py arguments>``: the training entry point with one step hook
that hard-exits (``os._exit(3)``: no cleanup, no final files, like SIGKILL) after step N. The resume tests
use it; the hook list is the trainer's own (``PreferenceTrainer.step_hooks``), nothing in the loop reads
an environment variable."""

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402

from lpc.conf import CONF_DIR  # noqa: E402

CRASH_AFTER = int(sys.argv.pop(1))


def crash_after(trainer):
    if trainer.step == CRASH_AFTER:
        os._exit(3)


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def main(cfg):
    from lpc.config import validate
    from lpc.run import run

    validate(cfg)
    run(cfg, HydraConfig.get().runtime.output_dir, step_hooks=[crash_after])


if __name__ == "__main__":
    main()
