"""The synthetic benchmark's tables (``sweep.report.layout: settings`` of lpc-report; docs/synthetic-benchmark.md).

A completed run's data setting (model, LM learning rate, conflict, visibility, tag accuracy, label noise, flips,
steps) and its method (algorithm, latent, and every ``latent.*`` / ``codebook`` value that differs from today's
defaults) are read from its composed config; runs that differ only in ``seed`` form one cell. Each cell gives the
mean with a 95% t interval over seeds, the best achievable accuracy (the generator's Bayes ceiling), the paired
difference to the same algorithm without a latent on the same seeds (same data) with a paired t-test, and the
latent's diagnostics (z ablations, prior entropy, codes used, NMI beside its chance baseline). The runs that
``lpc-steer`` analysed add the type-steered generation table.
"""

from __future__ import annotations

import functools
import importlib
import inspect
import json
from pathlib import Path

from omegaconf import OmegaConf

from lpc.stats import fmt_mean_ci, paired_difference, summarize
from lpc.training import rundir

METRICS = (
    "eval/pref_accuracy",
    "eval/ceiling",
    "eval/pref_accuracy/z_shuffled",
    "eval/pref_accuracy/z_zero",
    "eval/pref_accuracy/z_posterior",
    "eval/latent/shuffle_gap",
    "eval/latent/decisions_changed",
    "eval/latent/prior_entropy_normalized",
    "eval/codes_used",
    "eval/nmi",
    "eval/nmi_chance",
    "eval/lm/nll_ratio",
    "eval/lm/nll_ratio_reference",
    "eval/lm/damaged",
)


def data_setting(cfg) -> dict:
    """The data setting of a composed run config: what a table's title (:func:`setting_title`) shows."""
    flip = float(cfg.flip)
    return {
        "n_types": int(cfg.data.n_types),
        "conflict": float(cfg.data.conflict),
        "visibility": str(cfg.data.visibility),
        "tag_accuracy": float(cfg.data.get("tag_accuracy", 1.0)),
        "label_noise": float(cfg.data.get("label_noise", 0.0)),
        "flip": flip,
        "flip_marker": (cfg.data.get("flip_marker") or "none") if flip > 0 else None,
        "steps": int(cfg.trainer.max_steps),
        "model": str(cfg.model.name),
        "lr": float(cfg.trainer.lr),
    }


def read_run(run_dir: Path) -> dict | None:
    """A completed run's data setting, method, seed and metrics (``lpc.training.rundir`` reads the files)."""
    cfg = rundir.load_config(run_dir)
    if cfg is None or rundir.status(run_dir) != "completed":
        return None
    metrics = rundir.load_metrics(run_dir)
    data = data_setting(cfg)
    method = {"algo": str(cfg.algo.name), "latent": str(cfg.latent.name), "options": latent_options(cfg)}
    return {"data": data, "method": method, "seed": int(cfg.seed), "metrics": metrics, "dir": str(run_dir)}


@functools.cache
def _default_latent(name: str) -> dict:
    from hydra import compose, initialize_config_dir

    from lpc.conf import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"latent={name}"])
    return {"latent": OmegaConf.to_container(cfg.latent, resolve=True)}


def _fmt(value) -> str:
    return "null" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


@functools.cache
def _constructor_defaults(target: str) -> dict:
    """The keyword defaults of a latent class's constructor and of its bases' (``**common``)."""
    module, _, cls_name = target.rpartition(".")
    cls = getattr(importlib.import_module(module), cls_name)
    out: dict = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        for p in inspect.signature(init).parameters.values():
            if p.default is not inspect.Parameter.empty:
                out[p.name] = p.default
    return out


def latent_options(cfg) -> list[str]:
    """What the run's latent was, as the overrides that give it from today's defaults: the keys of its composed
    ``latent`` node (and ``codebook``) that differ from ``latent=<its name>`` composed now. A label that stays true
    when the defaults change (a run made with an older default is labelled with the value it ran with; a key its
    config predates, with the constructor's default, which is what it ran with)."""
    name = str(cfg.latent.name)
    if name == "none":
        return []
    default = _default_latent(name)
    ran = OmegaConf.to_container(cfg.latent, resolve=True)
    implicit = _constructor_defaults(ran["_target_"])
    ran = {**{k: implicit[k] for k in default["latent"] if k not in ran and k in implicit}, **ran}
    opts = [
        f"latent.{k}={_fmt(v)}"
        for k, v in ran.items()
        if k not in ("_target_", "name", "codebook_size") and default["latent"].get(k) != v
    ]
    if name == "discrete" and ran["codebook_size"] != default["latent"]["codebook_size"]:
        opts.append(f"codebook={ran['codebook_size']}")
    return sorted(opts)


def method_name(m: dict) -> str:
    algo = {"dpo": "DPO", "ipo": "IPO", "simpo": "SimPO"}.get(m["algo"], m["algo"])
    if m["latent"] == "none":
        return algo
    name = f"LPC-{algo}" + (" (continuous)" if m["latent"] == "continuous" else "")
    return name + (f" [{', '.join(m['options'])}]" if m["options"] else "")


def _key(d: dict) -> str:
    return json.dumps(d, sort_keys=True)


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (data setting, method): per-seed values and summaries, and the paired difference to
    the same algorithm without a latent on the same data setting."""
    cells: dict[tuple, list[dict]] = {}
    for r in runs:
        cells.setdefault((_key(r["data"]), _key(r["method"])), []).append(r)
    rows = []
    for (dkey, mkey), members in cells.items():
        per_seed = {name: {m["seed"]: m["metrics"][name] for m in members if name in m["metrics"]} for name in METRICS}
        rows.append(
            {
                "data": json.loads(dkey),
                "method": json.loads(mkey),
                "seeds": sorted(m["seed"] for m in members),
                "values": per_seed,
                "summary": {n: summarize(v.values()).as_dict() for n, v in per_seed.items() if v},
            }
        )
    by_cell = {(_key(r["data"]), _key(r["method"])): r for r in rows}
    for r in rows:
        if r["method"]["latent"] == "none":
            continue
        base = by_cell.get((_key(r["data"]), _key({"algo": r["method"]["algo"], "latent": "none", "options": []})))
        if base is not None:
            d = paired_difference(r["values"]["eval/pref_accuracy"], base["values"]["eval/pref_accuracy"])
            r["vs_baseline"] = d.__dict__ if d is not None else None
    rows.sort(
        key=lambda r: (_key(r["data"]), r["method"]["algo"], r["method"]["latent"] != "none", method_name(r["method"]))
    )
    return rows


def setting_title(d: dict) -> str:
    parts = [f"{d['n_types']} types, conflict {d['conflict']:g}, tag {d['visibility']}"]
    if d.get("model", "tiny") != "tiny":  # the pretrained tier: the backbone and its (paper-recipe) LM rate
        parts.insert(0, f"{d['model']}, LM lr {d['lr']:g}")
    if d["tag_accuracy"] < 1:
        parts.append(f"tag accuracy {d['tag_accuracy']:g}")
    if d["label_noise"] > 0:
        parts.append(f"label noise T = {d['label_noise']:g}")
    if d["flip"] > 0:
        parts.append(f"{d['flip']:.0%} of training labels flipped, marker {d['flip_marker']}")
    parts.append(f"{d['steps']} steps")
    return ", ".join(parts)


def _cell(row: dict, name: str, scale: float = 100.0, digits: int = 1) -> str:
    s = row["summary"].get(name)
    if s is None:
        return "-"
    from lpc.stats import Summary

    return fmt_mean_ci(Summary(**s), scale, digits)


def _paired(row: dict) -> str:
    d = row.get("vs_baseline")
    if not d:
        return "-"
    p = f", p = {d['p_value']:.2g}" if d["p_value"] is not None else ""
    ci = f" ± {100 * d['ci95']:.1f}" if d["ci95"] is not None else ""
    return f"{100 * d['mean_diff']:+.1f}{ci}{p}"


def markdown_tables(rows: list[dict]) -> str:
    head = (
        "| method | seeds | accuracy % | best achievable % | vs. no latent (paired, points) | z shuffled % "
        "| z = 0 flips % | z posterior % | prior entropy / log K | codes used | NMI (chance) "
        "| text NLL, prior's z / z = 0 | LM damaged |"
    )
    out, current = [], None
    for r in rows:
        title = setting_title(r["data"])
        if title != current:
            out += ["", f"**{title}**", "", head, "|" + "---|" * (head.count("|") - 1)]
            current = title
        nmi = _cell(r, "eval/nmi", 1, 2)
        if nmi != "-":
            nmi += f" ({_cell(r, 'eval/nmi_chance', 1, 2)})"
        out.append(
            f"| {method_name(r['method'])} | {len(r['seeds'])} | {_cell(r, 'eval/pref_accuracy')} "
            f"| {_cell(r, 'eval/ceiling')} | {_paired(r)} | {_cell(r, 'eval/pref_accuracy/z_shuffled')} "
            f"| {_cell(r, 'eval/latent/decisions_changed')} | {_cell(r, 'eval/pref_accuracy/z_posterior')} "
            f"| {_cell(r, 'eval/latent/prior_entropy_normalized', 1, 2)} | {_cell(r, 'eval/codes_used', 1, 1)} "
            f"| {nmi} | {_cell(r, 'eval/lm/nll_ratio', 1, 3)} | {_cell(r, 'eval/lm/damaged', 1, 1)} |"
        )
    return "\n".join(out).lstrip() + "\n"


def steering_section(runs: list[dict]) -> str:
    """Type-steered generation (``lpc-steer``) of the runs that have it. Per run, each type's reward when
    generating with that type's best code (chosen on the other half of the prompts), with the code the
    prior picks for prompts tagged with that type's source, and with z = 0. Two counts: codes that put
    their type's reward above the other type's (beyond both 95% intervals), and prior codes that move
    their type's reward up from z = 0 (beyond both intervals)."""
    rows, n_abs, n_rel, n_spec = [], 0, 0, 0
    for r in runs:
        path = Path(r["dir"]) / rundir.ANALYSIS / "steering.json"
        if not path.exists():
            continue
        st = json.loads(path.read_text())
        if st["n_types"] != 2:
            continue
        z0 = st["rows"]["z = 0"]["report"]
        cells, ok_abs, ok_rel = [], True, True
        for kind in ("best_code", "prior_code"):
            for m, b in sorted(st.get(kind, {}).items()):
                m = int(m)
                (mu, ci), (mu_o, ci_o) = b["report"][m], b["report"][1 - m]
                above = mu - ci > mu_o + ci_o
                ok_abs &= above
                if kind == "prior_code":
                    ok_rel &= mu - ci > z0[m][0] + z0[m][1]
                cells.append(f"code {b['code']}: {mu:+.3f} ± {ci:.3f}{'' if above else ' (no)'}")
        n_abs += ok_abs
        n_rel += ok_rel
        # specialised: each type's reward is higher with its own best code than with the other type's
        best = {int(m): b["report"] for m, b in st["best_code"].items()}
        n_spec += all(best[m][m][0] - best[m][m][1] > best[1 - m][m][0] + best[1 - m][m][1] for m in (0, 1))
        rows.append(f"| {r['seed']} | " + " | ".join(cells) + f" | {z0[0][0]:+.3f} ± {z0[0][1]:.3f} |")
    if not rows:
        return ""
    head = (
        "| seed | type 0, best code | type 1, best code | type 0, prior's code for [source_0] "
        "| type 1, prior's code for [source_1] | type 0 at z = 0 |"
    )
    return "\n".join(
        [
            "",
            "**Type-steered generation** (`lpc-steer RUN`, LPC-DPO runs that have it; each cell: the "
            "type's mean ground-truth reward on held-out prompts ± 95% interval; type 1's reward is minus "
            "type 0's; (no): not above the other type's beyond both intervals)",
            "",
            head,
            "|" + "---|" * (head.count("|") - 1),
            *rows,
            "",
            f"{n_spec} of {len(rows)} runs: the codes specialise (each type's reward is higher with its own best "
            f"code than with the other type's, beyond both intervals). "
            f"{n_abs} of {len(rows)} runs: every code puts its type's reward above the other type's. "
            f"{n_rel} of {len(rows)} runs: both prior codes raise their type's reward over z = 0.",
            "",
        ]
    )
