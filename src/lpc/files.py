"""Writing result files: atomically (readers see the old file or the whole new one, never a partial
write) and readable as the user's umask says (``tempfile.mkstemp`` creates files 0600, which would hide
every result from the user's group on a shared cluster). One implementation for text, JSON and figures."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def default_file_mode() -> int:
    """What ``open(path, "w")`` would give a new file: 0666 minus the umask."""
    return 0o666 & ~_umask()


@contextlib.contextmanager
def atomic_path(path: str | Path, binary: bool = False):
    """Yield an open file in ``path``'s directory; on success it is fsynced, given the umask's mode and
    renamed onto ``path``; on any error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb" if binary else "w") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as f:
        f.write(text)


def atomic_write_json(path: str | Path, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def atomic_save_figure(fig, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure as PNG, atomically."""
    with atomic_path(path, binary=True) as f:
        fig.savefig(f, format="png", dpi=dpi, bbox_inches="tight")
    return Path(path)


def apply_umask(tree: str | Path) -> None:
    """Give every file and directory below ``tree`` the mode the umask says (0666 / 0777 minus it).
    Libraries that write through private temp files (safetensors, accelerate's state) leave 0600 behind."""
    mask = _umask()
    for root, dirs, files in os.walk(tree):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o777 & ~mask)
        for name in files:
            os.chmod(os.path.join(root, name), 0o666 & ~mask)
    os.chmod(tree, 0o777 & ~mask)
