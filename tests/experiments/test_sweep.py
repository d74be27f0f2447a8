"""lpc.experiments.sweep: every experiment composes at both scales (dry run), the grid is covered exactly, and a
rerun runs only the missing/failed runs (resuming the failed one from its checkpoint)."""

from __future__ import annotations

import json
import shlex

import pytest

from conftest import read_metrics

PAPER_JOBS = {  # models x algos x latents x 5 seeds, K x 5, flips x latents x 5, latents x 5, mixtures x latents x 5
    "table1": 3 * 3 * 2 * 5,
    "table2": 3 * 3 * 2 * 5,
    "codebook": 6 * 5,
    "noise": 4 * 2 * 5,
    "continuous": 3 * 5,
    "mixed": 2 * 2 * 5,
}
CPU_JOBS = {"table1": 1 * 3 * 2 * 2, "codebook": 6 * 2, "noise": 4 * 2 * 2, "continuous": 3 * 2, "mixed": 2 * 2 * 2}


@pytest.mark.parametrize("experiment", sorted(PAPER_JOBS))
def test_paper_scale_dry_run_lists_every_job_and_the_sbatch_parameters(experiment, capsys, tmp_path):
    from lpc.experiments.sweep import main

    assert main([f"experiment={experiment}", "scale=paper", "--dry-run", "--sweep-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert f"{PAPER_JOBS[experiment]} jobs: 0 completed" in out
    assert "hydra/launcher=slurm" in out and "SlurmLauncher" in out and "timeout_min:" in out
    listed = [ln for ln in out.splitlines() if ln.startswith("missing ")]
    assert len(listed) == PAPER_JOBS[experiment] == len(set(listed))
    assert not list(tmp_path.iterdir())  # a dry run writes nothing


def test_paper_scale_jobs_are_8_gpu_zero3_jobs_of_the_paper_batch_that_fit(capsys, tmp_path):
    from lpc.experiments.sweep import main

    assert main(["experiment=table1", "scale=paper", "--dry-run", "--sweep-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    # sbatch: one node, one task per GPU, 8 GPUs (from hardware=a100_80g_x8, which the hub models select)
    assert "\nnodes: 1\n" in out and "\ntasks_per_node: 8\n" in out and "\ngpus_per_node: 8\n" in out
    rows = [
        ln.split() for ln in out.splitlines() if ln.strip().endswith(("seed=0", "seed=1", "seed=2", "seed=3", "seed=4"))
    ]
    rows = [r for r in rows if r[0][0].isdigit()]  # the planner's table, not the job list
    assert len(rows) == 90
    for peak, budget, gpus, sharding, batch, gpu_hours, verdict, *job in rows:
        assert (gpus, sharding, batch, verdict) == ("8", "zero3", "128", "fits"), job
        assert 10 < float(peak) <= float(budget) == 72.0 and float(gpu_hours.replace(",", "")) > 1
    assert "90/90 jobs fit" in out and "GPU-hours" in out.splitlines()[-1]


def test_a_sweep_that_does_not_fit_is_refused_before_anything_is_submitted(capsys, tmp_path):
    from lpc.experiments.sweep import main

    # DDP replicates the 16 B/param states of an 8B model on every GPU: no 40 GB GPU holds them
    args = ["experiment=codebook", "scale=paper", "hardware=a100_40g_x8", "distributed=ddp", "--sweep-dir"]
    assert main([*args, str(tmp_path / "sweep"), "launcher=submitit_local"]) == 2
    err = capsys.readouterr().err
    assert "30 of 30 job(s) do not fit a100_40g_x8" in err and "nothing was launched" in err
    assert "add: distributed=zero3" in err
    assert not (tmp_path / "sweep").exists()


def test_cpu_scale_job_counts(capsys, tmp_path):
    from lpc.experiments.sweep import main

    for experiment, n in CPU_JOBS.items():
        assert main([f"experiment={experiment}", "--dry-run", "--sweep-dir", str(tmp_path / experiment)]) == 0
        out = capsys.readouterr().out
        assert "launcher=local" in out and f"{n} jobs: 0 completed" in out, out[:300]


def test_products_cover_exactly_the_runs_to_do():
    from lpc.experiments.spec import expand_grid
    from lpc.experiments.sweep import products

    grid = {"model": ["a", "b"], "algo": ["dpo", "simpo", "ipo"], "seed": [0, 1, 2]}
    jobs = expand_grid(grid)
    assert products(jobs, list(grid)) == [grid]  # a fresh sweep is one multirun call
    todo = [j for j in jobs if j != {"model": "b", "algo": "ipo", "seed": 1}]
    cover = products(todo, list(grid))
    covered = [j for p in cover for j in expand_grid(p)]
    assert sorted(map(str, covered)) == sorted(map(str, todo)) and len(cover) <= 4


def test_baseline_and_codebook_sizes_sweep_without_duplicates(capsys, tmp_path):
    from lpc.experiments.sweep import main

    grid = ["sweep.grid.codebook=[none,8,32]", "scale.seeds=[0,1]"]
    assert main(["experiment=codebook", *grid, "--dry-run", "--sweep-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "6 jobs: 0 completed, 0 failed (resume), 6 missing" in out  # 3 x 2, not (none, discrete) x 3 x 2
    runs = [line.split()[1] for line in out.splitlines() if line.startswith("missing ")]
    assert sorted(runs) == sorted(f"codebook={k},seed={s}" for k in ("none", 8, 32) for s in (0, 1))
    cmds = [shlex.split(line) for line in out.splitlines() if line.startswith("lpc-train ")]
    # one multirun: each job's codebook option selects its own latent (conf/codebook/)
    assert [c[-2:] for c in cmds] == [["codebook=none,8,32", "seed=0,1"]]
    # the run directory is named by the grid alone, and no latent override rides along
    assert not any(a.startswith("latent=") for a in cmds[0])


def test_a_codebook_the_latent_ignores_is_named_before_launch(capsys, tmp_path):
    from lpc.experiments.sweep import main

    grid = ["sweep.grid.codebook=[8]", "scale.seeds=[0]", "latent=continuous"]
    main(["experiment=codebook", *grid, "--dry-run", "--sweep-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert (
        "lpc-sweep: config error, this job will fail: codebook=8,seed=0: codebook=8 (latent.codebook_size=8) is not "
        "allowed with latent=continuous" in err
    ), err


FAST = [
    "sweep.grid.codebook=[2,4]",
    "scale.seeds=[0]",
    "trainer.max_steps=4",
    "trainer.batch_size=8",
    "trainer.eval_batch_size=16",
    "data.n_train=64",
    "data.n_eval=16",
    "trainer.log_every=2",
]


def sweep(sweep_dir, capfd):
    """The driver in-process (it launches the training multirun as a subprocess); returns its stdout."""
    from lpc.experiments.sweep import main

    rc = main(["experiment=codebook", "--sweep-dir", str(sweep_dir), *FAST])
    out, err = capfd.readouterr()
    assert rc == 0, out[-2000:] + err[-3000:]
    return out


@pytest.mark.slow  # ~3 min here: 3 tiny runs, each with the end-of-run analysis (t-SNE) and a process start
def test_rerun_runs_only_the_missing_and_failed(tmp_path, capfd):
    sweep(tmp_path, capfd)
    runs = {k: tmp_path / f"codebook={k},seed=0" for k in (2, 4)}
    assert all(read_metrics(d)["status"] == "completed" for d in runs.values())
    kept = runs[2] / "metrics.json"
    kept_mtime = kept.stat().st_mtime_ns
    (runs[4] / "metrics.json").write_text("{")  # a run killed while writing: no completed metrics.json

    second = sweep(tmp_path, capfd)
    assert "2 jobs: 1 completed, 1 failed" in second
    assert kept.stat().st_mtime_ns == kept_mtime  # the completed run did not run again
    redone = read_metrics(runs[4])
    # ... and the failed one resumed from its last checkpoint (step 4 of 4: nothing left to train)
    assert redone["status"] == "completed" and redone["train/resumed"] is True
    assert redone["train/steps"] == 4 and redone["train/steps_this_session"] == 0
    manifest = json.loads((tmp_path / "sweep.json").read_text())
    assert [j["dir"] for j in manifest["jobs"]] == ["codebook=2,seed=0", "codebook=4,seed=0"]
    md = (tmp_path / "report.md").read_text()
    assert "2 completed, 0 incomplete, 0 failed, 0 missing" in md and (tmp_path / "codebook.png").exists()
