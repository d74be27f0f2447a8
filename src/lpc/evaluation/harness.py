"""Benchmark a trained checkpoint with lm-evaluation-harness and merge the results into the run's metrics.json.

    lpc-evaluate CHECKPOINT tasks=arc_challenge_local,arc_easy_local,gsm8k_local,truthfulqa_local [limit=N]
    lpc-evaluate outputs/runs/.../my_run tasks=paper batch_size=16        # hub tasks (cluster)

CHECKPOINT is a run directory (its ``final/`` is loaded), a checkpoint directory, or a sweep directory (every
completed run in it, each into its own metrics.json; then ``lpc-report SWEEP`` tables them). LPC checkpoints run the
LPC-conditioned policy (z from the prior; see ``lpc.evaluation.lm_eval_model``). Every numeric metric lands in
the run's ``metrics.json`` as ``lm_eval/<task>/<metric>`` (``.../<metric>/<filter>`` for filtered metrics
such as GSM8K's), plus ``lm_eval/<task>/n_samples``; existing keys are kept. The paper's headline metric of
each task family is also written without a filter suffix (e.g. ``lm_eval/gsm8k/exact_match`` = strict-match).
The full lm-eval output goes to ``<run>/eval/lm_eval_results.json``.
"""

from __future__ import annotations

import json
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from omegaconf import OmegaConf

from lpc.evaluation import TASKS_DIR, is_option, require_lm_eval
from lpc.files import atomic_write_json, atomic_write_text

log = logging.getLogger("lpc.evaluation.harness")

# The paper's metric per task family (arXiv 2505.04993 and its rebuttal): "metric,filter" in lm-eval's naming.
PAPER_METRICS = {
    "arc_challenge": "acc,none",
    "arc_easy": "acc,none",
    "gsm8k": "exact_match,strict-match",
    "truthfulqa_gen": "bleu_acc,none",
    "truthfulqa": "bleu_acc,none",  # truthfulqa_local
    "mmlu": "acc,none",
}
TASK_ALIASES = {
    "paper": ["arc_challenge", "arc_easy", "gsm8k", "truthfulqa_gen", "mmlu"],
    "paper_local": ["arc_challenge_local", "arc_easy_local", "gsm8k_local", "truthfulqa_local", "mmlu_local"],
    "local": ["arc_challenge_local", "arc_easy_local", "gsm8k_local", "truthfulqa_local", "mmlu_local"],
}


@dataclass
class EvalConfig:
    """The options of ``lpc-evaluate`` and of the ``eval`` node of the training config."""

    tasks: Any = field(default_factory=list)  # list or comma-separated names; aliases: paper, paper_local, local
    limit: Optional[float] = None  # examples per task (< 1: a fraction); null = all
    batch_size: int = 8
    num_fewshot: Optional[int] = None  # null: each task's own default
    max_gen_toks: int = 256  # cap for tasks that do not set their own
    latent_inference: Optional[str] = None  # null: the checkpoint's latent.inference (expectation by default)
    apply_chat_template: bool = False  # wrap prompts in the tokenizer's chat template (instruct models)
    device: Optional[str] = None  # null: cuda if available, else cpu
    dtype: Optional[str] = None  # null/auto: the checkpoint's; float32 | bfloat16 | float16
    bootstrap_iters: int = 1000  # lm-eval's stderr bootstrap for non-mean aggregations
    seed: int = 1234
    metrics_file: Optional[str] = None  # null: the run's metrics.json


def load_eval_config(node=None, dotlist: list[str] | None = None) -> EvalConfig:
    """Merge a config node and/or ``key=value`` strings onto the defaults; bad keys/values raise ConfigError."""
    from omegaconf.errors import OmegaConfBaseException

    from lpc.errors import ConfigError

    try:
        merged = OmegaConf.merge(
            OmegaConf.structured(EvalConfig),
            node if node is not None else {},
            OmegaConf.from_dotlist(list(dotlist or [])),
        )
    except OmegaConfBaseException as err:
        key = getattr(err, "full_key", None) or "?"
        raise ConfigError(
            f"eval option {key!r}: {str(err).splitlines()[0]} "
            f"(allowed keys: {', '.join(EvalConfig.__dataclass_fields__)})"
        ) from None
    cfg = EvalConfig(**OmegaConf.to_container(merged))
    cfg.tasks = parse_tasks(cfg.tasks)
    checks = [
        (cfg.limit is None or cfg.limit > 0, "limit", "a number > 0 (< 1: a fraction of each task) or null"),
        (cfg.batch_size >= 1, "batch_size", "an integer >= 1"),
        (cfg.num_fewshot is None or cfg.num_fewshot >= 0, "num_fewshot", "an integer >= 0 or null"),
        (cfg.max_gen_toks >= 1, "max_gen_toks", "an integer >= 1"),
        (cfg.dtype in (None, "auto", "float32", "bfloat16", "float16"), "dtype", "auto, float32, bfloat16 or float16"),
        (
            cfg.latent_inference in (None, "expectation", "argmax", "sample", "mean"),
            "latent_inference",
            "expectation | argmax | sample (discrete), mean | sample (continuous), or null",
        ),
    ]
    for ok, key, allowed in checks:
        if not ok:
            raise ConfigError(f"eval.{key}={getattr(cfg, key)!r} is not allowed: {allowed}")
    return cfg


def check_eval_node(node) -> None:
    """Config-time check of the training config's ``eval`` node (before any model loads): option types and
    values, ``*_local`` task names, lm-eval installed. Hub task names are checked when the evaluation starts
    (lm-eval's task index takes ~15 s to build)."""
    from lpc.errors import ConfigError
    from lpc.evaluation import MissingExtra

    cfg = load_eval_config(node)
    bad = [t for t in cfg.tasks if t.endswith("_local") and t not in local_task_names()]
    if bad:
        raise ConfigError(f"eval.tasks={bad} is not allowed: the local tasks are {sorted(local_task_names())}")
    try:
        require_lm_eval()
    except MissingExtra as err:
        raise ConfigError(f"eval.tasks is set but {err}") from None


def parse_tasks(tasks) -> list[str]:
    names = tasks.split(",") if isinstance(tasks, str) else list(tasks or [])
    out = []
    for name in (n.strip() for n in names):
        for t in TASK_ALIASES.get(name, [name] if name else []):
            if t not in out:
                out.append(t)
    return out


def local_task_names() -> set[str]:
    return {p.stem for p in TASKS_DIR.glob("*.yaml")} | {"lpc_local"}


def task_manager(tasks: list[str]):
    """Our local tasks always; lm-eval's built-in index (slow to build: ~15 s) only when a task needs it."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    need_hub = any(t not in local_task_names() for t in tasks)
    tm = TaskManager(include_path=str(TASKS_DIR), include_defaults=need_hub)
    unknown = [t for t in tasks if t not in tm.all_tasks]
    if unknown:
        from lpc.errors import ConfigError

        raise ConfigError(
            f"tasks: unknown lm-eval task(s) {unknown}; local tasks: {sorted(local_task_names())}, "
            f"aliases: {sorted(TASK_ALIASES)}, or any lm-eval task name"
        )
    return tm


def flatten_results(results: dict) -> dict[str, float]:
    """lm-eval's results -> ``{"lm_eval/<task>/<metric>[/<filter>]": value}`` for the top-level tasks/groups
    (a group's subtasks are left out), plus the paper's headline metric and ``n_samples`` per task."""
    subtasks = {s for subs in results.get("group_subtasks", {}).values() for s in subs}
    out = {}
    for task, res in results["results"].items():
        if task in subtasks:
            continue
        for key, value in res.items():
            if "," not in key or "_stderr" in key or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, filt = key.split(",", 1)
            out[f"lm_eval/{task}/{metric}" + ("" if filt == "none" else f"/{filt}")] = float(value)
        headline = PAPER_METRICS.get(task.removesuffix("_local"))
        if headline and isinstance(res.get(headline), (int, float)):
            out[f"lm_eval/{task}/{headline.split(',')[0]}"] = float(res[headline])
        n = results.get("n-samples", {}).get(task, {}).get("effective")
        if n is not None:
            out[f"lm_eval/{task}/n_samples"] = int(n)
    return out


def paper_metrics(flat: dict[str, float]) -> dict[str, float]:
    """The subset of ``flat`` that the paper reports (one number per task family)."""
    keep = {}
    for key, value in flat.items():
        _, task, *rest = key.split("/")
        headline = PAPER_METRICS.get(task.removesuffix("_local"))
        if headline and rest == [headline.split(",")[0]]:
            keep[key] = value
    return keep


def run_dir_of(checkpoint: Path) -> tuple[Path, Path]:
    """``(run_dir, model_dir)`` for a run directory, its ``final/``, or a bare checkpoint directory."""
    checkpoint = Path(checkpoint)
    if (checkpoint / "final").is_dir():
        return checkpoint, checkpoint / "final"
    if checkpoint.name == "final":
        return checkpoint.parent, checkpoint
    return checkpoint, checkpoint


def merge_metrics(path: Path, new: dict) -> dict:
    """Add ``new`` to the JSON object at ``path`` (kept keys stay), written atomically."""
    old = json.loads(path.read_text()) if path.exists() else {}
    old.update(new)
    atomic_write_json(path, old)
    return old


def evaluate_checkpoint(checkpoint, cfg: EvalConfig, model=None, tokenizer=None) -> dict[str, float]:
    """Run lm-eval on ``checkpoint`` (or on an already loaded ``model``/``tokenizer``, e.g. at the end of
    training); merge the metrics into the run's metrics.json and return them."""
    if not cfg.tasks:
        raise ValueError("tasks: give at least one task (e.g. tasks=local)")
    lm_eval = require_lm_eval()
    from lm_eval.utils import handle_non_serializable, make_table

    from lpc.evaluation.lm_eval_model import LPCLM, load_for_eval

    run_dir, model_dir = run_dir_of(checkpoint)
    tm = task_manager(cfg.tasks)  # before loading the model: unknown tasks fail fast
    if model is None:
        model, tokenizer, _ = load_for_eval(model_dir, cfg.device, cfg.dtype)
    model.eval()
    lm = LPCLM(
        model,
        tokenizer,
        checkpoint=str(model_dir),
        batch_size=cfg.batch_size,
        max_gen_toks=cfg.max_gen_toks,
        latent_inference=cfg.latent_inference,
    )
    log.info(
        "lm-eval %s on %s (%s): tasks %s, limit %s",
        lm_eval.__version__ if hasattr(lm_eval, "__version__") else "",
        model_dir,
        "LPC, z from the prior" if model.latent is not None else "baseline",
        cfg.tasks,
        cfg.limit,
    )
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=cfg.tasks,
        num_fewshot=cfg.num_fewshot,
        limit=cfg.limit,
        task_manager=tm,
        log_samples=False,
        bootstrap_iters=cfg.bootstrap_iters,
        apply_chat_template=cfg.apply_chat_template,
        random_seed=cfg.seed,
        numpy_random_seed=cfg.seed,
        torch_random_seed=cfg.seed,
        fewshot_random_seed=cfg.seed,
    )
    print(make_table(results))
    flat = flatten_results(results)
    atomic_write_text(
        run_dir / "eval" / "lm_eval_results.json", json.dumps(results, indent=2, default=handle_non_serializable) + "\n"
    )
    merge_metrics(Path(cfg.metrics_file) if cfg.metrics_file else run_dir / "metrics.json", flat)
    return flat


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help") or is_option(argv[0]):
        print(__doc__.strip() + "\n\noptions (key=value): " + ", ".join(EvalConfig.__dataclass_fields__))
        return 0 if argv and argv[0] in ("-h", "--help") else 2
    from lpc.errors import ConfigError
    from lpc.evaluation import MissingExtra, runs_of

    runs, options = runs_of(argv[0]), argv[1:]
    try:
        cfg = load_eval_config(dotlist=options)
        if not cfg.tasks:
            raise ConfigError(
                "tasks: give at least one task, e.g. tasks=local (= " + ",".join(TASK_ALIASES["local"]) + ")"
            )
        from lpc.training.checkpoint import is_checkpoint

        for checkpoint in runs:
            if not is_checkpoint(run_dir_of(checkpoint)[1]):
                raise ConfigError(
                    f"CHECKPOINT={checkpoint}: not a run directory, a checkpoint or a sweep with completed runs "
                    "(no config.json or adapter_config.json)"
                )
        require_lm_eval()
    except (ConfigError, MissingExtra) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for checkpoint in runs:  # a sweep directory: every completed run, each into its own metrics.json
        try:
            flat = evaluate_checkpoint(checkpoint, cfg)
        except (ConfigError, MissingExtra) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        if len(runs) > 1:
            print(f"# {checkpoint}")
        for key, value in sorted(paper_metrics(flat).items()):
            print(f"{key}={value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
