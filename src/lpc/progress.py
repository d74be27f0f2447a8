"""Progress of the long phases (evaluation, reference log-probs, analysis, checkpoints, export).

On a terminal a phase shows a tqdm bar; in a log file (SLURM, CI: stderr is not a terminal) it writes a
timed line every ``every`` seconds and one when it ends, and the libraries' own bars (datasets' map,
transformers' "Loading weights" and "Writing model shards", huggingface_hub's downloads) are off, because
their carriage returns would leave one long garbled line per bar in the file.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from collections.abc import Iterable, Iterator

from tqdm.auto import tqdm


def interactive() -> bool:
    return sys.stderr.isatty()


def quiet_library_bars() -> None:
    """Turn the libraries' progress bars off when stderr is a log file (a terminal keeps them)."""
    if interactive():
        return
    import datasets
    from huggingface_hub.utils import disable_progress_bars
    from transformers.utils import logging as transformers_logging

    datasets.disable_progress_bars()
    transformers_logging.disable_progress_bar()
    disable_progress_bars()


def tracked(
    items: Iterable, desc: str, log: logging.Logger, total: int | None = None, every: float = 30.0, enabled: bool = True
) -> Iterator:
    """``items``, showing progress: a bar on a terminal, else ``desc: i/total (s)`` every ``every`` seconds and
    at the end. ``enabled=False`` (e.g. ranks other than 0) shows nothing."""
    total = total if total is not None else (len(items) if hasattr(items, "__len__") else None)
    if not enabled:
        yield from items
        return
    if interactive():
        yield from tqdm(items, desc=desc, total=total, leave=False)
        return
    start = last = time.time()
    done = 0
    of = f"/{total}" if total is not None else ""
    for item in items:
        yield item
        done += 1
        if time.time() - last >= every:
            last = time.time()
            log.info("%s: %d%s (%.0f s)", desc, done, of, last - start)
    log.info("%s: %d%s done in %.1f s", desc, done, of, time.time() - start)


@contextlib.contextmanager
def phase(desc: str, log: logging.Logger, enabled: bool = True):
    """A line when a phase starts and one with its duration when it ends (terminal and log file alike)."""
    if not enabled:
        yield
        return
    start = time.time()
    log.info("%s ...", desc)
    yield
    log.info("%s: done in %.1f s", desc, time.time() - start)
