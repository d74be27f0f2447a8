"""The Hydra config tree of ``lpc-train`` (package data, so an installed package finds it).
``CONF_DIR`` is its location for code that composes configs itself (the sweep driver, the tests)."""

from pathlib import Path

CONF_DIR = str(Path(__file__).resolve().parent)
