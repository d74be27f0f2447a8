"""A run directory, read and written in one place: its layout, its checkpoints, its status, its config.

    RUN/
      .hydra/config.yaml, overrides.yaml   the composed config and the command-line overrides (Hydra)
      checkpoints/step-N/                  accelerate state, trainer_state.json (step, config fingerprint, train
                                           log length) and manifest.json (every file and its size, written
                                           last); written in a temp dir, then renamed
      final/                               the exported model (lpc_config.yaml: the resolved config)
      train_log.jsonl                      the logged metrics, one line per log step
      metrics.json                         the final metrics; written last, atomically ("status": "completed")
      analysis/                            plots and tables: the latent analysis, LM integrity, lpc-steer

:class:`RunDir` is one run: the trainer writes it, every post-training command (lpc-generate, lpc-evaluate,
lpc-export, lpc-steer) and ``LPCPolicy.from_pretrained`` find it with :meth:`RunDir.of` ("a run directory,
its final/ or a checkpoint directory", resolved here only), and the sweep driver, the report and the benchmark
tables read it through :func:`status`, :func:`load_config` and :func:`load_metrics`, so "is this run
finished?" has one answer. Every file it writes is written atomically (:mod:`lpc.files`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from lpc.files import atomic_write_json, atomic_write_text

CHECKPOINTS = "checkpoints"
FINAL = "final"
METRICS = "metrics.json"
TRAIN_LOG = "train_log.jsonl"
ANALYSIS = "analysis"
RUN_CONFIG = "lpc_config.yaml"  # in final/: the run's resolved config, exported with the model
TRAINER_STATE = "trainer_state.json"
CHECKPOINT_MANIFEST = "manifest.json"  # every file of a checkpoint with its size, written last
LOCK = ".lock"  # held (flock) by the process training in the run directory
CHECKPOINT_RE = re.compile(r"^step-(\d+)$")
SWEEP_MANIFEST = "sweep.json"  # written by the sweep driver into a sweep directory
STATUSES = COMPLETED, INCOMPLETE, FAILED, MISSING = ("completed", "incomplete", "failed", "missing")  # status()
MODEL_FILES = ("config.json", "adapter_config.json")  # an exported model holds one: a full LM or an adapter


def checkpoint_name(step: int) -> str:
    return f"step-{step}"


def checkpoints(run_dir: str | Path, complete_only: bool = False) -> list[tuple[int, Path]]:
    """``(step, path)`` of the run's checkpoints, oldest first; ``complete_only``: those whose manifest (the
    last file a checkpoint gets) exists. Whether the files are intact is :func:`checkpoint_problem`'s question:
    resuming asks it of each, newest first, and names the broken ones."""
    ckpt = Path(run_dir) / CHECKPOINTS
    if not ckpt.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in ckpt.iterdir() if (m := CHECKPOINT_RE.match(p.name))]
    if complete_only:
        found = [(s, p) for s, p in found if (p / CHECKPOINT_MANIFEST).exists()]
    return sorted(found)


def write_checkpoint_manifest(path: Path) -> None:
    """List every file of the checkpoint directory ``path`` with its size (the checkpoint's last file)."""
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
    if not manifest.exists():
        return f"no {CHECKPOINT_MANIFEST} (the checkpoint was not finished)"
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
        int(state["step"]), state["fingerprint"], int(state["log_lines"])
    except (OSError, ValueError, KeyError, TypeError):
        return f"unreadable {TRAINER_STATE}"
    return None


def checkpoint_fingerprint(run_dir: str | Path) -> str | None:
    """The config fingerprint of the newest intact checkpoint (None: no such checkpoint)."""
    for _, path in reversed(checkpoints(run_dir)):
        if checkpoint_problem(path) is None:
            return json.loads((path / TRAINER_STATE).read_text())["fingerprint"]
    return None


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    done = checkpoints(run_dir, complete_only=True)
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
        return MISSING
    metrics = load_metrics(run_dir)
    if metrics is not None and metrics.get("status") == COMPLETED:
        return COMPLETED
    return INCOMPLETE if checkpoints(run_dir) else FAILED


def run_dirs(sweep_dir: str | Path) -> list[Path]:
    """The run directories under a sweep directory (any depth: Hydra's numbered or override-named folders),
    found by what a run writes; submitit's own folders are not runs."""
    sweep_dir = Path(sweep_dir)
    found = {p.parents[1] for p in sweep_dir.glob("**/.hydra/config.yaml")}
    found |= {p.parents[1] for p in sweep_dir.glob(f"**/{FINAL}/{RUN_CONFIG}")}
    found |= {p.parent for p in sweep_dir.glob(f"**/{METRICS}")}
    return sorted(d for d in found if ".submitit" not in d.parts)


def load_config(run_dir: str | Path):
    """The run's composed config (Hydra's record, else the one exported with the final model, in final/ or in
    a checkpoint directory itself), or None."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    for rel in (".hydra/config.yaml", f"{FINAL}/{RUN_CONFIG}", RUN_CONFIG):
        if (run_dir / rel).exists():
            return OmegaConf.load(run_dir / rel)
    return None


def load_overrides(run_dir: str | Path) -> list[str]:
    """The command-line overrides Hydra recorded for the run (empty when there is no record)."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / ".hydra" / "overrides.yaml"
    return [str(o) for o in OmegaConf.load(path)] if path.exists() else []


def is_model_dir(path: str | Path) -> bool:
    """Whether ``path`` holds an exported model (a run's final/, a saved or downloaded policy)."""
    return any((Path(path) / name).exists() for name in MODEL_FILES)


@dataclass(frozen=True)
class RunDir:
    """One run directory: ``path`` and where its exported model is (``model_dir``: its ``final/``, or ``path``
    itself for a checkpoint directory that is no run, such as a saved policy). Built by :meth:`of`."""

    path: Path
    model_dir: Path

    @classmethod
    def at(cls, path: str | Path) -> RunDir:
        """The run directory ``path`` itself, finished or not (the one a training writes)."""
        return cls(Path(path), Path(path) / FINAL)

    @classmethod
    def of(cls, path: str | Path) -> RunDir:
        """The run ``path`` names: a run directory, its ``final/``, or a checkpoint directory (a model's files
        without a run around them: the answers of a command are then written beside them)."""
        path = Path(path).expanduser()
        if (path / FINAL).is_dir():
            return cls(path, path / FINAL)
        if path.name == FINAL:
            return cls(path.parent, path)
        return cls(path, path)

    # ---------------------------------------------------------------- layout
    final = property(lambda self: self.path / FINAL, doc="The exported model (final/).")
    metrics_path = property(lambda self: self.path / METRICS, doc="The final metrics (metrics.json).")
    analysis = property(
        lambda self: self.path / ANALYSIS, doc="Plots and tables: latent analysis, LM integrity, steering."
    )
    checkpoints_dir = property(lambda self: self.path / CHECKPOINTS, doc="The checkpoints (checkpoints/step-N).")
    name = property(lambda self: self.path.name, doc="The run's name: its directory's.")

    # ---------------------------------------------------------------- the model
    def has_model(self) -> bool:
        return is_model_dir(self.model_dir)

    def require_model(self) -> Path:
        """``model_dir``, or FileNotFoundError naming the path and what a command accepts."""
        if not self.has_model():
            raise FileNotFoundError(
                f"{self.path} is not a checkpoint (no {' or '.join(MODEL_FILES)}): pass a run directory, its "
                f"{FINAL}/ folder or a checkpoint directory"
            )
        return self.model_dir

    # ---------------------------------------------------------------- state
    def status(self) -> str:
        return status(self.path)

    def load_metrics(self) -> dict | None:
        return load_metrics(self.path)

    def write_metrics(self, metrics: dict) -> None:
        """metrics.json, atomically: its ``"status": "completed"`` (:data:`COMPLETED`) marks the run finished."""
        atomic_write_json(self.metrics_path, metrics)

    def merge_metrics(self, new: dict, path: str | Path | None = None) -> dict:
        """Add ``new`` to metrics.json (or to ``path``), keeping its other keys; written atomically."""
        path = Path(path) if path is not None else self.metrics_path
        old = json.loads(path.read_text()) if path.exists() else {}
        old.update(new)
        atomic_write_json(path, old)
        return old

    def write_analysis(self, name: str, content: str | dict) -> Path:
        """``analysis/<name>``: text, or a dict as JSON; atomically."""
        path = self.analysis / name
        (atomic_write_json if isinstance(content, dict) else atomic_write_text)(path, content)
        return path

    def load_config(self):
        return load_config(self.path)

    def checkpoints(self, complete_only: bool = False) -> list[tuple[int, Path]]:
        return checkpoints(self.path, complete_only)

    def latest_checkpoint(self) -> Path | None:
        return latest_checkpoint(self.path)


def sweep_group() -> str | None:
    """The W&B group of a run launched with -m: the sweep directory's name (None for a single run)."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return None
    return Path(HydraConfig.get().sweep.dir).name


def run_name(run_dir: Path) -> str:
    """A run's W&B name: in a sweep, the job's own overrides (``algo=dpo,codebook=8``), not its number."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        return HydraConfig.get().job.override_dirname or run_dir.name
    return run_dir.name
