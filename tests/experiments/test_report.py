"""lpc.experiments.report on a hand-built sweep directory: seed aggregation, paper numbers, failed/missing runs, curves."""

from __future__ import annotations

import csv
import json
import math

from omegaconf import OmegaConf

from conftest import compose

# noise sweep, reduced to flip {0.0, 0.5} x latent {none, discrete} x seeds {0, 1} = 8 grid points.
GRID = ["experiment=noise", "sweep.grid.flip=[0.0,0.5]", "scale.seeds=[0,1]"]
ACC = {  # (flip, latent, seed) -> eval/pref_accuracy of a completed run
    ("0.0", "none", 0): 0.60,
    ("0.0", "none", 1): 0.64,
    ("0.0", "discrete", 0): 0.66,  # seed 1 failed
    ("0.5", "none", 0): 0.55,
    ("0.5", "none", 1): 0.57,
    ("0.5", "discrete", 0): 0.70,
    ("0.5", "discrete", 1): 0.74,
}
FAILED = ("0.0", "discrete", 1)


def make_run(sweep_dir, flip, latent, seed, acc=None):
    run_dir = sweep_dir / f"flip={flip},latent={latent},seed={seed}"
    cfg = compose(GRID + [f"flip={flip}", f"latent={latent}", f"seed={seed}"])
    (run_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
    if acc is not None:
        (run_dir / "metrics.json").write_text(json.dumps({"eval/pref_accuracy": acc, "status": "completed"}))
    else:
        (run_dir / "train.log").write_text(
            "step 10/50 loss=0.69\nTraceback (most recent call last):\nRuntimeError: CUDA out of memory (fake)\n"
        )
    return run_dir


def test_report_aggregates_seeds_and_lists_failed_and_missing(tmp_path):
    from lpc.experiments.report import write_report

    for (flip, latent, seed), acc in ACC.items():
        make_run(tmp_path, flip, latent, seed, acc)
    make_run(tmp_path, *FAILED)
    summary = write_report(tmp_path)
    assert summary["completed"] == 7 and summary["failed"] == 1 and summary["missing"] == 0

    cells = summary["cells"]
    c = cells[("pref_accuracy", ("0.5",), "discrete")]
    assert c["n"] == 2 and math.isclose(c["mean"], 72.0) and math.isclose(c["std"], math.sqrt(8.0))
    c = cells[("pref_accuracy", ("0.0",), "none")]
    assert math.isclose(c["mean"], 62.0) and math.isclose(c["std"], math.sqrt(8.0))
    c = cells[("pref_accuracy", ("0.0",), "discrete")]
    assert c["n"] == 1 and math.isclose(c["mean"], 66.0) and c["std"] is None

    md = (tmp_path / "report.md").read_text()
    # row flip=0.5: w/o 56.0 ± 1.4, w/ 72.0 ± 2.8, delta +16.0, paper 63.2 / 66.2 (rebuttal flip table)
    assert "| 0.5 | 56.0 ± 1.4 (n=2) | 72.0 ± 2.8 (n=2) | +16.0 | 63.2 | 66.2 |" in md
    assert "| 0.0 | 62.0 ± 2.8 (n=2) | 66.0 (n=1) | +4.0 | 69.3 | 70.8 |" in md
    assert "flip=0.0,latent=discrete,seed=1" in md.split("### Failed")[1]
    assert "RuntimeError: CUDA out of memory (fake)" in md
    rows = list(csv.DictReader((tmp_path / "report.csv").open()))
    row = next(r for r in rows if r["flip"] == "0.5" and r["column"] == "discrete")
    assert float(row["mean"]) == 72.0 and row["n"] == "2" and row["paper"] == "66.2"
    assert (tmp_path / "flip.png").stat().st_size > 1000


def test_report_lists_missing_runs_from_the_manifest(tmp_path):
    from lpc.experiments.report import write_report

    for (flip, latent, seed), acc in ACC.items():
        make_run(tmp_path, flip, latent, seed, acc)
    jobs = [
        {"overrides": {"flip": f, "latent": lat, "seed": str(s)}, "dir": f"flip={f},latent={lat},seed={s}"}
        for f in ("0.0", "0.5")
        for lat in ("none", "discrete")
        for s in (0, 1)
    ]
    (tmp_path / "sweep.json").write_text(
        json.dumps({"grid": {"flip": [0.0, 0.5], "latent": ["none", "discrete"], "seed": [0, 1]}, "jobs": jobs})
    )
    summary = write_report(tmp_path)
    assert summary["missing"] == 1 and summary["failed"] == 0
    md = (tmp_path / "report.md").read_text()
    assert "- `flip=0.0,latent=discrete,seed=1`" in md.split("### Missing")[1]


def test_mixed_ratings_pairs_record_their_rating():
    import random

    import pytest

    from lpc.data.hub import UltraFeedback, mixed_pair

    # one prompt whose helpfulness and honesty orders disagree: the chosen answer says which rating won
    comps = [
        {"response": "A", "annotations": {"helpfulness": {"Rating": "5"}, "honesty": {"Rating": "1"}}},
        {"response": "B", "annotations": {"helpfulness": {"Rating": "1"}, "honesty": {"Rating": "5"}}},
    ]
    row = {"instruction": "q", "source": "s", "completions": comps}
    rng = random.Random(0)
    pairs = [mixed_pair(row, ["helpfulness", "honesty"], rng) for _ in range(400)]
    assert all(p["chosen"] == {"helpfulness": "A", "honesty": "B"}[p["rating"]] for p in pairs)
    assert 170 <= sum(p["rating"] == "helpfulness" for p in pairs) <= 230  # equal probability (binomial sd 10)
    with pytest.raises(ValueError, match="data.mixed_ratings"):
        UltraFeedback(rating="mixed", mixed_ratings=["helpfulness", "kindness"])


def test_table1_shows_downstream_metrics_when_present_and_na_otherwise(tmp_path):
    from lpc.experiments.report import write_report

    grid = ["experiment=table1", "scale.models=[tiny]", "sweep.grid.algo=[dpo]", "scale.seeds=[0]"]
    for latent, metrics in (
        ("none", {"lm_eval/arc_challenge/acc": 0.5, "lm_eval/gsm8k/exact_match": 0.25}),
        ("discrete", {}),
    ):
        run_dir = tmp_path / f"algo=dpo,latent={latent},model=tiny,seed=0"
        (run_dir / ".hydra").mkdir(parents=True)
        OmegaConf.save(compose(grid + [f"latent={latent}"]), run_dir / ".hydra" / "config.yaml")
        (run_dir / "metrics.json").write_text(json.dumps({"eval/pref_accuracy": 0.6, "status": "completed", **metrics}))
    summary = write_report(tmp_path)
    assert summary["completed"] == 2 and summary["missing"] == 0
    md = (tmp_path / "report.md").read_text()
    arc = md.split("### ARC-Challenge acc (%)")[1].split("###")[0]
    assert "| tiny | dpo | 50.0 (n=1) | n/a |" in arc and "n/a: completed runs without this metric" in arc
    assert "| tiny | dpo | 25.0 (n=1) | n/a |" in md.split("### GSM8K exact_match (%)")[1]
    assert "| tiny | dpo | 60.0 (n=1) | 60.0 (n=1) | +0.0 |" in md.split("### Preference accuracy (%)")[1]


def test_codebook_curve_tells_the_truth(tmp_path):
    # a CPU-scale codebook sweep with the baseline: codebook none, 8, 32, 64 x seeds 0, 1
    from lpc.experiments.report import SCALE_NOTE, aggregate, curve_figure, published, read_sweep

    grid = ["experiment=codebook", "sweep.grid.codebook=[none,8,32,64]", "scale.seeds=[0,1]"]
    jobs = []
    for k in ("none", "8", "32", "64"):
        for seed in (0, 1):
            run_dir = tmp_path / f"codebook={k},seed={seed}"
            latent = "latent=none" if k == "none" else "latent=discrete"
            cfg = compose([*grid, f"codebook={k}", latent, f"seed={seed}"])
            (run_dir / ".hydra").mkdir(parents=True)
            OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")
            acc = {"none": 0.60, "8": 0.70, "32": 0.74, "64": 0.72}[k] + 0.02 * seed
            (run_dir / "metrics.json").write_text(json.dumps({"eval/pref_accuracy": acc, "status": "completed"}))
            jobs.append({"overrides": {"codebook": k, "seed": str(seed)}, "dir": run_dir.name})
    manifest = {"scale": "cpu", "grid": {"codebook": ["none", 8, 32, 64], "seed": [0, 1]}, "jobs": jobs}
    (tmp_path / "sweep.json").write_text(json.dumps(manifest))
    sweep = read_sweep(tmp_path)
    assert sweep["scale"] == "cpu" and not sweep["missing"]
    fig = curve_figure(sweep, aggregate(sweep), published(sweep["spec"]), "codebook")
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["8", "32", "64"]  # integer K ticks, as run
    ours = ax.containers[0].lines[0]  # the errorbar's data line
    assert list(ours.get_xdata()) == [8.0, 32.0, 64.0] and list(ours.get_ydata()) == [71.0, 75.0, 73.0]
    levels = [line for line in ax.get_lines() if line.get_linestyle() == ":"]
    assert len(levels) == 1 and list(levels[0].get_ydata()) == [61.0, 61.0]  # codebook=none: mean of 60, 62
    assert levels[0].get_color() == ours.get_color()  # one condition, one colour
    spans = [p for p in ax.patches if p.get_label().startswith("paper: peak around K = 32-64")]
    assert len(spans) == 1 and spans[0].get_x() == 32 and spans[0].get_width() == 32
    assert [t.get_text() for t in fig.texts] == [SCALE_NOTE]
