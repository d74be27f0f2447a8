"""Train DPO, SimPO or IPO, with or without Latent Preference Coding: ``python src/train.py --help``.

The same command as the installed ``lpc-train`` (``lpc.train``), runnable from a source checkout."""

import os
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parent)
sys.path.insert(0, SRC)  # import lpc from this checkout
# Sweep jobs started by submitit (hydra/launcher=submitit_local|slurm) unpickle the task in a new Python
# that inherits this environment: let it import lpc from this checkout too.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [SRC, os.environ.get("PYTHONPATH")]))

from lpc.train import main  # noqa: E402

if __name__ == "__main__":
    main()
