"""The dress rehearsal of the paper recipe (experiment=rehearsal, `make rehearsal`, docs/slurm.md) on the local
SLURM cluster: scale=paper's trainer, per-model recipes, raw-UltraFeedback loader, precomputed reference, lpc-sweep
job array and report, with random-init miniatures of Llama-3-8B and Mistral-7B, generated UltraFeedback rows,
2 nodes x 2 CPU tasks per job (DDP over gloo) and a global batch of 8.

One sweep (both models x DPO x without/with LPC: 4 jobs of 4 ranks) is run once for the module; its LPC run of
mini_llama is sent SIGUSR2 mid-training (as SLURM does before a preemption or the time limit) and requeues.
Beside it: the same LPC configuration uninterrupted (a second 1-job sweep) and 1-process runs of the DPO
configurations with the same global batch. The cluster comes from test_slurm's fixture (started here as root
when it is not running; the tests fail, never skip, when it cannot be started).
"""

from __future__ import annotations

import glob
import json
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from test_slurm import JOB_ENV, job_state, sh, slurm_cluster, wait_for  # noqa: F401  (slurm_cluster: a fixture, requested by name)

from conftest import FIXTURES, REPO, compose, read_metrics, run_train

MODELS = ("mini_llama", "mini_mistral")
PREEMPTED = "algo=dpo,latent=discrete,model=mini_llama,seed=0"  # array task 1 (after mini_llama's DPO run)
# lpc-sweep's launcher arguments, as `make rehearsal` passes them; every job: 2 nodes x 2 tasks (hardware=cpu_2x2)
LAUNCHER = [
    "launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=10",
    "hydra.launcher.max_num_timeout=2",
    'hydra.launcher.setup=["export ACCELERATE_USE_CPU=true","export OMP_NUM_THREADS=1"]',
]
# The test's grid: DPO only (SimPO has no reference to share); log every step so that a signal sent after the
# first log line lands early in the 23 steps (logging changes no number).
TEST_GRID = ["sweep.grid.algo=[dpo]", "trainer.log_every=1"]
# The DPO configurations in one process: the same recipe, global batch 8 = batch 2 x accumulation 4
ONE_PROCESS = [
    "experiment=rehearsal",
    "scale=paper",
    "algo=dpo",
    "latent=none",
    "seed=0",
    "hardware=cpu",
    "distributed=none",
]


def sweep_cmd(data: Path, sweep_dir: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "lpc.experiments.sweep",
        "experiment=rehearsal",
        "scale=paper",
        *LAUNCHER,
        f"data.path={data}",
        "--sweep-dir",
        str(sweep_dir),
        *TEST_GRID,
        *extra,
    ]


def finish(proc: subprocess.Popen, what: str, timeout: float) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, f"{what} failed ({proc.returncode}):\n{out[-3000:]}\n{err[-5000:]}"
    return out


def task_logs(sweep_dir: Path, job: str) -> dict[int, str]:
    """Each SLURM task's (rank's) log text, over all its sessions."""
    logs: dict[int, str] = {}
    for path in glob.glob(str(sweep_dir / ".submitit" / job / f"{job}_*_log.*")):
        task = int(re.search(r"_(\d+)_log\.", path).group(1))
        logs[task] = logs.get(task, "") + Path(path).read_text()
    return logs


@pytest.fixture(scope="module")
def rehearsal(request, tmp_path_factory):
    request.getfixturevalue("slurm_cluster")  # the running cluster (test_slurm's session fixture)
    root = tmp_path_factory.mktemp("rehearsal")
    data, cache, cache_one = root / "ultrafeedback.jsonl", root / "cache", root / "cache-1process"
    t0 = time.time()
    subprocess.run(
        [sys.executable, str(FIXTURES / "make_fixtures.py"), "--rehearsal", str(data)], check=True, timeout=60
    )
    env = {**os.environ, **JOB_ENV, "LPC_CACHE_DIR": str(cache)}
    sweep_dir = root / "sweep"
    main = subprocess.Popen(
        sweep_cmd(data, sweep_dir), cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    procs = [main]
    one = {model: root / f"one-{model}" for model in MODELS}
    # While SLURM runs the array: the DPO configurations in 1 process (accumulation 4), with their own cache.
    pool = ThreadPoolExecutor(max_workers=1)
    singles = [pool.submit(run_train, [*ONE_PROCESS, f"model={model}", f"data.path={data}"], one[model],
                           env={**JOB_ENV, "LPC_CACHE_DIR": str(cache_one)}) for model in MODELS]  # fmt: skip
    try:
        # The LPC run of mini_llama: SIGUSR2 to its 4 tasks once it trains, then release the requeued job.
        log = sweep_dir / PREEMPTED / "train_log.jsonl"
        wait_for(lambda: log.exists() and log.read_text().strip(), 300, f"{PREEMPTED} to start training", main)
        job = wait_for(lambda: [p.name for p in (sweep_dir / ".submitit").glob("*_1")], 10, "its job id")[0]
        # To the job's tasks (its step 0, the srun of the training), as SLURM's --signal=USR2@<delay> sends it.
        # (Naming the array task instead, SLURM 22.05 signals it but answers "Job can not be altered now" while
        # later tasks of the array are pending, and scancel signals again on each retry.)
        sh("scancel", "--signal=USR2", f"{job}.0")
        wait_for(lambda: job_state(job) == "PENDING", 60, f"job {job} to be requeued", main)
        sh("scontrol", "update", f"jobid={job}", "StartTime=now+2")  # not "now": see test_slurm
        # The same configuration uninterrupted, in a sweep of its own (its job queues behind the first sweep's).
        uninterrupted = root / "uninterrupted"
        procs.append(
            subprocess.Popen(
                sweep_cmd(data, uninterrupted, "sweep.grid.model=[mini_llama]", "sweep.grid.latent=[discrete]"),
                cwd=REPO,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
        out = finish(main, "the rehearsal sweep", 600)
        finish(procs[1], "the uninterrupted sweep", 300)
        for single in singles:
            single.result(timeout=300)
    finally:
        pool.shutdown(cancel_futures=True)
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
        for d in glob.glob(str(root / "*" / ".submitit" / "*_*")):
            subprocess.run(["scancel", Path(d).name], capture_output=True)
    return {
        "sweep": sweep_dir,
        "out": out,
        "job": job,
        "one": one,
        "uninterrupted": uninterrupted / PREEMPTED,
        "cache": cache,
        "cache_one": cache_one,
        "data": data,
        "wall_s": time.time() - t0,
    }


def runs(sweep: Path) -> dict[str, dict]:
    return {f"{model}/{latent}": read_metrics(sweep / f"algo=dpo,latent={latent},model={model},seed=0")
            for model in MODELS for latent in ("none", "discrete")}  # fmt: skip


def final_weights(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / "model.safetensors"))


@pytest.mark.slurm
@pytest.mark.slow
def test_rehearsal_runs_are_4_rank_jobs_of_the_paper_recipe(rehearsal):
    sweep = rehearsal["sweep"]
    assert "report:" in rehearsal["out"] and "(4 completed, 0 failed/incomplete, 0 missing)" in rehearsal["out"]
    for name, m in runs(sweep).items():
        # one epoch of the 185 training pairs (256 rows less 8 ties, less 63 held out) in global batches of 8
        assert m["status"] == "completed" and m["data/train_pairs"] == 185 and m["data/eval_pairs"] == 63, name
        assert m["train/num_processes"] == 4 and m["train/global_batch_size"] == 8, name
        assert m["train/gradient_accumulation_steps"] == 1 and m["train/steps"] == 185 // 8, name
    # the recipe reached the jobs: trainer=gpu with the rehearsal's swaps, the miniature's own class
    cfg = (sweep / PREEMPTED / ".hydra" / "config.yaml").read_text()
    for line in ("  lr: 0.001", "  max_length: 1024", "  gradient_checkpointing: true", "  beta: 0.1", "  name: ddp"):
        assert f"\n{line}\n" in cfg, line
    assert json.loads((sweep / PREEMPTED / "final" / "config.json").read_text())["architectures"] == [
        "LlamaForCausalLM"
    ]
    mistral = json.loads(
        (sweep / "algo=dpo,latent=none,model=mini_mistral,seed=0" / "final" / "config.json").read_text()
    )
    assert mistral["architectures"] == ["MistralForCausalLM"] and mistral["sliding_window"] == 16
    # one job array of 2-node x 2-task jobs, no GPUs asked for; every task was one rank of 4
    script = next((sweep / ".submitit").glob("*/*_submission.sh")).read_text()
    for line in (
        "#SBATCH --array=0-3%4",
        "#SBATCH --nodes=2",
        "#SBATCH --ntasks-per-node=2",
        "#SBATCH --partition=debug",
    ):
        assert line in script, line
    assert "--gpus-per-node" not in script
    logs = task_logs(sweep, rehearsal["job"])
    assert sorted(logs) == [0, 1, 2, 3]
    assert all(f"SLURM rank {r}/4" in logs[r] for r in range(4))


@pytest.mark.slurm
@pytest.mark.slow
def test_4_ranks_equal_1_process_with_the_same_global_batch(rehearsal):
    """The DPO runs (a deterministic objective): 4 ranks x batch 2 (accumulation 1) = 1 process x batch 2
    (accumulation 4), in metrics and in the weights. (LPC runs sample z from each process's RNG, so their
    4-rank and 1-process runs draw different samples and are not compared.)"""
    from hydra.utils import instantiate

    four = runs(rehearsal["sweep"])
    for model in MODELS:
        m4, m1 = four[f"{model}/none"], read_metrics(rehearsal["one"][model])
        assert (m1["train/num_processes"], m1["train/gradient_accumulation_steps"]) == (1, 4)
        assert m1["train/global_batch_size"] == 8 and m1["train/steps"] == m4["train/steps"]
        for key in ("eval/loss", "eval/pref_accuracy", "eval/margin", "eval/rewards/chosen"):
            assert m4[key] == pytest.approx(m1[key], abs=1e-5), (model, key)
        # the same reference log-probs, computed by 4 ranks and by 1 process into separate caches
        assert m4["ref_logps/key"] == m1["ref_logps/key"]
        # trained, far beyond the tolerance: the margin left 0 (where DPO starts) and the weights moved
        assert m4["eval/margin"] > 0.1 and m4["eval/pref_accuracy"] > 0.75
        init = instantiate(compose([f"model={model}", "seed=0"]).model)[0].state_dict()
        w4 = final_weights(rehearsal["sweep"] / f"algo=dpo,latent=none,model={model},seed=0")
        w1 = final_weights(rehearsal["one"][model])
        assert w4.keys() == w1.keys() <= init.keys()
        moved = max((w1[k] - init[k]).abs().max().item() for k in w1)
        apart = max((w4[k] - w1[k]).abs().max().item() for k in w1)
        assert moved > 1e-2 and apart < 2e-5, (model, moved, apart)
    for model in MODELS:
        (entry,) = [
            p for p in (rehearsal["cache"] / "ref_logps").iterdir() if p.name == four[f"{model}/none"]["ref_logps/key"]
        ]
        (other,) = [p for p in (rehearsal["cache_one"] / "ref_logps").iterdir() if p.name == entry.name]
        from safetensors.torch import load_file

        a, b = load_file(str(entry / "logps.safetensors")), load_file(str(other / "logps.safetensors"))
        for split in ("train", "eval"):
            torch.testing.assert_close(a[split], b[split], atol=1e-4, rtol=1e-6)


@pytest.mark.slurm
@pytest.mark.slow
def test_one_precomputed_reference_per_model_is_shared_by_the_sweep(rehearsal):
    four = runs(rehearsal["sweep"])
    entries = sorted(p.name for p in (rehearsal["cache"] / "ref_logps").iterdir() if not p.name.startswith("."))
    keys = {model: {four[f"{model}/{latent}"]["ref_logps/key"] for latent in ("none", "discrete")} for model in MODELS}
    # each model's two DPO runs (without and with LPC) use one entry; the two models' entries differ
    assert all(len(k) == 1 for k in keys.values()) and keys["mini_llama"] != keys["mini_mistral"]
    assert entries == sorted(k for ks in keys.values() for k in ks)
    for model in MODELS:
        # the array runs in order: the run without LPC computed it, the LPC run (both sessions) found it
        assert four[f"{model}/none"]["ref_logps/cache_hit"] is False
        assert four[f"{model}/discrete"]["ref_logps/cache_hit"] is True
    assert read_metrics(rehearsal["uninterrupted"])["ref_logps/cache_hit"] is True


@pytest.mark.slurm
@pytest.mark.slow
def test_preempted_4_rank_job_checkpoints_on_every_rank_requeues_and_resumes(rehearsal):
    run, job = rehearsal["sweep"] / PREEMPTED, rehearsal["job"]
    m, ref = read_metrics(run), read_metrics(rehearsal["uninterrupted"])
    assert m["train/resumed"] is True and ref["train/resumed"] is False
    assert m["train/num_processes"] == ref["train/num_processes"] == 4
    step = m["train/steps"] - m["train/steps_this_session"]
    assert 0 < step < m["train/steps"], m
    # every rank saw the signal and wrote its part of checkpoints/step-N; rank 0 requeued the job
    logs = task_logs(rehearsal["sweep"], job)
    for rank in range(4):
        assert (
            "received SIGUSR2" in logs[rank] and f"preempted: checkpointing step {step}, then requeueing" in logs[rank]
        )
    assert f"Requeued job {job}" in logs[0]
    ckpt = run / "checkpoints" / f"step-{step}"
    states = [torch.load(ckpt / f"random_states_{r}.pkl", weights_only=False)["torch_manual_seed"] for r in range(4)]
    # each rank's own RNG (its own latent samples), restored on resume
    assert all(not torch.equal(states[i], states[j]) for i in range(4) for j in range(i))

    def sacct_states():
        s = sh("sacct", "-n", "-X", "-D", "-j", job, "-o", "State%20").split()
        return s if s and s[-1] == "COMPLETED" else None

    states = wait_for(sacct_states, 60, "sacct to record COMPLETED")
    assert "REQUEUED" in states and states[-1] == "COMPLETED", states
    # The uninterrupted run's result: the same up to float32 rounding. (Not bit for bit: DDP regroups its
    # gradient all-reduce buckets once, at the second step of a session, so step N+1 of the resumed session sums
    # its gradients in another order than the uninterrupted run did; measured: 5e-8 on eval/loss.)
    for key in ("eval/loss", "eval/pref_accuracy", "eval/margin", "eval/rewards/chosen", "eval/rewards/rejected"):
        assert m[key] == pytest.approx(ref[key], abs=1e-6), (key, m[key], ref[key])
    rows = [json.loads(ln) for ln in (run / "train_log.jsonl").read_text().splitlines()]
    ref_rows = [json.loads(ln) for ln in (rehearsal["uninterrupted"] / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for a, b in zip(rows, ref_rows):
        if "loss" in a:
            same = a["loss"] == b["loss"] if a["step"] <= step else a["loss"] == pytest.approx(b["loss"], abs=1e-6)
            assert same, (a["step"], a["loss"], b["loss"])


@pytest.mark.slurm
@pytest.mark.slow
def test_report_of_the_rehearsal(rehearsal):
    sweep = rehearsal["sweep"]
    md = (sweep / "report.md").read_text()
    assert "4 completed, 0 incomplete, 0 failed, 0 missing" in md
    four = runs(sweep)
    rows = [ln for ln in md.splitlines() if ln.startswith(("| mini_llama | dpo |", "| mini_mistral | dpo |"))]
    assert len(rows) == 2
    for row in rows:
        model = row.split("|")[1].strip()
        for latent in ("none", "discrete"):
            assert f"{100 * four[f'{model}/{latent}']['eval/pref_accuracy']:.1f}" in row, (row, latent)


def test_the_rehearsal_composes_the_paper_recipe_with_its_swaps(capsys, tmp_path):
    """Without a cluster: lpc-sweep's dry run of `make rehearsal`'s command (hydra.launcher.* overrides
    included) lists 8 jobs of 2 nodes x 2 tasks, and each miniature trains with its full-size model's recipe."""
    from lpc.experiments.sweep import main

    args = ["experiment=rehearsal", "scale=paper", *LAUNCHER, "--dry-run", "--sweep-dir", str(tmp_path / "s")]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "8 jobs: 0 completed" in out and "8/8 jobs fit" in out
    assert "\nnodes: 2\n" in out and "\ntasks_per_node: 2\n" in out and "\ngpus_per_node: null\n" in out
    assert "\npartition: debug\n" in out and "\ncpus_per_task: 1\n" in out
    for model, full in (("mini_llama", "llama3_8b"), ("mini_mistral", "mistral7b")):
        for algo in ("dpo", "simpo", "ipo"):
            mini = compose(["experiment=rehearsal", "scale=paper", f"model={model}", f"algo={algo}"])
            paper = compose(["scale=paper", f"model={full}", f"algo={algo}"])
            assert mini.algo == paper.algo, (model, algo)
            assert mini.trainer.lr == 1e-3 and paper.trainer.lr < 1e-6  # the one trainer value swapped
            for key in ("epochs", "max_length", "max_prompt_length", "gradient_checkpointing", "reference_logps"):
                assert mini.trainer[key] == paper.trainer[key], key
            assert (mini.data.name, mini.data.seed, mini.data.rating) == ("ultrafeedback", 0, paper.data.rating)
            assert (mini.hardware.name, mini.distributed.name, mini.trainer.precision) == ("cpu_2x2", "ddp", "no")
    # the miniatures are CPU models: on their own they select neither the GPU trainer nor GPU hardware
    for model in ("mini_llama", "mini_mistral"):
        cfg = compose([f"model={model}"])
        assert (cfg.trainer.precision, cfg.hardware.name) == ("no", "cpu")
