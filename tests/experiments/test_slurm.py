"""A real SLURM: a sweep through hydra/launcher=slurm, a forced preemption + requeue + resume, W&B continuity.

The session fixture starts the single-host cluster with scripts/slurm/setup_local_slurm.sh (as root; it
apt-installs slurm-wlm, slurmdbd, mariadb-server and munge when missing) and stops it at the end.
If the cluster cannot be started the tests fail with the reason; they never skip.
"""

from __future__ import annotations

import csv
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SRC, read_metrics, run_train

pytestmark = pytest.mark.slurm
SCRIPTS = REPO / "scripts" / "slurm"

# A tiny DPO run, long enough (60 steps) that a signal sent after its first log line lands mid-training.
# save_every=0: the only checkpoint a resumed run can find is the one written on the preemption signal.
RUN_ARGS = [
    "trainer.max_steps=60",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "trainer.log_every=5",
    "data.n_train=320",
    "data.n_eval=64",
    "logger=wandb",
    "logger.mode=offline",
]
# One thread per job: the SLURM jobs and the uninterrupted reference run do identical arithmetic.
JOB_ENV = {"OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
LAUNCHER_ARGS = [
    "hydra/launcher=slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.timeout_min=10",
    "hydra.launcher.max_num_timeout=2",
    'hydra.launcher.setup=["export OMP_NUM_THREADS=1"]',
]


def sh(*cmd: str, timeout: float = 30) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


def cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    proc = subprocess.run(["sinfo", "-h", "-p", "debug", "-o", "%t"], capture_output=True, text=True, timeout=10)
    return proc.returncode == 0 and set(proc.stdout.split()) <= {"idle", "mix", "alloc"} and bool(proc.stdout.split())


@pytest.fixture(scope="session")
def slurm_cluster():
    """A running local cluster: reuse one that is up, else start it here (and stop it afterwards)."""
    if cluster_up():
        yield
        return
    if os.geteuid() != 0:
        pytest.fail(
            "the SLURM tests need the local cluster: run them as root (the fixture starts it with "
            "scripts/slurm/setup_local_slurm.sh) or start it first with "
            "`sudo scripts/slurm/setup_local_slurm.sh`"
        )
    proc = subprocess.run(["bash", str(SCRIPTS / "setup_local_slurm.sh")], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0 or not cluster_up():
        subprocess.run(["bash", str(SCRIPTS / "teardown_local_slurm.sh")], capture_output=True, timeout=60)
        pytest.fail(
            f"could not start the local SLURM cluster (scripts/slurm/setup_local_slurm.sh exited "
            f"{proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        )
    try:
        yield
    finally:
        subprocess.run(["bash", str(SCRIPTS / "teardown_local_slurm.sh")], capture_output=True, timeout=120)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None):
    end = time.time() + timeout
    while time.time() < end:
        value = predicate()
        if value:
            return value
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(
                f"the sweep ended ({proc.returncode}) while waiting for {what}:\n{out[-3000:]}\n{err[-3000:]}"
            )
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def job_state(job_id: str) -> str:
    out = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True).stdout
    return out.strip()


@pytest.fixture(scope="module")
def preempted_sweep(slurm_cluster, tmp_path_factory):
    """A 2-job sweep (seed=0,1) on SLURM in which job 0 is signalled mid-training exactly as SLURM does
    before a preemption or time limit (USR2 to the job's tasks), requeues itself and resumes; plus an
    uninterrupted local run of job 0's configuration for comparison."""
    root = tmp_path_factory.mktemp("slurm")
    sweep_dir = root / "sweep"
    t0 = time.time()
    cmd = [
        sys.executable,
        str(SRC / "train.py"),
        "-m",
        *LAUNCHER_ARGS,
        f"hydra.sweep.dir={sweep_dir}",
        "seed=0,1",
        *RUN_ARGS,
    ]
    sweep = subprocess.Popen(
        cmd, cwd=REPO, env={**os.environ, **JOB_ENV}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        # Job 0's first log line means the trainer is in its loop (the preemption guard is installed).
        log0 = sweep_dir / "0" / "train_log.jsonl"
        wait_for(lambda: log0.exists() and log0.read_text().strip(), 150, "job 0 to start training", sweep)
        job0 = wait_for(lambda: [p.name for p in (sweep_dir / ".submitit").glob("*_0")], 10, "job 0's id")[0]
        sh("scancel", "--signal=USR2", job0)  # what SLURM sends signal_delay_s before the end
        # submitit requeued it; SLURM holds a requeued job for 121 s (BeginTime): start it 2 s from now.
        # Not "now": slurmd refuses a job whose credential was revoked (by the requeue) in the same whole
        # second ("Job N already killed, do not launch batch job") and the job ends FAILED.
        wait_for(lambda: job_state(job0) == "PENDING", 60, f"job {job0} to be requeued", sweep)
        sh("scontrol", "update", f"jobid={job0}", "StartTime=now+2")
        # The uninterrupted reference, while the requeued job restarts.
        ref_dir = root / "reference"
        run_train(RUN_ARGS + ["seed=0"], ref_dir, env=JOB_ENV)
        out, err = sweep.communicate(timeout=200)
    finally:
        if sweep.poll() is None:
            sweep.kill()
            sweep.communicate()
            for d in (sweep_dir / ".submitit").glob("*_*"):
                subprocess.run(["scancel", d.name], capture_output=True)
    assert sweep.returncode == 0, f"{' '.join(cmd)} failed ({sweep.returncode}):\n{out[-3000:]}\n{err[-5000:]}"
    return {"sweep_dir": sweep_dir, "ref_dir": ref_dir, "job0": job0, "wall_s": time.time() - t0}


def test_sweep_through_slurm_launcher_completes(preempted_sweep):
    sweep_dir = preempted_sweep["sweep_dir"]
    for num, seed in ((0, 0), (1, 1)):
        m = read_metrics(sweep_dir / str(num))
        assert m["status"] == "completed" and m["train/steps"] == 60
        cfg = (sweep_dir / str(num) / ".hydra" / "config.yaml").read_text()
        assert re.search(rf"^seed: {seed}$", cfg, re.M)
    # The two seeds trained different models (the sweep overrides reached the jobs).
    assert read_metrics(sweep_dir / "0")["eval/loss"] != read_metrics(sweep_dir / "1")["eval/loss"]
    # Both runs are tasks of one job array, with the launcher config's sbatch options.
    script = next((sweep_dir / ".submitit").glob("*/*_submission.sh")).read_text()
    for line in (
        "#SBATCH --array=0-1%2",
        "#SBATCH --partition=debug",
        "#SBATCH --cpus-per-task=1",
        "#SBATCH --signal=USR2@120",
        "#SBATCH --time=10",
        "export OMP_NUM_THREADS=1",
    ):
        assert line in script, line


def test_preempted_job_checkpoints_requeues_and_resumes_to_identical_metrics(preempted_sweep):
    run0, job0 = preempted_sweep["sweep_dir"] / "0", preempted_sweep["job0"]
    m, ref = read_metrics(run0), read_metrics(preempted_sweep["ref_dir"])
    # Resumed from the checkpoint written on the signal (save_every=0: there is no other).
    assert m["train/resumed"] is True and ref["train/resumed"] is False
    done_before = m["train/steps"] - m["train/steps_this_session"]
    assert 0 < done_before < 60, m
    logs = "".join(
        Path(p).read_text() for p in glob.glob(str(preempted_sweep["sweep_dir"] / ".submitit" / job0 / "*log.*"))
    )
    assert f"preempted: checkpointing step {done_before}, then requeueing" in logs
    assert f"Requeued job {job0}" in logs

    # SLURM's accounting saw the requeue (slurmdbd records the final state a few seconds late).
    def sacct_states():
        states = sh("sacct", "-n", "-X", "-D", "-j", job0, "-o", "State%20").split()
        return states if states and states[-1] == "COMPLETED" else None

    try:
        states = wait_for(sacct_states, 60, "sacct to record COMPLETED")
    except AssertionError:
        states = sh("sacct", "-n", "-X", "-D", "-j", job0, "-o", "State%20").split()
    assert "REQUEUED" in states and states[-1] == "COMPLETED", states
    # Exactly the uninterrupted run's result.
    for key in ("eval/pref_accuracy", "eval/margin", "eval/loss", "eval/rewards/chosen", "eval/rewards/rejected"):
        assert m[key] == ref[key], (key, m[key], ref[key])
    log_steps = [json.loads(ln)["step"] for ln in (run0 / "train_log.jsonl").read_text().splitlines()]
    assert log_steps == [
        json.loads(ln)["step"] for ln in (preempted_sweep["ref_dir"] / "train_log.jsonl").read_text().splitlines()
    ]


def test_requeued_run_continues_its_wandb_run_in_the_sweep_group(preempted_sweep):
    sweep_dir = preempted_sweep["sweep_dir"]
    run_id = (sweep_dir / "0" / "wandb_run_id.txt").read_text().strip()
    sessions = sorted(glob.glob(str(sweep_dir / "0" / "wandb" / "offline-run-*")))
    assert len(sessions) == 2 and all(s.endswith("-" + run_id) for s in sessions), sessions
    assert (sweep_dir / "1" / "wandb_run_id.txt").read_text().strip() != run_id
    # The run record (protobuf RunRecord, field 6 = run_group) names the sweep directory as the group.
    group = sweep_dir.name.encode()
    for run in ("0", "1"):  # the last session (a preempted session's file may hold only its header)
        record = Path(
            sorted(glob.glob(str(sweep_dir / run / "wandb" / "offline-run-*" / "run-*.wandb")))[-1]
        ).read_bytes()
        assert b"\x32" + bytes([len(group)]) + group in record, f"run {run} is not in W&B group {group!r}"


def test_report_over_the_slurm_sweep(preempted_sweep):
    """The report reads the SLURM sweep (one of whose jobs was preempted and requeued) like any other:
    one configuration over seeds 0 and 1, aggregated to their mean, nothing missing or failed."""
    sweep = preempted_sweep["sweep_dir"]
    proc = subprocess.run(
        [sys.executable, "-m", "lpc.experiments.report", str(sweep)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )
    assert proc.returncode == 0, proc.stderr
    assert "2 completed, 0 failed/incomplete, 0 missing" in proc.stdout
    accs = [100 * read_metrics(sweep / n)["eval/pref_accuracy"] for n in ("0", "1")]
    rows = list(csv.DictReader((sweep / "report.csv").open()))
    (row,) = [r for r in rows if r["metric"] == "pref_accuracy"]
    assert int(row["n"]) == 2
    assert float(row["mean"]) == pytest.approx(sum(accs) / 2, abs=1e-3)
    assert "0 incomplete, 0 failed, 0 missing" in (sweep / "report.md").read_text()


def test_two_node_ddp_job_equals_one_process_with_the_same_global_batch(slurm_cluster, tmp_path):
    """distributed=ddp on 2 SLURM nodes x 1 task (gloo on CPU: ACCELERATE_USE_CPU): each task becomes a
    rank through submitit's distributed environment (lpc.training.distributed.setup_process_env), and the result
    equals one process with the doubled batch."""
    common = [
        "trainer.max_steps=20",
        "trainer.save_every=0",
        "trainer.eval_every=0",
        "data.n_train=320",
        "data.n_eval=64",
        "trainer.precision=no",
    ]
    sweep_dir = tmp_path / "ddp"
    cmd = [
        sys.executable,
        str(SRC / "train.py"),
        "-m",
        "hydra/launcher=slurm",
        "hydra.launcher.partition=debug",
        "hydra.launcher.nodes=2",
        "hydra.launcher.tasks_per_node=1",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=10",
        'hydra.launcher.setup=["export ACCELERATE_USE_CPU=true","export OMP_NUM_THREADS=1"]',
        "distributed=ddp",
        "trainer.batch_size=8",
        *common,
        f"hydra.sweep.dir={sweep_dir}",
    ]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=420, env={**os.environ, **JOB_ENV})
    assert proc.returncode == 0, f"{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    ranks = "".join(Path(p).read_text() for p in glob.glob(str(sweep_dir / ".submitit" / "*" / "*_log.*")))
    assert "SLURM rank 0/2" in ranks and "SLURM rank 1/2" in ranks
    ddp = read_metrics(sweep_dir / "0")
    assert ddp["train/num_processes"] == 2
    ref_dir = tmp_path / "one"
    run_train(["trainer.batch_size=16", *common], ref_dir, env=JOB_ENV)
    one = read_metrics(ref_dir)
    assert one["train/num_processes"] == 1
    for key in ("eval/pref_accuracy", "eval/loss", "eval/margin"):
        assert ddp[key] == pytest.approx(one[key], abs=1e-5), key
