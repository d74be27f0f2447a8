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
from dataclasses import dataclass
from pathlib import Path

from omegaconf import OmegaConf

from lpc.errors import ConfigError
from lpc.evaluation import TASKS_DIR, MissingExtra, require_lm_eval, runs_of
from lpc.evaluation.options import option, options_from, parse_command, usage, wants_help
from lpc.files import atomic_write_text
from lpc.latent import all_inference_modes
from lpc.training.rundir import RunDir

log = logging.getLogger("lpc.evaluation.harness")
PREFIX = "eval."  # lpc-evaluate's options are the training config's eval node: one name for both

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
    """The options of ``lpc-evaluate`` and of the ``eval`` node of the training config (named ``eval.<key>``
    in both)."""

    tasks: list[str] = option([], "lm-eval task names or aliases (local, paper_local, paper); required", sep=",")
    limit: float | None = option(
        None, "examples per task (< 1: a fraction); null: all", "a number > 0", lambda v: v > 0
    )
    batch_size: int = option(8, "requests per forward pass", "an integer >= 1", lambda v: v >= 1)
    num_fewshot: int | None = option(
        None, "few-shot examples; null: each task's own", "an integer >= 0", lambda v: v >= 0
    )
    max_gen_toks: int = option(256, "cap for tasks that do not set their own", "an integer >= 1", lambda v: v >= 1)
    latent_inference: str | None = option(
        None, "z from the prior in this mode; null: the checkpoint's latent.inference", choices=all_inference_modes
    )
    apply_chat_template: bool = option(False, "wrap prompts in the tokenizer's chat template (instruct models)")
    device: str | None = option(None, "null: cuda if available, else cpu")
    dtype: str | None = option(
        None, "null or auto: the checkpoint's", choices=("auto", "float32", "bfloat16", "float16")
    )
    bootstrap_iters: int = option(1000, "lm-eval's stderr bootstrap", "an integer >= 0", lambda v: v >= 0)
    seed: int = option(1234, "every random seed of lm-eval")
    metrics_file: str | None = option(None, "where the metrics are merged; null: the run's metrics.json")


def load_eval_config(node=None) -> EvalConfig:
    """The training config's ``eval`` node as options; a bad key or value raises ConfigError naming it."""
    values = OmegaConf.to_container(node, resolve=True) if OmegaConf.is_config(node) else dict(node or {})
    return expand_tasks(options_from(EvalConfig, values, ConfigError, prefix=PREFIX))


def expand_tasks(cfg: EvalConfig) -> EvalConfig:
    cfg.tasks = parse_tasks(cfg.tasks)
    return cfg


def check_eval_node(node) -> None:
    """Config-time check of the training config's ``eval`` node (before any model loads): option types and
    values, ``*_local`` task names, lm-eval installed. Hub task names are checked when the evaluation starts
    (lm-eval's task index takes ~15 s to build)."""
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


def evaluate_checkpoint(checkpoint, cfg: EvalConfig, model=None, tokenizer=None) -> dict[str, float]:
    """Run lm-eval on ``checkpoint`` (or on an already loaded ``model``/``tokenizer``, e.g. at the end of
    training); merge the metrics into the run's metrics.json and return them."""
    if not cfg.tasks:
        raise ValueError("tasks: give at least one task (e.g. tasks=local)")
    lm_eval = require_lm_eval()
    from lm_eval.utils import handle_non_serializable, make_table

    from lpc.evaluation.lm_eval_model import LPCLM, load_for_eval

    run = RunDir.of(checkpoint)
    model_dir = run.require_model()
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
        run.path / "eval" / "lm_eval_results.json",
        json.dumps(results, indent=2, default=handle_non_serializable) + "\n",
    )
    run.merge_metrics(flat, cfg.metrics_file)
    return flat


def _parse(argv: list[str]) -> tuple[list[Path], EvalConfig]:
    """The runs (each completed run of a sweep directory) and the options; ConfigError or MissingExtra when
    they cannot be evaluated, before any model loads."""
    path, cfg = parse_command(argv, EvalConfig, ConfigError, run="CHECKPOINT", prefix=PREFIX)
    cfg = expand_tasks(cfg)
    if not cfg.tasks:
        raise ConfigError("tasks: give at least one task, e.g. tasks=local (= " + ",".join(TASK_ALIASES["local"]) + ")")
    runs = runs_of(path)
    for checkpoint in runs:
        if not RunDir.of(checkpoint).has_model():
            raise ConfigError(
                f"CHECKPOINT={checkpoint}: not a run directory, a checkpoint or a sweep with completed runs "
                "(no config.json or adapter_config.json)"
            )
    require_lm_eval()
    return runs, cfg


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(name)s: %(message)s")
    if not argv or wants_help(argv):
        print(usage(EvalConfig, __doc__, "lpc-evaluate", run="CHECKPOINT", prefix=PREFIX))
        return 0 if argv else 2
    try:
        runs, cfg = _parse(argv)
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
