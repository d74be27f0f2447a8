"""lpc-report's settings layout (the synthetic benchmark's tables, lpc.experiments.synthetic) on five hand-made
runs: the cells, the paired difference and the title of docs/synthetic-benchmark.md's tables, computed by hand
(t quantile t_0.975,1 = 12.7062)."""

from __future__ import annotations

import json
import math

import pytest
from omegaconf import OmegaConf

from conftest import compose
from lpc.experiments.report import write_report

HEADLINE = ["experiment=synthetic_benchmark", "data.conflict=1.0", "data.visibility=always"]


def fake_run(root, name, overrides, metrics, status="completed"):
    run = root / name
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(compose(HEADLINE + overrides), run / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(HEADLINE + overrides), run / ".hydra" / "overrides.yaml")
    (run / "metrics.json").write_text(json.dumps({"status": status, **metrics}))


def lpc_metrics(acc, shuffled, flips, entropy, codes, nmi, nll_ratio=1.0, damaged=0.0):
    return {
        "eval/lm/nll_ratio": nll_ratio,
        "eval/lm/damaged": damaged,
        "eval/pref_accuracy": acc,
        "eval/ceiling": 1.0,
        "eval/pref_accuracy/z_shuffled": shuffled,
        "eval/pref_accuracy/z_posterior": 1.0,
        "eval/latent/decisions_changed": flips,
        "eval/latent/prior_entropy_normalized": entropy,
        "eval/codes_used": codes,
        "eval/nmi": nmi,
        "eval/nmi_chance": 0.1,
    }


def test_report_tables_by_hand(tmp_path, capsys):
    root = tmp_path / "runs"
    fake_run(root, "dpo0", ["latent=none", "seed=0"], {"eval/pref_accuracy": 0.80, "eval/ceiling": 1.0})
    fake_run(root, "dpo1", ["latent=none", "seed=1"], {"eval/pref_accuracy": 0.90, "eval/ceiling": 1.0})
    fake_run(root, "lpc0", ["latent=discrete", "seed=0"], lpc_metrics(0.90, 0.7, 0.1, 0.5, 2, 0.9, 1.01))
    fake_run(root, "lpc1", ["latent=discrete", "seed=1"], lpc_metrics(0.96, 0.8, 0.2, 0.7, 4, 1.0, 1.03))
    fake_run(
        root,
        "lr10",
        ["latent=discrete", "latent.lr_multiplier=10", "seed=0"],
        lpc_metrics(0.95, 0.6, 0, 1, 1, 0, 1.2, 1.0),
    )
    fake_run(root, "unfinished", ["latent=discrete", "seed=2"], {"eval/pref_accuracy": 0.1}, status="running")
    (root / "sweep.json").write_text(
        json.dumps({"command": "lpc-sweep experiment=synthetic_benchmark", "grid": {}, "jobs": []})
    )
    summary = write_report(root, tmp_path / "out")
    assert summary["completed"] == 5 and summary["failed"] == 1
    md = (tmp_path / "out" / "report.md").read_text()
    assert md.startswith(
        "# Sweep `synthetic_benchmark`\n\n5 completed runs, made by `lpc-sweep experiment=synthetic_benchmark`.\n\n"
    )
    titles = [ln for ln in md.splitlines() if ln.startswith("**2 types")]
    assert titles == ["**2 types, conflict 1, tag always, 600 steps**"]
    rows = [ln for ln in md.splitlines() if ln.startswith("| DPO") or ln.startswith("| LPC")]
    # DPO: mean 85.0, s = 0.0707, ci = 12.7062 x 0.0707 / sqrt 2 = 63.5 (points); the ceiling is 1.0 twice
    # LPC: 93.0 ± 12.7062 x 3.0; paired differences 10 and 6 points: +8.0 ± 12.7062 x 2.0, t = 4 on 1 degree of
    # freedom: p = 1 - 2 atan(4) / pi = 0.156; the other cells likewise (NMI and entropy unscaled, 2 digits)
    # lr10 (one seed): values alone, its difference to DPO's seed 0 is +15.0 points with no interval
    # NLL ratios 1.01 and 1.03: 1.020 ± 12.7062 x 0.01414 / sqrt 2 = 0.127 (3 digits); LM damaged 0 twice
    assert rows == [
        "| DPO | 2 | 85.0 ± 63.5 | 100.0 ± 0.0 | - | - | - | - | - | - | - | - | - |",
        "| LPC-DPO | 2 | 93.0 ± 38.1 | 100.0 ± 0.0 | +8.0 ± 25.4, p = 0.16 | 75.0 ± 63.5 | 15.0 ± 63.5 | 100.0 ± 0.0 "
        "| 0.60 ± 1.27 | 3.0 ± 12.7 | 0.95 ± 0.64 (0.10 ± 0.00) | 1.020 ± 0.127 | 0.0 ± 0.0 |",
        "| LPC-DPO [latent.lr_multiplier=10] | 1 | 95.0 | 100.0 | +15.0 | 60.0 | 0.0 | 100.0 | 1.00 | 1.0 | 0.00 (0.10) "
        "| 1.200 | 1.0 |",
    ]
    rows_json = json.loads((tmp_path / "out" / "report.json").read_text())
    lpc = next(r for r in rows_json if r["method"] == {"algo": "dpo", "latent": "discrete", "options": []})
    assert lpc["seeds"] == [0, 1] and lpc["values"]["eval/pref_accuracy"] == {"0": 0.90, "1": 0.96}
    assert lpc["vs_baseline"]["mean_diff"] == pytest.approx(0.08) and lpc["vs_baseline"]["p_value"] == pytest.approx(
        1 - 2 * math.atan(4) / math.pi
    )


def test_the_pretrained_tier_is_its_own_table_titled_with_model_and_lm_rate(tmp_path):
    root = tmp_path / "runs"
    run = root / "smol"
    (run / ".hydra").mkdir(parents=True)
    overrides = ["experiment=synthetic_pretrained", "latent=discrete", "seed=0"]
    OmegaConf.save(compose(overrides), run / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(overrides), run / ".hydra" / "overrides.yaml")
    (run / "metrics.json").write_text(json.dumps({"status": "completed", **lpc_metrics(0.7, 0.6, 0.1, 0.2, 2, 1.0)}))
    write_report(root)
    md = (root / "report.md").read_text()
    assert "**smollm2, LM lr 5e-07, 2 types, conflict 1, tag always, 60 steps**" in md


def test_a_run_is_labelled_by_its_latent_as_it_ran_not_by_its_overrides(tmp_path):
    """A run made under another default is labelled with the value it ran with: its composed config is read
    against today's defaults, whatever its command line said."""
    root = tmp_path / "runs"
    run = root / "old"
    (run / ".hydra").mkdir(parents=True)
    cfg = compose(HEADLINE + ["latent=discrete", "seed=0"])
    cfg.latent.codebook_init = "hidden"  # as if hidden had been the default when it ran
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    OmegaConf.save(OmegaConf.create(HEADLINE + ["latent=discrete", "seed=0"]), run / ".hydra" / "overrides.yaml")
    (run / "metrics.json").write_text(json.dumps({"status": "completed", **lpc_metrics(0.9, 0.8, 0.1, 0.2, 2, 1.0)}))
    write_report(root)
    assert "| LPC-DPO [latent.codebook_init=hidden] | 1 |" in (root / "report.md").read_text()


def test_a_run_whose_config_predates_an_option_is_labelled_with_the_constructors_default(monkeypatch):
    """A key the run's config lacks ran at the latent constructor's default (``pool``: ``last``); it is named when
    today's config default differs from that, and not when it equals it."""
    from lpc.experiments import synthetic

    cfg = compose(HEADLINE + ["latent=discrete", "seed=0"])
    OmegaConf.set_struct(cfg, False)
    today = synthetic._default_latent("discrete")["latent"]
    del cfg.latent["pool"]  # as if the run predated latent.pool
    for default_pool, label in (("mean", ["latent.pool=last"]), ("last", [])):
        monkeypatch.setattr(synthetic, "_default_latent", lambda name, p=default_pool: {"latent": {**today, "pool": p}})
        assert synthetic.latent_options(cfg) == label
    cfg.latent["pool"] = "mean"  # a run that set it is labelled by its own value
    assert synthetic.latent_options(cfg) == ["latent.pool=mean"]
