"""A run directory, read and written in one place: its layout, its checkpoints, its status, its config.

    RUN/
      .hydra/config.yaml, overrides.yaml   the composed config and the command-line overrides (Hydra)
      checkpoints/step-N/                  accelerate state + trainer_state.json (a temp dir, then renamed)
      final/                               the exported model (lpc_config.yaml: the resolved config)
      train_log.jsonl                      the logged metrics, one line per log step
      metrics.json                         the final metrics; written last, atomically ("status": "completed")
      analysis/                            plots and tables of the latent analysis

The trainer writes it; the sweep driver, the report and the benchmark tables read it through
:func:`status`, :func:`load_config` and :func:`load_metrics`, so "is this run finished?" has one answer.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.json"
TRAIN_LOG = "train_log.jsonl"
ANALYSIS = "analysis"
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_MANIFEST = "manifest.json"  # every file of a checkpoint with its size, written last
LOCK = ".lock"  # held (flock) by the process training in the run directory
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
SWEEP_MANIFEST = "sweep.json"  # written by the sweep driver into a sweep directory
STATUSES = ("completed", "incomplete", "failed", "missing")


def checkpoint_name(step: int) -> str:
    return f"step-{step}"


def checkpoints(run_dir: str | Path, complete_only: bool = True) -> list[tuple[int, Path]]:
    """``(step, path)`` of the run's checkpoints, oldest first; ``complete_only``: those whose manifest (or,
    for checkpoints written before manifests, trainer state) exists. Whether the files are intact is
    :func:`checkpoint_problem`'s question."""
    ckpt = Path(run_dir) / CHECKPOINTS
    if not ckpt.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    if complete_only:
        found = [(s, p) for s, p in found if (p / CHECKPOINT_MANIFEST).exists() or (p / TRAINER_STATE).exists()]
    return sorted(found)


def write_checkpoint_manifest(path: Path) -> None:
    """List every file of the checkpoint directory ``path`` with its size (the checkpoint's last file)."""
    from lpc.files import atomic_write_json

    files = {
        str(f.relative_to(path)): f.stat().st_size
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != CHECKPOINT_MANIFEST
    }
    atomic_write_json(path / CHECKPOINT_MANIFEST, {"files": files})


def checkpoint_problem(path: Path) -> str | None:
    """What is wrong with a checkpoint (a missing, truncated or grown file, an unreadable manifest or trainer
    state), or None when it matches its manifest. Sizes, not hashes: a 7B checkpoint is ~100 GB."""
    manifest = path / CHECKPOINT_MANIFEST
    if manifest.exists():
        try:
            files = json.loads(manifest.read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError):
            return f"unreadable {CHECKPOINT_MANIFEST}"
        for rel, size in files.items():
            f = path / rel
            if not f.is_file():
                return f"{rel} is missing"
            if f.stat().st_size != size:
                return f"{rel} has {f.stat().st_size} bytes, the manifest says {size}"
    try:
        state = json.loads((path / TRAINER_STATE).read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {TRAINER_STATE}"
    return None


def checkpoint_fingerprint(run_dir: str | Path) -> str | None:
    """The config fingerprint of the newest intact checkpoint (None: no such checkpoint)."""
    for _, path in reversed(checkpoints(run_dir)):
        if checkpoint_problem(path) is None:
            return json.loads((path / TRAINER_STATE).read_text()).get("fingerprint")
    return None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    done = checkpoints(run_dir)
    return done[-1][1] if done else None


def load_metrics(run_dir: str | Path) -> dict | None:
    """The final metrics, or None when there are none (or they cannot be read)."""
    try:
        metrics = json.loads((Path(run_dir) / METRICS).read_text())
    except (OSError, ValueError):
        return None
    return metrics if isinstance(metrics, dict) else None


def status(run_dir: str | Path) -> str:
    """``completed`` (metrics.json says so), ``incomplete`` (a checkpoint to resume from),
    ``failed`` (neither) or ``missing`` (no such directory)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return "missing"
    metrics = load_metrics(run_dir)
    if metrics is not None and metrics.get("status") == "completed":
        return "completed"
    return "incomplete" if checkpoints(run_dir, complete_only=False) else "failed"


def run_dirs(sweep_dir: str | Path) -> list[Path]:
    """The run directories under a sweep directory (any depth: Hydra's numbered or override-named folders),
    found by what a run writes; submitit's own folders are not runs."""
    sweep_dir = Path(sweep_dir)
    found = {p.parents[1] for p in sweep_dir.glob("**/.hydra/config.yaml")}
    found |= {p.parents[1] for p in sweep_dir.glob(f"**/{FINAL}/lpc_config.yaml")}
    found |= {p.parent for p in sweep_dir.glob(f"**/{METRICS}")}
    return sorted(d for d in found if ".submitit" not in d.parts)


def load_config(run_dir: str | Path):
    """The run's composed config (Hydra's record, else the one exported with the final model), or None."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    for rel in (".hydra/config.yaml", f"{FINAL}/lpc_config.yaml"):
        if (run_dir / rel).exists():
            return OmegaConf.load(run_dir / rel)
    return None


def load_overrides(run_dir: str | Path) -> list[str]:
    """The command-line overrides Hydra recorded for the run (empty when there is no record)."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.exists() else []
