"""Checks on the process environment that ``lpc-train`` runs with its config checks, before any model loads or
any process is launched.

``OMP_NUM_THREADS`` is read by the OpenMP runtime (libgomp: an unparsable value is ignored with a warning), by
torch, and by accelerate, which parses it with ``int()`` when it starts or joins several CPU processes: an
empty value (``OMP_NUM_THREADS= make train``, or a launcher's ``export OMP_NUM_THREADS=$N`` with N unset) or
``4,2`` there fails deep inside accelerate with ``ValueError: invalid literal for int()``. It is refused here
instead, with the variable, its value and what is allowed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping

from lpc.errors import ConfigError, require

ALLOWED_THREADS = (
    "a positive integer, the threads of each process (e.g. OMP_NUM_THREADS=1), or unset for the default; "
    "an empty value is not unset: `unset OMP_NUM_THREADS`"
)


def check_environment(environ: Mapping[str, str] | None = None) -> None:
    """``ConfigError`` naming the variable, its value and what is allowed, for an ``OMP_NUM_THREADS`` that is
    set but not a positive integer (surrounding blanks allowed, as both libgomp and accelerate's ``int()`` do)."""
    environ = os.environ if environ is None else environ
    value = environ.get("OMP_NUM_THREADS")
    if value is None:
        return
    ok = re.fullmatch(r"\s*[0-9]+\s*", value) is not None and int(value) > 0
    require(ok, "environment variable OMP_NUM_THREADS", value, ALLOWED_THREADS, ConfigError)
