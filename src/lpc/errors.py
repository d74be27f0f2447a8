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
