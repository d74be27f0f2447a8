"""End-to-end training: it learns, writes its outputs, resumes exactly after a crash, accumulates
gradients like a larger batch, trains the real SmolLM2 offline and logs to W&B offline."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, REPO, SRC, compose, read_metrics, run_train

TRL_TRAIN_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
    "grad_norm",
    "learning_rate",
)
EVAL_KEYS = ("eval/pref_accuracy", "eval/loss", "eval/margin")


def with_overrides(base: list[str], extra: list[str]) -> list[str]:
    """``base`` with the keys ``extra`` sets replaced (Hydra rejects a key given twice)."""
    keys = {e.split("=", 1)[0] for e in extra}
    return [b for b in base if b.split("=", 1)[0] not in keys] + extra


def log_rows(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]


# --------------------------------------------------------------------------- (a) a short run learns


def test_short_run_learns_and_writes_its_outputs(tiny_dpo_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = read_metrics(tiny_dpo_run)
    # 40 steps of DPO on the synthetic pairs reach 0.77 held-out accuracy (64 pairs) here; chance is 0.5
    assert m["eval/pref_accuracy"] >= 0.7, m
    assert m["eval/margin"] > 0.2
    assert m["train/steps"] == 40 and m["status"] == "completed" and m["train/resumed"] is False
    assert 0 < m["train/wall_time_s"] < 600
    assert m["data/train_pairs"] == 320 and m["data/eval_pairs"] == 64

    lm = AutoModelForCausalLM.from_pretrained(tiny_dpo_run / "final")
    tok = AutoTokenizer.from_pretrained(tiny_dpo_run / "final")
    ids = tok("Please describe rivers.", return_tensors="pt")["input_ids"]
    assert lm(ids).logits.shape == (1, ids.shape[1], len(tok))

    rows = log_rows(tiny_dpo_run)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [10, 20, 30, 40]
    for r in train_rows:
        assert set(TRL_TRAIN_KEYS) <= set(r), set(TRL_TRAIN_KEYS) - set(r)
    # the policy moves away from the reference: the logged margin grows
    assert train_rows[-1]["rewards/margins"] > train_rows[0]["rewards/margins"] + 0.2
    assert rows[-1]["eval/pref_accuracy"] == m["eval/pref_accuracy"]  # the final evaluation is logged too


# --------------------------------------------------------------------------- (b) resume after a crash


def crash_then_resume(overrides: list[str], run_dir: Path, crash_after: int = 30) -> dict:
    """Run until a hard exit after step ``crash_after`` (last checkpoint at step 20), then rerun the
    same command in the same run directory."""
    args = with_overrides(overrides, ["trainer.save_every=20"])
    crashed = run_train(
        args, run_dir, check=False, script=[str(Path(__file__).parents[1] / "crash_after.py"), str(crash_after)]
    )
    assert crashed.returncode == 3, crashed.stderr[-3000:]
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "final").exists()
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-20"]
    assert max(r["step"] for r in log_rows(run_dir)) == crash_after
    run_train(args, run_dir)
    m = read_metrics(run_dir)
    assert m["train/resumed"] is True and m["train/steps"] == 40 and m["train/steps_this_session"] == 20
    return m


def assert_same_run(run_dir: Path, reference_dir: Path, tol: float = 1e-6):
    m, ref = read_metrics(run_dir), read_metrics(reference_dir)
    for key in EVAL_KEYS:
        assert m[key] == pytest.approx(ref[key], abs=tol), (key, m[key], ref[key])
    # every logged training row (steps 10 and 20 from before the crash, 30 and 40 after it) matches,
    # and the rows the crashed session wrote after its last checkpoint were dropped
    rows = [r for r in log_rows(run_dir) if "loss" in r]
    ref_rows = [r for r in log_rows(reference_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == [10, 20, 30, 40]
    for r, rr in zip(rows, ref_rows):
        for key in ("loss", "rewards/margins", "grad_norm", "learning_rate"):
            assert r[key] == pytest.approx(rr[key], abs=tol, rel=tol), (r["step"], key)


@pytest.mark.slow
def test_dpo_resume_matches_uninterrupted_run_and_keeps_the_wandb_run(tiny_dpo_run, tmp_path):
    run_dir = tmp_path / "run"
    # W&B offline rides along: the logger does not change what is computed (not in the fingerprint)
    crash_then_resume(FAST + ["logger=wandb", "logger.mode=offline"], run_dir)
    assert_same_run(run_dir, tiny_dpo_run)
    # (e) both sessions logged offline under the run directory, into one W&B run id
    run_id = (run_dir / "wandb_run_id.txt").read_text().strip()
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline), offline
    assert all((p / f"run-{run_id}.wandb").stat().st_size > 0 for p in offline)


@pytest.mark.slow
def test_lpc_discrete_resume_matches_uninterrupted_run(tiny_lpc_run, tmp_path):
    # Gumbel-softmax noise is drawn every step: equality needs the RNG state restored exactly
    run_dir = tmp_path / "run"
    crash_then_resume(FAST + ["latent=discrete", "codebook=8"], run_dir)
    # Two uninterrupted LPC runs already differ by float noise (~1e-7 relative in the logged rows, seen
    # before any resume; the DPO path is bit-exact), so 1e-5 here; a wrong RNG or data position after
    # the resume moves these values by orders of magnitude more.
    assert_same_run(run_dir, tiny_lpc_run, tol=1e-5)


# --------------------------------------------------------------------------- (c) gradient accumulation


def train_in_process(overrides: list[str], run_dir: Path) -> tuple[dict, list[dict]]:
    from lpc.run import build_trainer

    cfg = compose(
        [
            "data.n_train=64",
            "data.n_eval=16",
            "trainer.max_steps=3",
            "trainer.warmup_steps=0",
            "trainer.lr=0.5",
            "trainer.log_every=1",
            "trainer.eval_every=0",
            "trainer.save_every=0",
            "trainer.reference_logps=on_the_fly",
            *overrides,
        ]
    )
    run_dir.mkdir(parents=True)
    trainer = build_trainer(cfg, run_dir)[0]
    trainer.train()
    params = {k: v.detach().clone() for k, v in trainer.accelerator.unwrap_model(trainer.model).lm.state_dict().items()}
    return params, log_rows(run_dir)


# Plain SGD, so the weights after a step differ exactly by lr x the gradient difference (Adam's first
# steps are ~lr x sign(g) and would magnify float noise in near-zero gradients).
SGD = ["trainer.optimizer._target_=torch.optim.SGD", "~trainer.optimizer.betas"]


def test_gradient_accumulation_equals_the_larger_batch(tmp_path):
    big, big_log = train_in_process(
        [*SGD, "trainer.batch_size=16", "trainer.gradient_accumulation_steps=1"], tmp_path / "a"
    )
    acc, acc_log = train_in_process(
        [*SGD, "trainer.batch_size=8", "trainer.gradient_accumulation_steps=2"], tmp_path / "b"
    )
    small, _ = train_in_process([*SGD, "trainer.batch_size=8", "trainer.gradient_accumulation_steps=1"], tmp_path / "c")
    # the same step set as a global batch: accumulation 2 derived from 16 pairs / (8 x 1 process)
    derived, _ = train_in_process(
        [*SGD, "trainer.batch_size=8", "trainer.global_batch_size=16", "trainer.gradient_accumulation_steps=null"],
        tmp_path / "d",
    )

    def max_diff(p, q):
        return max((p[k] - q[k]).abs().max().item() for k in p)

    print("max |big - accumulated| =", max_diff(big, acc), " max |big - small| =", max_diff(big, small))
    assert max_diff(big, acc) < 1e-6
    assert max_diff(acc, derived) == 0.0
    assert max_diff(big, small) > 1e-3  # the control: a different batch gives visibly different weights
    for r, q in zip([r for r in big_log if "loss" in r], [r for r in acc_log if "loss" in r]):
        assert r["loss"] == pytest.approx(q["loss"], abs=1e-5)
        assert r["grad_norm"] == pytest.approx(q["grad_norm"], rel=1e-4)


# --------------------------------------------------------------------------- (d) the real SmolLM2


@pytest.mark.slow
def test_smollm2_trains_offline(tmp_path):
    from transformers import AutoModelForCausalLM

    run_dir = tmp_path / "run"
    # tiny batches and lengths: a 135M model step on CPU takes seconds
    run_train(
        [
            "model=smollm2",
            "trainer.max_steps=2",
            "trainer.batch_size=1",
            "trainer.eval_batch_size=4",
            "data.n_train=4",
            "data.n_eval=4",
            "trainer.max_length=32",
            "trainer.max_prompt_length=16",
            "trainer.save_every=0",
            "trainer.eval_every=0",
            "trainer.log_every=1",
        ],
        run_dir,
        env={"HF_HUB_OFFLINE": "1"},
    )
    m = read_metrics(run_dir)
    assert m["train/steps"] == 2 and m["data/eval_pairs"] == 4
    assert (4 * m["eval/pref_accuracy"]).is_integer()  # a fraction of exactly the 4 eval pairs
    rows = [r for r in log_rows(run_dir) if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    # step 1 scores with the policy still equal to the reference: every DPO margin is 0, the loss ln 2
    assert rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-4)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["grad_norm"]])).all() for r in rows)
    assert rows[1]["learning_rate"] > 0  # a real update happened (step 1 is the warm-up step at lr 0)
    lm = AutoModelForCausalLM.from_pretrained(run_dir / "final")
    assert lm.config.model_type == "llama" and lm.num_parameters() > 100_000_000
    # the exported weights moved away from the offline SmolLM2 they started from
    from safetensors import safe_open

    from lpc.backbones import default_cache_dir

    with safe_open(str(default_cache_dir() / "models" / "SmolLM2-135M-Instruct" / "model.safetensors"), "pt") as f:
        start = f.get_tensor("model.norm.weight")
    assert not torch.equal(lm.model.norm.weight.detach(), start)


def wandb_records(run_file: Path):
    """The records of an offline W&B run file (run-*.wandb): LevelDB-log framing (32 KiB blocks of
    crc32/length/type chunks after a 7-byte header) around wandb's protobuf ``Record``s."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, buf = run_file.read_bytes(), 7, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a chunk header is padding
            pos += 32768 - pos % 32768
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk, pos = data[pos + 7 : pos + 7 + length], pos + 7 + length
        if kind in (1, 2):  # full, first
            buf = chunk
        elif kind in (3, 4):  # middle, last
            buf += chunk
        else:
            break
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def test_wandb_run_holds_every_metric_and_is_named_by_its_overrides(tmp_path):
    sweep = tmp_path / "sweep"
    overrides = [*FAST, "trainer.max_steps=10", "codebook=4", "logger=wandb", "logger.mode=offline"]
    proc = subprocess.run(
        [sys.executable, str(SRC / "train.py"), "-m", *overrides, f"hydra.sweep.dir={sweep}"],
        cwd=REPO, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = read_metrics(sweep / "0")
    (run_file,) = (sweep / "0" / "wandb").glob("offline-run-*/run-*.wandb")
    summary, history, names = {}, [], []
    for record in wandb_records(run_file):
        kind = record.WhichOneof("record_type")
        if kind == "summary":
            summary.update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.summary.update})
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item})
        elif kind == "run":
            names.append(record.run.display_name)
    assert set(metrics) - set(summary) == set()  # train/*, data/*, latent diagnostics: all of metrics.json
    for key in ("eval/pref_accuracy", "train/steps", "data/train_pairs", "eval/pref_accuracy/z_zero"):
        assert summary[key] == metrics[key]
    # a sweep job is named by its overrides (Hydra's override_dirname), not by its number
    job = "codebook=4,data.n_eval=64,data.n_train=320,logger.mode=offline,logger=wandb,"
    job += "trainer.eval_every=0,trainer.log_every=10,trainer.max_steps=10,trainer.save_every=0"
    assert names and names[-1] == job
    logged = [h for h in history if "logits/chosen" in h]  # TRL's names, every log step
    assert len(logged) == 1 and isinstance(logged[0]["logits/rejected"], float)


def test_a_log_file_gets_timed_phase_lines_and_no_carriage_returns(tmp_path):
    # stdout/stderr are pipes here, as in a SLURM log: no bar residue, a line per long phase instead
    cache = {"LPC_CACHE_DIR": str(tmp_path / "cache")}  # an empty cache: the reference log-probs are computed
    proc = run_train([*FAST, "trainer.max_steps=10", "codebook=4"], tmp_path / "run", env=cache)
    out = proc.stdout + proc.stderr
    assert "\r" not in out
    for phase in ("reference log-probs: ", "final evaluation (", "final analysis (", "checkpoint step-10: done in"):
        assert phase in out, out[-3000:]
    assert f"export {tmp_path / 'run' / 'final'}: done in" in out
