"""The report of every experiment: ``lpc-report SWEEP_DIR`` (lpc-sweep runs it after the runs).

Reads every run's config (``.hydra/config.yaml``, else ``final/lpc_config.yaml``) and ``metrics.json``, and the
experiment's ``sweep`` node from them (lpc.experiments.spec; the grid of a plain ``lpc-train -m`` sweep is
inferred). ``sweep.report.layout`` chooses the tables, written atomically into SWEEP_DIR:

- ``grid`` (the paper's experiments): the runs grouped by their grid values without the seed, mean, sample std
  and n over seeds; ``report.md`` has one table per metric, rows = grid keys, columns = ``sweep.report.columns``
  (e.g. w/o | w/ LPC), the paper's published number beside ours (``sweep.report.paper``); ``report.csv`` the
  same cells, one line per (metric, row, column); ``codebook.png`` / ``flip.png`` when the experiment has that
  curve;
- ``settings`` (the synthetic benchmark): one table per data setting read from the runs' configs, one row per
  method, the 95% t interval over seeds, the paired difference to the algorithm without a latent and the
  latent's diagnostics, then the type-steered generation of the runs lpc-steer analysed
  (lpc.experiments.synthetic); ``report.json`` holds every per-seed value.

Both end with the runs whose latent did not act or whose LM was damaged, and the runs that are missing (in the
grid, no run dir), incomplete (no completed metrics.json but a checkpoint to resume from) or failed (neither),
with the last lines of their log.
"""

from __future__ import annotations

import argparse
import csv
import io
import itertools
import json
import sys
from pathlib import Path

import yaml
from omegaconf import OmegaConf

from lpc.errors import ConfigError
from lpc.experiments import spec as experiment_spec
from lpc.experiments import synthetic
from lpc.files import atomic_save_figure, atomic_write_json, atomic_write_text
from lpc.stats import summarize
from lpc.training import rundir

LOG_TAIL = 8
LAYOUTS = ("grid", "settings")

# metric name -> (label, metrics.json keys in order of preference, factor to %)
METRICS = {
    "pref_accuracy": ("Preference accuracy (%)", ["eval/pref_accuracy"], 100.0),
    "arc_challenge": ("ARC-Challenge acc (%)", ["lm_eval/arc_challenge/acc", "lm_eval/arc_challenge_local/acc"], 100.0),
    "arc_easy": ("ARC-Easy acc (%)", ["lm_eval/arc_easy/acc", "lm_eval/arc_easy_local/acc"], 100.0),
    "gsm8k": ("GSM8K exact_match (%)", ["lm_eval/gsm8k/exact_match", "lm_eval/gsm8k_local/exact_match"], 100.0),
    "truthfulqa": (
        "TruthfulQA bleu_acc (%)",
        ["lm_eval/truthfulqa_gen/bleu_acc", "lm_eval/truthfulqa_local/bleu_acc"],
        100.0,
    ),
    "mmlu": ("MMLU acc (%)", ["lm_eval/mmlu/acc", "lm_eval/mmlu_local/acc"], 100.0),
    # per annotator type of the synthetic data (the mixed-preference experiment's two directions at scale=cpu)
    "pref_accuracy_type_0": ("Preference accuracy, annotator type 0 (%)", ["eval/pref_accuracy/type_0"], 100.0),
    "pref_accuracy_type_1": ("Preference accuracy, annotator type 1 (%)", ["eval/pref_accuracy/type_1"], 100.0),
    # did the latent act? (lpc.evaluation.analysis.latent_diagnostics; LPC runs only)
    "pref_accuracy_z_shuffled": (
        "Preference accuracy with z shuffled across prompts (%)",
        ["eval/pref_accuracy/z_shuffled"],
        100.0,
    ),
    "decisions_changed": ("Decisions flipped by z = 0 (%)", ["eval/latent/decisions_changed"], 100.0),
    "codes_used": ("Codes used by the prior's argmax (of K)", ["eval/codes_used"], 1.0),
    "code_perplexity": ("Code perplexity (effective number of codes)", ["eval/code_perplexity"], 1.0),
    # per labelling rating of UltraFeedback mixed-preference pairs (data.rating=mixed)
    **{
        f"pref_accuracy_rating_{r}": (
            f"Preference accuracy, pairs labelled by {r} (%)",
            [f"eval/pref_accuracy/rating_{r}"],
            100.0,
        )
        for r in ("helpfulness", "honesty", "truthfulness", "instruction_following")
    },
}
COLUMN_LABELS = {"latent": {"none": "w/o LPC", "discrete": "w/ LPC", "continuous": "LPC (continuous)"}}


# ---------------------------------------------------------------------------- reading runs
def value_str(value) -> str:
    """A config value as the grid writes it (``dpo``, ``0.1``, ``[helpfulness,honesty]``)."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(value_str(v) for v in value) + "]"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def grid_value(cfg, key: str) -> str:
    """A run's value of grid key ``key``: a config group's option name (model=tiny) or a plain value."""
    node = OmegaConf.select(cfg, key)
    if OmegaConf.is_dict(node):
        return str(node.get("name"))
    if OmegaConf.is_list(node):
        node = OmegaConf.to_container(node, resolve=True)
    return value_str(node)


def log_tail(run_dir: Path, n: int = LOG_TAIL) -> list[str]:
    logs = sorted(run_dir.glob("*.log"), key=lambda p: p.stat().st_mtime)
    if not logs:
        return []
    lines = logs[-1].read_text(errors="replace").splitlines()
    return [ln[-300:] for ln in lines[-n:]]


def inferred_spec(sweep_dir: Path, runs: list[dict]) -> dict | None:
    """The grid of a plain ``python src/train.py -m key=a,b ...`` sweep (no experiment config): the
    command-line keys (each run's ``.hydra/overrides.yaml``) whose values differ between runs, with
    their values read from the runs' configs; ``latent`` becomes the columns when it varies."""
    runs = [r for r in runs if r["cfg"] is not None]
    if not runs:
        return None
    keys: list[str] = []
    for r in runs:
        path = r["dir"] / ".hydra" / "overrides.yaml"
        for item in (yaml.safe_load(path.read_text()) if path.exists() else None) or []:
            key = item.split("=", 1)[0].lstrip("+~")
            if not key.startswith("hydra") and key not in keys:
                keys.append(key)
    grid = {}
    for key in keys:
        values = sorted({grid_value(r["cfg"], key) for r in runs})
        if len(values) > 1 or key == "seed":
            grid[key] = values
    grid = grid or {"seed": sorted({grid_value(r["cfg"], "seed") for r in runs})}
    found = {k for r in runs if r["metrics"] for k in r["metrics"]}
    metrics = [m for m, (_, mkeys, _) in METRICS.items() if m == "pref_accuracy" or found & set(mkeys)]
    return {
        "name": sweep_dir.name,
        "grid": grid,
        "report": {"columns": "latent" if "latent" in grid else None, "metrics": metrics},
    }


def read_sweep(sweep_dir: str | Path) -> dict:
    """Runs of a sweep directory with their grid values, status and metrics; plus the expected grid."""
    sweep_dir = Path(sweep_dir)
    manifest = (
        json.loads((sweep_dir / rundir.SWEEP_MANIFEST).read_text())
        if (sweep_dir / rundir.SWEEP_MANIFEST).exists()
        else None
    )
    runs, spec = [], None
    for run_dir in rundir.run_dirs(sweep_dir):
        cfg = rundir.load_config(run_dir)
        if cfg is not None and spec is None and "sweep" in cfg:
            spec = OmegaConf.to_container(cfg.sweep, resolve=True)
        status = rundir.status(run_dir)
        completed = status == "completed"
        ckpts = rundir.checkpoints(run_dir, complete_only=False)
        runs.append(
            {
                "dir": run_dir,
                "cfg": cfg,
                "metrics": rundir.load_metrics(run_dir) if completed else None,
                "status": status,
                "checkpoint_step": ckpts[-1][0] if ckpts and not completed else None,
                "log_tail": [] if completed else log_tail(run_dir),
            }
        )
    if spec is None and manifest:  # no run got as far as its config: the driver's record still names the grid
        spec = {"name": manifest.get("experiment") or sweep_dir.name, "grid": manifest["grid"]}
    if spec is None:
        spec = inferred_spec(sweep_dir, runs)
    if spec is None:
        raise SystemExit(f"lpc.experiments.report: no runs (no .hydra/config.yaml or metrics.json) under {sweep_dir}")
    if manifest:
        grid = {k: manifest["grid"][k] for k in manifest.get("grid_keys", manifest["grid"])}
    else:
        grid = spec.get("grid") or {}
    keys = list(grid)
    for r in runs:
        r["values"] = {k: grid_value(r["cfg"], k) for k in keys} if r["cfg"] is not None else None
    if manifest:
        expected = [{k: str(v) for k, v in j["overrides"].items()} | {"_dir": j["dir"]} for j in manifest["jobs"]]
    elif spec.get("groups"):  # a union of products: each run is known by its directory below its group's
        expected = [j["overrides"] | {"_dir": j["dir"]} for j in experiment_spec.jobs(spec)]
    else:
        expected = [dict(zip(keys, map(value_str, vals))) for vals in itertools.product(*grid.values())]
    present_dirs = {r["dir"].relative_to(sweep_dir).as_posix() for r in runs}
    present_values = [r["values"] for r in runs if r["values"]]
    missing = []
    for job in expected:
        values = {k: v for k, v in job.items() if k != "_dir"}
        if job.get("_dir") in present_dirs or (job.get("_dir") is None and values in present_values):
            continue
        missing.append(values)
    scale = manifest.get("scale") if manifest else None
    if scale is None:  # without a manifest: the runs' own scale config (None for a plain -m sweep)
        scale = next((OmegaConf.select(r["cfg"], "scale.name") for r in runs if r["cfg"] is not None), None)
    return {
        "sweep_dir": sweep_dir,
        "spec": spec,
        "grid": grid,
        "keys": keys,
        "runs": runs,
        "missing": missing,
        "scale": scale,
        "command": manifest.get("command") if manifest else None,
    }


# ---------------------------------------------------------------------------- aggregation
def metric_value(metrics: dict, name: str) -> float | None:
    _, keys, factor = METRICS[name]
    for key in keys:
        if isinstance(metrics.get(key), (int, float)):
            return float(metrics[key]) * factor
    return None


def mean_std(values: list[float]) -> tuple[float, float | None, int]:
    """Mean, sample standard deviation (n-1; None for one value) and n (``lpc.stats.summarize``)."""
    s = summarize(values)
    return s.mean, s.std, s.n


def aggregate(sweep: dict) -> dict:
    """{(metric, row tuple, column): {"mean","std","n","runs"}} over the completed runs' seeds."""
    report = sweep["spec"].get("report") or {}
    col_key = report.get("columns")
    row_keys = [k for k in sweep["keys"] if k not in ("seed", col_key)]
    cells: dict = {}
    for r in sweep["runs"]:
        if r["status"] != "completed" or not r["values"]:
            continue
        row = tuple(r["values"][k] for k in row_keys)
        col = r["values"][col_key] if col_key else ""
        for name in report.get("metrics", ["pref_accuracy"]):
            cell = cells.setdefault((name, row, col), {"values": [], "runs": 0})
            cell["runs"] += 1
            v = metric_value(r["metrics"], name)
            if v is not None:
                cell["values"].append(v)
    for cell in cells.values():
        cell["mean"], cell["std"], cell["n"] = mean_std(cell["values"]) if cell["values"] else (None, None, 0)
    return cells


def published(spec: dict) -> dict:
    """The experiment's published numbers (``sweep.report.paper``: entries of metric, match, value, setting,
    source) and statements (``sweep.report.notes``)."""
    report = spec.get("report") or {}
    return {"entries": list(report.get("paper") or []), "notes": list(report.get("notes") or [])}


def paper_value(paper: dict, metric: str, cell_values: dict) -> dict | None:
    """The published entry whose `match` agrees with the cell on every key the cell has (keys that are not grid
    keys of the sweep are ignored, so an ablation's entries also appear beside a reduced grid)."""
    for e in paper.get("entries", []):
        if e["metric"] != metric:
            continue
        if all(value_str(v) == cell_values[k] for k, v in e["match"].items() if k in cell_values):
            return e
    return None


# ---------------------------------------------------------------------------- rendering
def fmt_cell(cell: dict | None) -> str:
    if not cell or cell["n"] == 0:
        return "n/a" if cell else "—"
    std = f" ± {cell['std']:.1f}" if cell["std"] is not None else ""
    return f"{cell['mean']:.1f}{std} (n={cell['n']})"


def fmt_paper(entry: dict | None) -> str:
    if entry is None:
        return ""
    v = entry["value"]
    return f"{v:.2f}".rstrip("0").rstrip(".") if isinstance(v, (int, float)) else str(v)


def build_tables(sweep: dict, cells: dict, paper: dict) -> tuple[str, list[dict]]:
    spec = sweep["spec"]
    report = spec.get("report") or {}
    col_key = report.get("columns")
    row_keys = [k for k in sweep["keys"] if k not in ("seed", col_key)]
    cols = [value_str(v) for v in sweep["grid"][col_key]] if col_key else [""]
    rows = [tuple(value_str(v) for v in vals) for vals in itertools.product(*(sweep["grid"][k] for k in row_keys))]
    label = COLUMN_LABELS.get(col_key, {})
    md, csv_rows = [], []
    for metric in report.get("metrics", ["pref_accuracy"]):
        title = METRICS[metric][0]
        head = row_keys + ([label.get(c, f"{col_key}={c}") for c in cols] if col_key else [title])
        delta = col_key == "latent" and {"none", "discrete"} <= set(cols)
        if delta:
            head.append("Δ (w/ - w/o)")
        head += [f"paper {label.get(c, c)}".rstrip() for c in cols]
        lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        any_missing_metric = False
        for row in rows:
            values = dict(zip(row_keys, row))
            ours, theirs = [], []
            for c in cols:
                cell = cells.get((metric, row, c))
                cell_values = values | ({col_key: c} if col_key else {})
                entry = paper_value(paper, metric, cell_values)
                ours.append(fmt_cell(cell))
                theirs.append(fmt_paper(entry))
                any_missing_metric |= bool(cell) and cell["n"] < cell["runs"]
                csv_rows.append(
                    {
                        "metric": metric,
                        **values,
                        "column": c,
                        "mean": "" if not cell or cell["mean"] is None else round(cell["mean"], 4),
                        "std": "" if not cell or cell["std"] is None else round(cell["std"], 4),
                        "n": cell["n"] if cell else 0,
                        "runs": cell["runs"] if cell else 0,
                        "paper": fmt_paper(entry),
                        "paper_source": entry["source"] if entry else "",
                    }
                )
            extra = []
            if delta:
                a, b = cells.get((metric, row, "none")), cells.get((metric, row, "discrete"))
                extra = [f"{b['mean'] - a['mean']:+.1f}" if a and b and a["n"] and b["n"] else ""]
            lines.append("| " + " | ".join(list(row) + ours + extra + theirs) + " |")
        if any_missing_metric:
            latent_metric = any(
                k.startswith(("eval/latent/", "eval/code", "eval/pref_accuracy/z_")) for k in METRICS[metric][1]
            )
            why = (
                "runs without a latent (latent=none) have no latent diagnostics"
                if latent_metric
                else "downstream metrics come from the eval step (eval=paper / eval=local, or lpc-evaluate RUN_DIR)"
            )
            lines += [
                "",
                f"n/a: completed runs without this metric in metrics.json (keys {METRICS[metric][1]}); {why}.",
            ]
        md += lines + [""]
    return "\n".join(md), csv_rows


SCALE_NOTE = "CPU scale: tiny model, synthetic data; not comparable with the paper's numbers"


def plot_curve(sweep: dict, cells: dict, paper: dict, x_key: str, path: Path) -> bool:
    """``curve_figure`` saved to ``path``; False when there is nothing to draw."""
    import matplotlib.pyplot as plt

    fig = curve_figure(sweep, cells, paper, x_key)
    if fig is None:
        return False
    try:
        atomic_save_figure(fig, path, dpi=120)
    finally:
        plt.close(fig)
    return True


def curve_figure(sweep: dict, cells: dict, paper: dict, x_key: str):
    """Preference accuracy (mean ± std over seeds) against ``x_key``, one line per column value, the paper's
    series of a condition in its colour, a ``codebook=none`` cell as that condition's level; None if empty."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    report = sweep["spec"].get("report") or {}
    col_key = report.get("columns")
    row_keys = [k for k in sweep["keys"] if k not in ("seed", col_key)]
    if x_key not in row_keys:
        return None
    label = COLUMN_LABELS.get(col_key, {})
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    drawn, xs = False, set()
    for c in [value_str(v) for v in sweep["grid"][col_key]] if col_key else [""]:
        pts, ref, baseline = [], [], None
        for (metric, row, col), cell in cells.items():
            if metric != "pref_accuracy" or col != c or not cell["n"]:
                continue
            values = dict(zip(row_keys, row))
            try:
                x = float(values[x_key])
            except ValueError:  # codebook=none: the baseline without a latent, drawn as a level, not a point
                baseline = cell
                continue
            pts.append((x, cell["mean"], cell["std"] or 0.0))
            entry = paper_value(paper, metric, values | ({col_key: c} if col_key else {}))
            if entry and isinstance(entry["value"], (int, float)):
                ref.append((x, float(entry["value"]), entry.get("setting", "")))
        if not pts:
            continue
        pts.sort()
        xs.update(p[0] for p in pts)
        name = label.get(c, c) or "ours"
        bars = ax.errorbar(
            [p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=3, label=name
        )
        colour = bars[0].get_color()  # the paper's series and the baseline of this condition share its colour
        if ref:
            ref.sort()
            setting = f" ({ref[0][2]})" if ref[0][2] else ""
            ax.plot(
                [r[0] for r in ref],
                [r[1] for r in ref],
                "--",
                marker="x",
                alpha=0.7,
                color=colour,
                label=f"paper {name}{setting}",
            )
        if baseline is not None:
            ax.axhline(baseline["mean"], ls=":", color=colour, label=f"{name}: no latent (codebook=none)")
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    if x_key == "codebook":
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted(xs), [str(int(x)) for x in sorted(xs)])  # the K that ran, as integers
        ax.minorticks_off()
        if sweep["spec"]["name"] == "codebook":  # the paper (Sec. 4.3): accuracy peaks around K = 32-64
            ax.axvspan(32, 64, color="grey", alpha=0.15, label="paper: peak around K = 32-64")
    ax.set_xlabel({"codebook": "codebook size K", "flip": "flip ratio"}.get(x_key, x_key))
    ax.set_ylabel("preference accuracy (%)")
    ax.set_title(f"{sweep['spec']['name']}: mean ± std over seeds")
    if sweep.get("scale") == "cpu":  # not the paper's setting: say so on the figure itself
        fig.text(0.01, 0.01, SCALE_NOTE, fontsize=7, color="firebrick", ha="left", va="bottom")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout(rect=(0, 0.04, 1, 1))
    return fig


def run_name(sweep: dict, run: dict) -> str:
    """A run as the report names it: its directory below the sweep's (``<group>/<key=value,...>`` in a group)."""
    return run["dir"].relative_to(sweep["sweep_dir"]).as_posix()


def latent_section(sweep: dict) -> str:
    """LPC runs whose latent did nothing: z = 0 flips under 1% of the decisions (inert), or shuffling
    z across prompts costs under 1 point (z does not depend on the prompt); and runs whose LM the training
    damaged (``eval/lm/damaged``, lpc.evaluation.integrity: plain text's NLL or greedy answers; and
    ``eval/lm/prompt_codes_damaged``: plain text's NLL under the codes the eval prompts get)."""
    flagged = []
    for r in sweep["runs"]:
        m = r.get("metrics") or {}
        if r["status"] != "completed":
            continue
        why = []
        if m.get("eval/latent/inert"):
            why.append(f"inert: z = 0 flips {100 * m['eval/latent/decisions_changed']:.1f}% of decisions")
        if m.get("eval/latent/prompt_independent"):
            why.append(f"prompt-independent: shuffling z costs {100 * m['eval/latent/shuffle_gap']:.1f} points")
        if m.get("eval/lm/damaged"):
            parts = []
            if "eval/lm/nll_ratio" in m:
                parts.append(f"the prior's z changes plain text's NLL by {100 * (m['eval/lm/nll_ratio'] - 1):+.1f}%")
            if "eval/lm/repeat_rate/reference" in m:
                parts.append(
                    f"greedy answers repeat {100 * m['eval/lm/repeat_rate']:.0f}% of their 3-grams "
                    f"(the reference: {100 * m['eval/lm/repeat_rate/reference']:.0f}%)"
                )
            why.append("LM damaged: " + ", ".join(parts))
        if m.get("eval/lm/prompt_codes_damaged"):
            why.append(
                f"prompts' codes damage the LM: the codes the prior picks for "
                f"{100 * m['eval/lm/prompt_codes_over']:.0f}% of the eval prompts raise plain text's NLL by up to "
                f"{100 * (m['eval/lm/nll_ratio/prompt_codes_max'] - 1):+.1f}%"
            )
        if why:
            flagged.append(f"- `{run_name(sweep, r)}`: " + "; ".join(why))
    lpc_runs = sum(1 for r in sweep["runs"] if "eval/latent/inert" in (r.get("metrics") or {}))
    if not lpc_runs and not flagged:
        return ""
    head = [
        "## Did the latent act, and is the LM still an LM?",
        "",
        f"{len(flagged)} runs flagged ({lpc_runs} LPC runs; docs/synthetic-benchmark.md: reading the z ablations; "
        "docs/method.md: LM integrity).",
        "",
    ]
    return "\n".join(head + flagged + ([""] if flagged else []))


def grid_text(sweep: dict) -> str:
    """The experiment's size: ``grid: flip(4) x latent(2) x seed(2)``, or its groups' run counts."""
    groups = sweep["spec"].get("groups")
    if groups:
        counts = {}
        for j in experiment_spec.jobs(sweep["spec"]):
            counts[j["group"]] = counts.get(j["group"], 0) + 1
        return "groups: " + ", ".join(f"{g}({n})" for g, n in counts.items())
    return "grid: " + " x ".join(f"{k}({len(v)})" for k, v in sweep["grid"].items())


def status_section(sweep: dict) -> str:
    runs = sweep["runs"]
    bad = [r for r in runs if r["status"] != "completed"]
    lines = [
        "## Runs",
        "",
        f"{sum(r['status'] == 'completed' for r in runs)} completed, "
        f"{sum(r['status'] == 'incomplete' for r in runs)} incomplete, "
        f"{sum(r['status'] == 'failed' for r in runs)} failed, {len(sweep['missing'])} missing "
        f"({grid_text(sweep)}).",
        "",
    ]
    if sweep["missing"]:
        lines += ["### Missing (in the grid, no run directory)", ""]
        lines += [f"- `{','.join(f'{k}={v}' for k, v in m.items())}`" for m in sweep["missing"]] + [""]
    for status, title in (
        ("incomplete", "Incomplete (no completed metrics.json; resumes from its checkpoint)"),
        ("failed", "Failed (no completed metrics.json, no checkpoint)"),
    ):
        group = [r for r in bad if r["status"] == status]
        if not group:
            continue
        lines += [f"### {title}", ""]
        for r in group:
            step = f" (checkpoint step {r['checkpoint_step']})" if r["checkpoint_step"] else ""
            lines.append(f"- `{run_name(sweep, r)}`{step}")
            if r["log_tail"]:
                lines += ["  ```"] + [f"  {ln}" for ln in r["log_tail"]] + ["  ```"]
            else:
                lines.append("  (no log file in the run directory)")
        lines.append("")
    lines += [
        "Rerun the same `make reproduce-*` / `lpc-sweep` command to run only the missing, incomplete and failed runs.",
        "",
    ]
    return "\n".join(lines)


def grid_layout(sweep: dict, out: Path) -> tuple[list[str], dict]:
    """The paper's tables (one per metric, ours beside the published numbers) and curves; writes report.csv."""
    spec = sweep["spec"]
    paper = published(spec)
    cells = aggregate(sweep)
    tables, csv_rows = build_tables(sweep, cells, paper)
    pngs = []
    curve = (spec.get("report") or {}).get("curve")
    if curve and plot_curve(sweep, cells, paper, curve, out / f"{curve}.png"):
        pngs.append(f"{curve}.png")
    md = [
        "Our numbers: mean ± sample std over seeds (n = runs with the metric), in %. "
        "`paper` columns: the published value for that cell (the experiment's `sweep.report.paper`, "
        "conf/experiment/; the paper's setting is Llama3-8B/Mistral-7B on UltraFeedback, 5 seeds), blank where "
        "none is public.",
        "",
        tables,
    ]
    if paper["notes"]:
        md += ["Published statements:", ""] + [f"- {n}" for n in paper["notes"]] + [""]
    md += [f"![{p}]({p})" for p in pngs] + ([""] if pngs else [])
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for row in csv_rows for k in row)))
    writer.writeheader()
    writer.writerows(csv_rows)
    atomic_write_text(out / "report.csv", buf.getvalue())
    return md, {"pngs": pngs, "cells": cells}


def settings_layout(sweep: dict, out: Path) -> tuple[list[str], dict]:
    """The synthetic benchmark's tables: one per data setting, one row per method (lpc.experiments.synthetic);
    writes report.json with every per-seed value."""
    runs = [synthetic.read_run(r["dir"]) for r in sweep["runs"] if r["status"] == "completed"]
    runs = [r for r in runs if r is not None]
    rows = synthetic.aggregate(runs)
    ordered = sorted(runs, key=lambda r: (synthetic.setting_title(r["data"]), r["seed"]))
    atomic_write_json(out / "report.json", rows)
    md = [
        'Accuracies in %. Each cell: mean ± the 95% t interval over seeds; "vs. no latent": the mean per-seed '
        "difference to the same algorithm without a latent on the same seeds (the same data), its 95% interval "
        "and a paired t-test.",
        "",
        synthetic.markdown_tables(rows) + synthetic.steering_section(ordered),
    ]
    return md, {"pngs": [], "rows": rows}


def write_report(sweep_dir: str | Path, out: str | Path | None = None) -> dict:
    """report.md (and the layout's files) of a sweep directory, into ``out`` (default: the sweep directory)."""
    sweep = read_sweep(sweep_dir)
    spec = sweep["spec"]
    layout = (spec.get("report") or {}).get("layout") or "grid"
    if layout not in LAYOUTS:
        raise ConfigError(f"sweep.report.layout={layout!r} is not allowed: one of {', '.join(LAYOUTS)}")
    out = Path(out or sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    body, extra = (grid_layout if layout == "grid" else settings_layout)(sweep, out)
    runs = sweep["runs"]
    completed = sum(r["status"] == "completed" for r in runs)
    made_by = f", made by `{sweep['command']}`" if sweep["command"] else ""
    md = [f"# Sweep `{spec['name']}`", "", f"{completed} completed runs{made_by}.", "", *body]
    latent = latent_section(sweep)
    if latent:
        md.append(latent)
    md.append(status_section(sweep))
    atomic_write_text(out / "report.md", "\n".join(md))
    return {
        "report_md": str(out / "report.md"),
        "completed": completed,
        "failed": sum(r["status"] != "completed" for r in runs),
        "missing": len(sweep["missing"]),
        **extra,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="lpc-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("sweep_dir", help="the sweep directory (lpc-sweep's, or any lpc-train -m sweep)")
    parser.add_argument("--out", default=None, help="where to write report.md and its files (default: SWEEP_DIR)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    s = write_report(args.sweep_dir, args.out)
    print(
        f"{s['report_md']}: {s['completed']} completed, {s['failed']} failed/incomplete, {s['missing']} missing"
        + (f"; curves: {', '.join(s['pngs'])}" if s["pngs"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
