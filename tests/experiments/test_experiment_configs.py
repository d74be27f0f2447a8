"""Every experiment config on disk (conf/experiment/*.yaml: the paper's and the synthetic benchmark's) runs through
lpc-sweep for one tiny step, as lightning-hydra-template runs each of its experiment configs: a new experiment is
covered by adding its file. Each grid value (and each group) trains at least once, so every option an experiment
selects composes, builds and trains; the report then reads the runs. The full grids are only planned (fast tier)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import FIXTURES, compose
from lpc.experiments import sweep
from lpc.experiments.report import write_report

EXPERIMENTS = sweep.experiment_names()
# One optimizer step on a few pairs; no checkpoint but the final one.
TINY = [
    "trainer.max_steps=1",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "trainer.batch_size=2",
    "trainer.eval_batch_size=8",
]
SYNTHETIC_DATA = ["data.n_train=16", "data.n_eval=8"]  # the synthetic generator's sizes
# What an experiment needs beyond TINY to run here, and why.
SCALE = {"rehearsal": "paper"}  # the rehearsal is the paper recipe (its README); the others default to cpu
NEEDS = {
    # one process instead of its 2 nodes x 2 tasks (tests/experiments/test_rehearsal.py runs those on the SLURM cluster), on
    # rows generated in the raw UltraFeedback schema (make rehearsal writes them the same way)
    "rehearsal": ["hardware=cpu", "distributed=none", "data.eval_size=8"]
}


def test_every_experiment_is_found():
    """The paper's experiments and the synthetic benchmark are all experiment configs of the one sweep driver."""
    paper = {"table1", "table2", "codebook", "noise", "continuous", "mixed", "rehearsal"}
    assert paper | {"synthetic_benchmark", "synthetic_pretrained"} <= set(EXPERIMENTS)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_plans_its_runs(experiment, tmp_path):
    """Composes with its sweep node, and lists distinct run directories (the driver's dry run, fast)."""
    opts, extra = sweep.parse_args([f"experiment={experiment}", f"scale={SCALE.get(experiment, 'cpu')}"])
    opts["sweep_dir"] = str(tmp_path)
    p = sweep.plan(opts, extra)
    dirs = [j["dir"] for j in p["jobs"]]
    assert dirs and len(set(dirs)) == len(dirs)
    assert {j["status"] for j in p["jobs"]} == {"missing"}
    assert sweep.multirun_commands(p)


def covering(jobs: list[dict]) -> list[dict]:
    """Few jobs of each group in which every grid value but the seed's appears, at the first seed."""
    chosen, seen = [], set()
    for j in jobs:
        if "seed" in j["overrides"] and j["overrides"]["seed"] != jobs[0]["overrides"].get("seed"):
            continue
        new = {(j["group"], k, v) for k, v in j["overrides"].items()} | {(j["group"], None, None)}
        if new - seen:
            chosen.append(j)
            seen |= new
    return chosen


@pytest.fixture(scope="module")
def rehearsal_rows(tmp_path_factory):
    path = tmp_path_factory.mktemp("rehearsal") / "ultrafeedback.jsonl"
    subprocess.run([sys.executable, str(FIXTURES / "make_fixtures.py"), "--rehearsal", str(path)], check=True)
    return path


@pytest.mark.slow  # ~10 s per multirun call (a process start) and ~4 s per one-step run
@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_one_tiny_step(experiment, tmp_path, rehearsal_rows, capfd):
    scale = SCALE.get(experiment, "cpu")
    # launcher=local: in-process, one after the other. scale=paper selects SLURM, whose controller only the
    # slurm-marked tests start (tests/experiments/test_rehearsal.py submits this experiment there).
    base = [f"experiment={experiment}", f"scale={scale}", "launcher=local"]
    extra = TINY + NEEDS.get(experiment, [])
    if compose(base[:2]).data.name == "synthetic":
        extra += SYNTHETIC_DATA
    if experiment == "rehearsal":
        extra.append(f"data.path={rehearsal_rows}")
    opts, extra = sweep.parse_args(base + extra + ["--sweep-dir", str(tmp_path)])
    p = sweep.plan(opts, extra)
    p["jobs"] = covering(p["jobs"])
    p["steer"] = None  # lpc-steer has its own tests; here the runs themselves
    sweep.write_manifest({**p, "command": "tests/experiments/test_experiment_configs.py"})
    assert sweep.run(sweep.multirun_commands(p), parallel=1) == 0, capfd.readouterr().err[-5000:]
    summary = write_report(tmp_path)
    assert (summary["completed"], summary["failed"], summary["missing"]) == (len(p["jobs"]), 0, 0)
    for j in p["jobs"]:
        assert sweep.run_status(tmp_path / j["dir"]) == "completed", j["dir"]
    assert set(p["groups"]) == {j["group"] for j in p["jobs"]}  # every group ran
