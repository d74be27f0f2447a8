"""Evaluation of trained policies: the LPC-conditioned policy (z from the prior) for lm-evaluation-harness,
local tasks in the harness's format (``tasks/``), and generation exports (``lpc.evaluation.export``).

Importing this package does not import lm-eval (an optional extra); :func:`require_lm_eval` gives the
message to install it.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from lpc.errors import MissingExtra  # noqa: F401  (raised here; defined with the others)

TASKS_DIR = Path(__file__).resolve().parent / "tasks"
QUESTIONS_DIR = Path(__file__).resolve().parent / "questions"
INSTALL_HINT = "pip install -e '.[eval]'  (or: pip install lm-eval)"


def is_option(arg: str) -> bool:
    """One convention for every post-training command (``lpc-generate``, ``lpc-evaluate``, ``lpc-export``,
    ``lpc-steer``): ``RUN key=value ...``. An argument is an option when it has ``=`` and is not an existing
    path, so run directories named by a sweep (``codebook=64,seed=0``) are read as the run."""
    return "=" in arg and not Path(arg).exists()


def runs_of(path: str | Path) -> list[Path]:
    """What a post-training command works on: ``path`` itself when it is a run directory or a checkpoint,
    else, for a sweep directory, each of its completed runs (a command then runs once per run)."""
    from lpc.training import rundir

    path = Path(path)
    own = ("config.json", "adapter_config.json", rundir.FINAL, ".hydra", rundir.METRICS)
    if any((path / name).exists() for name in own):
        return [path]
    runs = [d for d in rundir.run_dirs(path) if rundir.status(d) == "completed"]
    return runs or [path]  # neither: the command's own error names the path


def require_lm_eval():
    """Import and return the ``lm_eval`` package, or raise :class:`MissingExtra` saying what to install."""
    try:
        return importlib.import_module("lm_eval")
    except ImportError as err:
        raise MissingExtra(
            f"lm-evaluation-harness is not installed (needed for `lpc-evaluate`): {INSTALL_HINT}. ({err})"
        ) from None
