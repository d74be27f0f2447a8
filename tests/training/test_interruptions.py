"""Faults injected from outside, as a cluster or a user causes them: real signals to the real entry point
(SIGKILL, SIGTERM, SIGINT), real corruption of checkpoint files, two processes in one run directory, a
refused rerun. Each ends either refused with a clear message or with metrics.json and train_log.jsonl equal
to an uninterrupted run's, line for line."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import REPO, SRC, read_metrics, run_train

# An LPC run (Gumbel noise each step: the RNG state must come back exactly) crossing an epoch boundary
# (20 steps per epoch), checkpointing every 4 steps and logging every 5, so a stop at any step resumes
# between two log lines.
RUN = [
    "latent=discrete",
    "codebook=4",
    "trainer.max_steps=24",
    "trainer.save_every=4",
    "trainer.keep_checkpoints=3",
    "trainer.log_every=5",
    "trainer.eval_every=0",
    "data.n_train=320",
    "data.n_eval=64",
]
# Fields that describe the session, not the result
SESSION = ("train/wall_time_s", "train/steps_this_session", "train/resumed", "ref_logps/cache_hit")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    run_train(RUN, run_dir)
    return run_dir


def log_lines(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]


def assert_same_as(run_dir: Path, reference: Path, tol: float = 1e-5) -> None:
    """Final metrics and every train_log line equal the uninterrupted run's (1e-5: two uninterrupted LPC
    runs already differ by ~1e-7 relative; a wrong RNG, data position or log average moves them by far more)."""
    m, ref = read_metrics(run_dir), read_metrics(reference)
    assert m["status"] == "completed" and m["train/steps"] == 24
    assert set(m) == set(ref)
    for key, value in ref.items():
        if key in SESSION or isinstance(value, (str, bool)) or value is None:
            continue
        if isinstance(value, (int, float)):
            assert m[key] == pytest.approx(value, rel=tol, abs=tol), key
    lines, ref_lines = log_lines(run_dir), log_lines(reference)
    assert [(r["step"], sorted(r)) for r in lines] == [(r["step"], sorted(r)) for r in ref_lines]
    for r, rr in zip(lines, ref_lines):
        for key, value in rr.items():
            assert r[key] == pytest.approx(value, rel=tol, abs=tol), (r["step"], key)


def start(run_dir: Path, overrides=RUN) -> subprocess.Popen:
    cmd = [sys.executable, str(SRC / "train.py"), *overrides, f"hydra.run.dir={run_dir}"]
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 300, poll: float = 0.05) -> None:
    end = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < end, "timed out"
        time.sleep(poll)


def checkpoint_steps(run_dir: Path) -> list[int]:
    ckpt = run_dir / "checkpoints"
    return sorted(int(p.name[5:]) for p in ckpt.glob("step-*")) if ckpt.is_dir() else []


# --------------------------------------------------------------------------- signals


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_signal_checkpoints_that_step_and_the_rerun_ends_like_an_uninterrupted_run(sig, reference, tmp_path):
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for(lambda: 8 in checkpoint_steps(run_dir), proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + sig, err[-3000:]
    stopped = max(checkpoint_steps(run_dir))
    assert f"stopped by {sig.name} at step {stopped} of 24" in out + err and "Traceback" not in err
    assert stopped > 8 and not (run_dir / "metrics.json").exists()
    run_train(RUN, run_dir)
    m = read_metrics(run_dir)
    assert m["train/resumed"] is True and m["train/steps_this_session"] == 24 - stopped
    assert_same_as(run_dir, reference)


def test_kill_9_during_a_checkpoint_save_leaves_no_half_checkpoint(reference, tmp_path):
    # SIGKILL while the step-12 checkpoint is being written (its temporary directory exists): the
    # rerun resumes from step 8 and ends like the uninterrupted run
    run_dir = tmp_path / "run"
    proc = start(run_dir)
    wait_for(lambda: (run_dir / "checkpoints" / ".tmp-step-12").exists(), proc, poll=0.001)
    proc.kill()
    proc.communicate()
    assert 12 not in checkpoint_steps(run_dir)  # killed before the rename: no step-12 to resume from
    run_train(RUN, run_dir)
    assert_same_as(run_dir, reference)


# --------------------------------------------------------------------------- corrupt checkpoints


def killed_after_checkpoint(run_dir: Path, step: int) -> None:
    """Start the run and kill -9 it once the step-``step`` checkpoint is complete."""
    proc = start(run_dir)
    wait_for(lambda: (run_dir / "checkpoints" / f"step-{step}" / "manifest.json").exists(), proc)
    proc.kill()
    proc.communicate()


CORRUPTIONS = {
    "model truncated": lambda c: truncate(c / "model.safetensors"),
    "optimizer truncated": lambda c: truncate(c / "optimizer.bin"),
    "trainer state emptied": lambda c: (c / "trainer_state.json").write_text(""),
    "RNG state removed": lambda c: (c / "random_states_0.pkl").unlink(),
    "manifest removed, a file removed": lambda c: [(c / "manifest.json").unlink(), (c / "optimizer.bin").unlink()],
}


def truncate(path: Path) -> None:
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)


@pytest.fixture(scope="module")
def killed_at_12(tmp_path_factory) -> Path:
    """A run killed (-9) once its step-12 checkpoint was complete; each corruption test corrupts a copy."""
    run_dir = tmp_path_factory.mktemp("killed") / "run"
    killed_after_checkpoint(run_dir, 12)
    return run_dir


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_a_broken_latest_checkpoint_falls_back_to_the_previous_one(corruption, killed_at_12, reference, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(killed_at_12, run_dir)
    latest = run_dir / "checkpoints" / "step-12"
    CORRUPTIONS[corruption](latest)
    proc = run_train(RUN, run_dir)
    warning = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "is broken" in ln]
    assert warning and str(latest) in warning[0] and "falling back to the previous one" in warning[0]
    assert "resumed from" in proc.stdout + proc.stderr and "step-8" in proc.stdout + proc.stderr
    assert_same_as(run_dir, reference)


# --------------------------------------------------------------------------- one run directory, two processes


def test_a_second_process_in_the_same_run_directory_is_refused(reference, tmp_path):
    run_dir = tmp_path / "run"
    first = start(run_dir)
    wait_for(lambda: (run_dir / "train_log.jsonl").exists(), first)
    # freeze the first (it keeps its lock) so that it cannot finish before the second one starts
    first.send_signal(signal.SIGSTOP)
    try:
        second = run_train(RUN, run_dir, check=False, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 2
    assert f"{run_dir} is in use by pid {first.pid}" in second.stdout + second.stderr
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-3000:]
    assert_same_as(run_dir, reference)  # one log line per step, not two


def test_a_stale_lock_of_a_killed_process_is_taken_over(killed_at_12, reference, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(killed_at_12, run_dir)
    assert (run_dir / ".lock").read_text().startswith("pid ")  # left behind by the killed process
    run_train(RUN, run_dir)
    assert_same_as(run_dir, reference)


# --------------------------------------------------------------------------- refused reruns


def test_a_refused_rerun_leaves_the_finished_runs_record_untouched(reference, tmp_path):
    record = {p.name: p.read_bytes() for p in (reference / ".hydra").iterdir()}
    assert set(record) == {"config.yaml", "hydra.yaml", "overrides.yaml"}
    metrics = (reference / "metrics.json").read_bytes()
    for change in (["algo.beta=0.2"], ["algo.beta=-1"]):  # another config; a config error
        proc = run_train(RUN + change, reference, check=False, timeout=120)
        assert proc.returncode == 2, proc.stderr[-2000:]
        assert "different configuration" in proc.stdout + proc.stderr or "algo.beta=-1" in proc.stdout + proc.stderr
        assert {p.name: p.read_bytes() for p in (reference / ".hydra").iterdir()} == record
        assert (reference / "metrics.json").read_bytes() == metrics


def test_rerunning_a_finished_run_adds_no_second_final_line(reference, tmp_path):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(reference, run_dir)
    (run_dir / ".lock").unlink(missing_ok=True)
    run_train(RUN, run_dir)
    assert_same_as(run_dir, reference)


# --------------------------------------------------------------------------- multirun


def test_a_multirun_runs_past_an_invalid_job(tmp_path):
    small = ["trainer.max_steps=3", "data.n_train=64", "data.n_eval=16"]
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(SRC / "train.py"), "-m", "algo.beta=0.1,-1,0.2", *small, f"hydra.sweep.dir={sweep}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1  # the failure is reported at the end ...
    assert "config error: algo.beta=-1 is not allowed: a number > 0" in proc.stdout + proc.stderr
    assert not (sweep / "1" / "metrics.json").exists()  # ... after the job behind the invalid one ran
    single = tmp_path / "single"
    run_train(["algo.beta=0.2", *small], single)
    for key in ("eval/loss", "eval/margin", "eval/pref_accuracy"):
        assert read_metrics(sweep / "2")[key] == pytest.approx(read_metrics(single)[key], abs=1e-6)
    assert read_metrics(sweep / "0")["status"] == "completed"
    assert log_lines(sweep / "2") == log_lines(single)
