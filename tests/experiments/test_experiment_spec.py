"""lpc.experiments.spec (an experiment's runs from its sweep node) and what the driver does with groups: each group is
its own multirun in its own directory, named by the grid values alone; sweep.steer picks the completed runs it
matches; the reporter finds a group's missing runs. By hand, on small definitions."""

from __future__ import annotations

import json
import shlex

import pytest

from lpc.errors import ConfigError
from lpc.experiments import spec, sweep

SWEEP = {
    "name": "toy",
    "grid": {"seed": [0, 1]},
    "groups": {
        "headline": {"overrides": ["data.conflict=1.0"], "grid": {"latent": ["none", "discrete"]}},
        "ablation": {"overrides": ["latent=discrete", "latent.hard=false"]},
    },
    "steer": {"match": {"group": "headline", "latent": "discrete"}, "options": ["prompts=16"]},
}


def test_groups_are_a_union_of_products_each_in_its_directory():
    jobs = spec.jobs(SWEEP)
    assert [j["dir"] for j in jobs] == [
        "headline/latent=none,seed=0",
        "headline/latent=none,seed=1",
        "headline/latent=discrete,seed=0",
        "headline/latent=discrete,seed=1",
        "ablation/seed=0",
        "ablation/seed=1",
    ]
    assert spec.groups(SWEEP)["headline"] == {
        "grid": {"latent": ["none", "discrete"], "seed": [0, 1]},  # the group's keys first, the seed last
        "overrides": ["data.conflict=1.0"],
    }
    assert [spec.matches(j, SWEEP["steer"]["match"]) for j in jobs] == [False, False, True, True, False, False]
    # without groups: the grid alone, in the sweep directory itself
    assert [j["dir"] for j in spec.jobs({"grid": {"flip": [0.0, 0.5]}})] == ["flip=0.0", "flip=0.5"]


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"grid": {}}, "sweep.grid is empty and sweep.groups is not set"),
        ({"grid": {"seed": []}}, "sweep.grid={'seed': []} is not allowed"),
        ({"grid": {"seed": [0]}, "groups": {"a": {"grid": {"seed": [1]}}}}, "sweep.groups.a.grid repeats ['seed']"),
        ({"grid": {"seed": [0]}, "groups": {"a": {"overides": []}}}, "sweep.groups.a has ['overides']"),
        ({"groups": {"a": {"overrides": ["flip=0.1"]}}}, "sweep.groups.a has no grid and sweep.grid is empty"),
    ],
)
def test_a_bad_definition_names_the_key(bad, message):
    with pytest.raises(ConfigError) as err:
        spec.jobs(bad)
    assert message in str(err.value)


def test_the_synthetic_benchmark_is_one_multirun_per_group(capsys, tmp_path):
    """The dry run of make benchmark-synthetic: 150 runs in 8 groups, each group one lpc-train -m call into its own
    directory, whose fixed overrides stay out of the run directory's name."""
    assert sweep.main(["experiment=synthetic_benchmark", "--dry-run", "--sweep-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "150 jobs: 0 completed, 0 failed (resume), 150 missing" in out
    cmds = [shlex.split(line) for line in out.splitlines() if line.startswith("lpc-train ")]
    assert len(cmds) == 8
    flips = next(c for c in cmds if any(a.endswith("/flip-nomarker") for a in c))
    excluded = next(a for a in flips if a.startswith("hydra.job.config.override_dirname.exclude_keys="))
    assert excluded.endswith("=[experiment,scale,data.conflict,data.visibility,flip,data.flip_marker]")
    assert flips[-2:] == ["latent=none,discrete", "seed=0,1,2,3,4,5,6,7,8,9"]
    assert "missing    flip-nomarker/latent=discrete,seed=9" in out
    assert "lpc-steer RUN prompts=16 samples=4" in out
    assert not list(tmp_path.iterdir())


def test_steer_runs_on_the_completed_matching_runs_without_steering(tmp_path):
    p = {"sweep_dir": str(tmp_path), "steer": SWEEP["steer"], "jobs": spec.jobs(SWEEP)}
    for j in p["jobs"]:
        (tmp_path / j["dir"]).mkdir(parents=True)
        (tmp_path / j["dir"] / "metrics.json").write_text(json.dumps({"status": "completed"}))
    (tmp_path / "headline/latent=discrete,seed=1/metrics.json").write_text(json.dumps({"status": "running"}))
    cmds = sweep.steer_commands(p)
    assert [c[len(sweep.STEER) :] for c in cmds] == [[str(tmp_path / "headline/latent=discrete,seed=0"), "prompts=16"]]
    (tmp_path / "headline/latent=discrete,seed=0/analysis").mkdir()
    (tmp_path / "headline/latent=discrete,seed=0/analysis/steering.json").write_text("{}")
    assert sweep.steer_commands(p) == []  # a rerun does not steer again


def test_the_report_lists_a_groups_missing_runs(tmp_path):
    from lpc.experiments.report import read_sweep

    p = {"sweep_dir": str(tmp_path), "jobs": spec.jobs(SWEEP)}
    for j in p["jobs"][:-1]:
        (tmp_path / j["dir"]).mkdir(parents=True)
        (tmp_path / j["dir"] / "metrics.json").write_text(json.dumps({"status": "completed"}))
    manifest = {"grid": SWEEP["grid"], "jobs": p["jobs"], "command": "lpc-sweep experiment=toy"}
    (tmp_path / "sweep.json").write_text(json.dumps(manifest))
    swept = read_sweep(tmp_path)
    assert swept["missing"] == [{"seed": "1"}] and swept["command"] == "lpc-sweep experiment=toy"
