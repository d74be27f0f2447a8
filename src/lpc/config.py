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
    "paths",
    "eval",
    "hardware",
    "model.arch",
)  # model.arch: shapes for lpc-plan, not read by training


def _require(cond: bool, key: str, allowed: str, value) -> None:
    if not cond:
        raise ConfigError(f"{key}={value!r} is not allowed: {allowed}")


def _is_number(x) -> bool:
    """A finite int or float (not a bool, NaN or infinity)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def validate(cfg: DictConfig) -> None:
    codebook = cfg.get("codebook")
    _require(
        isinstance(codebook, int) and not isinstance(codebook, bool) and codebook >= 1,
        "codebook",
        "an integer >= 1 (the number of latent codes K)",
        codebook,
    )
    flip = cfg.get("flip")
    _require(
        _is_number(flip) and 0.0 <= flip <= 1.0, "flip", "a number in [0, 1] (fraction of training pairs flipped)", flip
    )
    _require(isinstance(cfg.get("seed"), int), "seed", "an integer", cfg.get("seed"))

    algo = cfg.algo  # any loss object the algo group names (docs/architecture.md: adding a loss)
    if "beta" in algo:
        _require(_is_number(algo.beta) and algo.beta > 0, "algo.beta", "a number > 0", algo.beta)
    if "gamma" in algo:
        _require(_is_number(algo.gamma) and algo.gamma >= 0, "algo.gamma", "a number >= 0", algo.gamma)
    if "tau" in algo:
        _require(_is_number(algo.tau) and algo.tau > 0, "algo.tau", "a number > 0", algo.tau)

    t = cfg.trainer
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
    _require(
        t.get("on_nonfinite", "error") in ("error", "skip_step"),
        "trainer.on_nonfinite",
        "error or skip_step",
        t.get("on_nonfinite"),
    )
    ref_mode = t.get("reference_logps", "on_the_fly")
    _require(ref_mode in ("precompute", "on_the_fly"), "trainer.reference_logps", "precompute or on_the_fly", ref_mode)

    data = cfg.data
    if "train_file" in data or OmegaConf.is_missing(data, "train_file"):  # data=jsonl (??? until given)
        train_file = None if OmegaConf.is_missing(data, "train_file") else data.train_file
        _require(bool(train_file), "data.train_file", "a path to a local .jsonl/.json/.parquet/.csv file", train_file)
    for key in ("train_file", "eval_file"):
        if not OmegaConf.is_missing(data, key) and data.get(key):
            _require(os.path.exists(data[key]), f"data.{key}", "an existing file (no such file)", data[key])
    path = data.get("path")
    if path and (path.startswith((".", "/", "~")) or path.endswith((".jsonl", ".json", ".parquet"))):
        _require(
            os.path.exists(os.path.expanduser(path)),
            "data.path",
            "an existing local file or directory, or a hub dataset name",
            path,
        )
    _build_node(data)  # the data source's own checks (cheap: nothing is loaded until it is called)

    latent = cfg.latent
    known_latents = ("none", "discrete", "continuous")
    _require(latent.get("name") in known_latents, "latent.name", f"one of {known_latents}", latent.get("name"))
    if latent.name != "none":
        _validate_latent(latent)

    if cfg.get("eval") is not None and cfg.eval.get("tasks"):
        from lpc.evaluation.harness import check_eval_node

        check_eval_node(cfg.eval)  # options, local task names, lm-eval installed


def _validate_latent(latent_cfg) -> None:
    """The latent module's constructor is the one place its options are checked: build it on the meta
    device (no memory, no weights) with a stand-in hidden size, and turn its complaint into a ConfigError."""
    import torch

    with torch.device("meta"):
        _build_node(latent_cfg, hidden_size=8)


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
    for dotted in NON_FINGERPRINT_KEYS:
        node, *rest = dotted.split(".")
        if not rest:
            plain.pop(node, None)
        elif isinstance(plain.get(node), dict):
            plain[node].pop(rest[0], None)
    return hashlib.sha256(json.dumps(plain, sort_keys=True, default=str).encode()).hexdigest()[:16]
