"""Faults that must never end in a completed run with wrong results: a non-finite loss or gradient stops
the run at that step (or skips the step when asked to), and result files honour the user's umask."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from conftest import FAST, first_batch, make_trainer, read_metrics, run_train


def poison(trainer):
    with torch.no_grad():
        trainer.model.lm.get_output_embeddings().weight[0, 0] = float("nan")


def test_nonfinite_step_stops_the_run(tmp_path):
    t = make_trainer([], tmp_path)
    poison(t)
    with pytest.raises(FloatingPointError, match=r"non-finite training step 1: loss \[nan\], grad norm nan"):
        t.train_step()


def test_nonfinite_step_is_skipped_when_asked(tmp_path):
    t = make_trainer(["trainer.on_nonfinite=skip_step"], tmp_path)
    poison(t)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    assert t.train_step() == {} and t.step == 1 and t.skipped_steps == 1
    for n, p in t.model.named_parameters():  # no update reached any weight (the poisoned one stays NaN)
        assert torch.equal(p.detach().isnan(), before[n].isnan()) and torch.equal(
            p.nan_to_num(), before[n].nan_to_num()
        ), n
    assert first_batch(t) is not None


@pytest.mark.parametrize(
    "override,key",
    [("trainer.lr=inf", "trainer.lr"), ("algo.beta=inf", "algo.beta"), ("latent.kl_weight=nan", "latent.kl_weight")],
)
def test_infinite_or_nan_hyperparameters_are_config_errors(tmp_path, override, key):
    proc = run_train(["latent=discrete", override], tmp_path, check=False, timeout=120)
    assert proc.returncode == 2 and f"{key}=" in proc.stdout + proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "metrics.json").exists()


def test_result_files_honour_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        run_train(FAST + ["trainer.max_steps=4", "latent=discrete", "codebook=4"], tmp_path)
    finally:
        os.umask(old)
    assert read_metrics(tmp_path)["status"] == "completed"
    files = [
        tmp_path / "metrics.json",
        tmp_path / "final" / "model.safetensors",
        tmp_path / "final" / "latent.safetensors",
        *(tmp_path / "checkpoints").rglob("*.safetensors"),
        *(tmp_path / "analysis").glob("*.png"),
    ]
    assert len(files) >= 5
    for f in files:
        mode = stat.S_IMODE(f.stat().st_mode)
        assert mode & 0o044 == 0o044, f"{f} is {oct(mode)}: not readable by group and others under umask 022"
