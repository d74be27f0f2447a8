"""The project's exception classes and the one choice check, in a leaf module (it imports nothing of
``lpc``), so the method, the training code and the config layer can all raise them without cycles."""
from __future__ import annotations


class ConfigError(ValueError):
    """A config value that is not allowed; the message names the key and what is allowed."""


def check_choice(key: str, value, allowed) -> None:
    """``ValueError`` naming ``key``, ``value`` and the allowed values when ``value`` is not one of them."""
    if value not in allowed:
        raise ValueError(f"{key}={value!r} is not allowed: one of {tuple(allowed)}")


def require(cond: bool, key: str, value, allowed: str) -> None:
    """``ValueError`` in the project's one format, ``key=value is not allowed: what is``, unless ``cond``."""
    if not cond:
        raise ValueError(f"{key}={value!r} is not allowed: {allowed}")
