"""Train DPO, SimPO or IPO, with or without Latent Preference Coding: ``python src/train.py --help``.

The same command as the installed ``lpc-train`` (``lpc.train``), runnable from a source checkout."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # import lpc from this checkout

from lpc.train import main  # noqa: E402

if __name__ == "__main__":
    main()
