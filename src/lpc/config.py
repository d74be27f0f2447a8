"""Checks on the composed config that run before any model or data is loaded.

Unknown config-group options (``model=foo``, ``algo=bar``) are rejected by Hydra
itself at composition time with the list of available options; everything
below catches values that compose fine but make no sense.
"""

from __future__ import annotations

import hashlib
import json
import math
import os

from omegaconf import DictConfig, OmegaConf

from lpc.conf import check_codebook
from lpc.errors import ConfigError  # noqa: F401  (re-exported: lpc.config.ConfigError)
from lpc.training.distributed import gradient_accumulation, process_count

# Keys that do not change what a run computes: a resumed run may differ in these.
NON_FINGERPRINT_KEYS = (
    "logger",
    "trainer.resume",
    "trainer.log_every",
    "trainer.eval_every",
    "trainer.save_every",
    "trainer.keep_checkpoints",
    "trainer.allow_misfit",
    "paths",
    "eval",
    "hardware",
    "model.arch",
    "adapter.merged_export",
)  # model.arch: shapes for lpc-plan, not read by training; adapter.merged_export: one more file at the end


def _require(cond: bool, key: str, allowed: str, value) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _is_number(x) -> bool:
    """A finite int or float (not a bool, NaN or infinity)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate(cfg: DictConfig) -> None:
    """Every config group's checks, each next to what it checks; the first problem raises ``ConfigError``."""
    _validate_top_level(cfg)
    check_codebook(cfg.latent)  # the codebook group's (lpc.conf): lpc-sweep checks each job with it too
    _validate_algo(cfg.algo)
    _validate_trainer(cfg.trainer)
    _validate_data(cfg.data)
    _validate_model(cfg.model)
    _validate_latent(cfg.latent)

    import lpc.adapters as adapters

    try:
        adapters.check(cfg)  # QLoRA on CPU is refused here, before any model loads
    except ValueError as err:
        raise ConfigError(str(err)) from None

    if cfg.get("eval") is not None and cfg.eval.get("tasks"):
        from lpc.evaluation.harness import check_eval_node

        check_eval_node(cfg.eval)  # options, local task names, lm-eval installed


def _validate_top_level(cfg) -> None:
    flip = cfg.get("flip")
    _require(
        _is_number(flip) and 0.0 <= flip <= 1.0, "flip", "a number in [0, 1] (fraction of training pairs flipped)", flip
    )
    _require(isinstance(cfg.get("seed"), int), "seed", "an integer", cfg.get("seed"))


def _validate_algo(algo) -> None:
    """Any loss object the algo group names (docs/architecture.md: adding a loss), by the keys it has."""
    if "beta" in algo:
        _require(_is_number(algo.beta) and algo.beta > 0, "algo.beta", "a number > 0", algo.beta)
    if "gamma" in algo:
        _require(_is_number(algo.gamma) and algo.gamma >= 0, "algo.gamma", "a number >= 0", algo.gamma)
    if "tau" in algo:
        _require(_is_number(algo.tau) and algo.tau > 0, "algo.tau", "a number > 0", algo.tau)


def _validate_trainer(t) -> None:
    _check_numbers(t)
    _require(isinstance(t.max_length, int) and t.max_length >= 2, "trainer.max_length", "an integer >= 2", t.max_length)
    _require(
        isinstance(t.max_prompt_length, int) and 1 <= t.max_prompt_length < t.max_length,
        "trainer.max_prompt_length",
        f"an integer in [1, trainer.max_length={t.max_length})",
        t.max_prompt_length,
    )
    for key in ("batch_size", "eval_batch_size", "log_every"):
        _require(isinstance(t[key], int) and t[key] >= 1, f"trainer.{key}", "an integer >= 1", t[key])
    gradient_accumulation(t, process_count())  # derived from trainer.global_batch_size, if set
    _require(_is_number(t.lr) and t.lr > 0, "trainer.lr", "a number > 0", t.lr)
    _require(t.max_steps > 0 or t.epochs > 0, "trainer.max_steps", "> 0, or trainer.epochs > 0", t.max_steps)
    _require(t.precision in ("no", "bf16", "fp16"), "trainer.precision", "one of no, bf16, fp16", t.precision)
    schedulers = _scheduler_names()
    _require(t.lr_scheduler in schedulers, "trainer.lr_scheduler", f"one of {schedulers}", t.lr_scheduler)
    _require(
        t.get("on_nonfinite", "error") in ("error", "skip_step"),
        "trainer.on_nonfinite",
        "error or skip_step",
        t.get("on_nonfinite"),
    )
    misfit = t.get("allow_misfit", False)
    _require(isinstance(misfit, bool), "trainer.allow_misfit", "true or false", misfit)
    ref_mode = t.get("reference_logps", "on_the_fly")
    _require(ref_mode in ("precompute", "on_the_fly"), "trainer.reference_logps", "precompute or on_the_fly", ref_mode)


def _validate_data(data) -> None:
    if "train_file" in data or OmegaConf.is_missing(data, "train_file"):  # data=jsonl (??? until given)
        train_file = None if OmegaConf.is_missing(data, "train_file") else data.train_file
        _require(bool(train_file), "data.train_file", "a path to a local .jsonl/.json/.parquet/.csv file", train_file)
    for key in ("train_file", "eval_file"):
        if not OmegaConf.is_missing(data, key) and data.get(key):
            path = os.path.expanduser(str(data[key]))
            problem = "a directory" if os.path.isdir(path) else "no such file"
            _require(
                os.path.isfile(path),
                f"data.{key}",
                f"an existing .jsonl/.json/.parquet/.csv file ({problem})",
                data[key],
            )
    path = data.get("path")
    if path and (path.startswith((".", "/", "~")) or path.endswith((".jsonl", ".json", ".parquet"))):
        _require(
            os.path.exists(os.path.expanduser(path)),
            "data.path",
            "an existing local file or directory, or a hub dataset name",
            path,
        )
    _build_node(data)  # the data source's own checks (cheap: nothing is loaded until it is called)


def _validate_model(model) -> None:
    cache_dir = model.get("cache_dir")
    if cache_dir:
        _require(
            not os.path.exists(os.path.expanduser(str(cache_dir))) or os.path.isdir(os.path.expanduser(str(cache_dir))),
            "model.cache_dir",
            "a directory (created if missing) for converted models and tokenizers; this is a file",
            cache_dir,
        )


# Numeric trainer keys: (integer?, condition, what is allowed). A string such as ``abc`` gets this message
# instead of a comparison's TypeError; the relations between keys are checked in ``validate``.
TRAINER_NUMBERS = {
    "max_steps": (True, lambda v: True, "an integer (> 0: that many steps; <= 0: trainer.epochs decides)"),
    "epochs": (True, lambda v: v >= 0, "an integer >= 0"),
    "lr": (False, lambda v: v > 0, "a number > 0"),
    "warmup_steps": (True, lambda v: v >= -1, "an integer >= 0, or -1 to use trainer.warmup_ratio"),
    "warmup_ratio": (False, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "max_grad_norm": (False, lambda v: v > 0, "a number > 0"),
    "eval_every": (True, lambda v: v >= 0, "an integer >= 0 (0: evaluate only at the end)"),
    "save_every": (True, lambda v: v >= 0, "an integer >= 0 (0: only the final checkpoint and one on a stop signal)"),
    "keep_checkpoints": (True, lambda v: v >= 1, "an integer >= 1"),
}


def _check_numbers(t) -> None:
    for key, (integer, ok, allowed) in TRAINER_NUMBERS.items():
        if key in t and t[key] is not None:
            _require(_is_number(t[key]) and (not integer or isinstance(t[key], int)) and ok(t[key]),
                     f"trainer.{key}", allowed, t[key])  # fmt: skip


def _scheduler_names() -> tuple[str, ...]:
    """The names ``transformers.get_scheduler`` accepts (what ``trainer.lr_scheduler`` is passed to)."""
    from transformers import SchedulerType

    return tuple(s.value for s in SchedulerType)


def _validate_latent(latent) -> None:
    """The latent module's constructor is the one place its options are checked: build it on the meta
    device (no memory, no weights) with a stand-in hidden size, and turn its complaint into a ConfigError."""
    known_latents = ("none", "discrete", "continuous")
    _require(latent.get("name") in known_latents, "latent.name", f"one of {known_latents}", latent.get("name"))
    if latent.name == "none":
        return
    import torch

    with torch.device("meta"):
        _build_node(latent, hidden_size=8)


def _build_node(node, **kwargs):
    """Instantiate a config node whose constructor is its one validation, turning its complaint into a
    ConfigError (Hydra wraps the constructor's exception: report the innermost message)."""
    from hydra.utils import instantiate

    try:
        return instantiate(node, **kwargs)
    except Exception as err:  # noqa: BLE001
        cause = err
        while cause.__cause__ is not None:
            cause = cause.__cause__
        raise ConfigError(str(cause)) from None


def fingerprint(cfg: DictConfig) -> str:
    """A hash of what determines a run's result, stored in its checkpoints so a run directory is never
    resumed under a different configuration."""
    plain = OmegaConf.to_container(cfg, resolve=True)
    if (plain.get("adapter") or {}).get("name", "none") == "none":
        plain.pop("adapter", None)  # no adapter: the fingerprint of runs from before the adapter group existed
    for dotted in NON_FINGERPRINT_KEYS:
        node, *rest = dotted.split(".")
        if not rest:
            plain.pop(node, None)
        elif isinstance(plain.get(node), dict):
            plain[node].pop(rest[0], None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]
