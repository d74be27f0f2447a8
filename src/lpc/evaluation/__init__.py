"""Evaluation of trained policies: the LPC-conditioned policy (z from the prior) for lm-evaluation-harness,
local tasks in the harness's format (``tasks/``), generation exports (``lpc.evaluation.export``), and the
commands' one ``RUN key=value`` parser (``lpc.evaluation.options``).

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


def runs_of(path: str | Path) -> list[Path]:
    """What a post-training command works on: ``path`` itself when it is a run directory or a checkpoint,
    else, for a sweep directory, each of its completed runs (a command then runs once per run)."""
    from lpc.training import rundir

    path = Path(path)
    if rundir.is_model_dir(path) or any((path / name).exists() for name in (rundir.FINAL, ".hydra", rundir.METRICS)):
        return [path]
    runs = [d for d in rundir.run_dirs(path) if rundir.status(d) == rundir.COMPLETED]
    return runs or [path]  # neither: the command's own error names the path


def require_lm_eval():
    """Import and return the ``lm_eval`` package, or raise :class:`MissingExtra` saying what to install."""
    try:
        return importlib.import_module("lm_eval")
    except ImportError as err:
        raise MissingExtra(
            f"lm-evaluation-harness is not installed (needed for `lpc-evaluate`): {INSTALL_HINT}. ({err})"
        ) from None
