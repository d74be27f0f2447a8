"""The project's exception classes and the one choice check, in a leaf module (it imports nothing of
``lpc``), so the method, the training code and the config layer can all raise them without cycles."""

from __future__ import annotations

import math


class ConfigError(ValueError):
    """A config value that is not allowed; the message names the key and what is allowed."""


class DataError(ValueError):
    """Bad data: a missing file or column, or bad rows under ``on_bad_row=error``."""


class Interrupted(RuntimeError):
    """Training stopped on SIGTERM or SIGINT after writing a checkpoint; ``signum`` is the signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class WontFit(ConfigError):
    """The run would not fit: lpc-plan's memory estimate exceeds the hardware's (a GPU run), or its checkpoints
    and final/ exceed the run directory's free disk. Refused before any model loads (exit 2); the message holds
    the numbers and what would fit; ``trainer.allow_misfit=true`` runs it anyway."""


class DiskFull(RuntimeError):
    """A write of the run (a checkpoint, final/, a log) failed for lack of space; the partial write is removed
    and the earlier checkpoints are kept. The message names the directory and the space the run needs."""


class RunDirInUse(RuntimeError):
    """Another process is training in the same run directory."""


class ModelUnavailable(RuntimeError):
    """The requested model cannot be loaded here (not cached and offline, or a package missing)."""


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message says what to install."""


class UsageError(ValueError):
    """A bad command-line argument of one of the post-training commands; the message names it."""


class PlanError(UsageError):
    """``lpc-plan``: the config cannot be planned (a missing or inconsistent value)."""


class Unplannable(PlanError):
    """The config lacks what a plan needs (a model without ``model.arch``): lpc-train skips its memory and disk
    checks with a warning instead of refusing the run."""


class GenerateError(UsageError):
    """``lpc-generate``: a bad argument or a checkpoint that cannot do what was asked."""


class ExportError(UsageError):
    """``lpc-export``: a bad argument or input file."""


class SteeringError(UsageError):
    """``lpc-steer``: a bad argument or a run without ground-truth type rewards."""


def check_choice(key: str, value, allowed) -> None:
    """``ValueError`` naming ``key``, ``value`` and the allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed: one of {tuple(allowed)}")


def require_number(key: str, value, allowed: str, ok=lambda v: True, integer: bool = False) -> None:
    """Like :func:`require` for a numeric option: a finite number (an int with ``integer``) for which
    ``ok`` holds. A string such as ``abc`` gets the same message instead of a comparison's TypeError."""
    kinds = int if integer else (int, float)
    is_number = isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
    require(is_number and ok(value), key, value, allowed)


def require(cond: bool, key: str, value, allowed: str, error: type[ValueError] = ValueError) -> None:
    """``error`` in the project's one format, ``key=value is not allowed: what is``, unless ``cond``."""
    if not cond:
        raise error(f"{key}={value!r} is not allowed: {allowed}")
