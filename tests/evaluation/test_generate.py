"""Generation from a trained checkpoint: z from the prior or a chosen code (lpc.evaluation.generate)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import REPO, SRC


@pytest.fixture(scope="module")
def lpc_model(tiny_lpc_run):
    from lpc.training.checkpoint import load_checkpoint

    model, tokenizer, cfg = load_checkpoint(tiny_lpc_run)
    return model, tokenizer


PROMPT = "[source_0] Please describe volcanoes."


def generate_cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "lpc.evaluation.generate", *map(str, args)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONPATH": str(SRC)},
    )


def test_prompt_gets_exactly_one_bos(lpc_model):
    from lpc.data import encode_prompt

    _, tok = lpc_model
    for text, chat in ((PROMPT, False), (tok.bos_token + PROMPT, False), (PROMPT, True)):
        ids = encode_prompt(tok, text, chat)
        assert ids[0] == tok.bos_token_id and ids.count(tok.bos_token_id) == 1, (text, chat)
    assert tok.decode(encode_prompt(tok, PROMPT, True)).startswith(tok.bos_token + "<|user|>")


def test_fixed_code_and_seed_is_deterministic(lpc_model):
    from lpc.evaluation.generate import generate

    model, tok = lpc_model
    rng_before = torch.random.get_rng_state()
    a = generate(model, tok, [PROMPT, "[source_1] Please describe rivers."], code=3, seed=7, max_new_tokens=12)
    b = generate(model, tok, [PROMPT, "[source_1] Please describe rivers."], code=3, seed=7, max_new_tokens=12)
    assert [g.token_ids for g in a] == [g.token_ids for g in b] and len(a[0].token_ids) > 0
    assert a[0].z_source == "code 3" and a[0].prior_probs is None
    assert torch.equal(torch.random.get_rng_state(), rng_before)  # the caller's RNG is untouched
    # the prior's z: a distribution over the 8 codes is reported
    p = generate(model, tok, PROMPT, seed=7, max_new_tokens=4)[0]
    assert p.z_source == "prior (expectation)" and p.prior_probs.shape == (8,)
    assert p.prior_probs.sum().item() == pytest.approx(1.0, abs=1e-5)


def test_codes_change_next_token_logits(lpc_model):
    from lpc.data import encode_prompt
    from lpc.evaluation.generate import latent_z
    from lpc.policy import conditioned_on

    model, tok = lpc_model
    ids = torch.tensor([encode_prompt(tok, PROMPT)])

    @torch.no_grad()
    def next_logits(code):
        z, _, _ = latent_z(model, ids, code=code)
        with conditioned_on(model.lm, z):
            return model.lm(input_ids=ids).logits[0, -1]

    # the prior's z at inference: argmax is the most probable code, expectation the probability-weighted mean
    z_arg, probs, source = latent_z(model, ids, inference="argmax")
    assert source == "prior (argmax)" and torch.equal(z_arg, model.latent.codes()[probs.argmax()])
    z_exp, _, _ = latent_z(model, ids, inference="expectation")
    torch.testing.assert_close(z_exp, probs @ model.latent.codes())

    l0, l1, l0_again = next_logits(0), next_logits(1), next_logits(0)
    assert torch.equal(l0, l0_again)
    assert (l0 - l1).abs().max() > 1e-3
    # and the logits are W (h + e_k): the difference is exactly W (e_0 - e_1) (the centring cancels in it)
    head = model.lm.get_output_embeddings()
    diff = head.weight @ (model.latent.codebook[0] - model.latent.codebook[1])
    torch.testing.assert_close(l0 - l1, diff.detach(), rtol=0, atol=1e-4)


def test_baseline_generates_and_rejects_code(lpc_model):
    from lpc.evaluation.generate import GenerateError, generate
    from lpc.policy import PreferenceModel

    model, tok = lpc_model
    baseline = PreferenceModel(model.lm, None)
    out = generate(baseline, tok, PROMPT, seed=1, max_new_tokens=5, greedy=True)[0]
    assert out.z_source == "none" and len(out.token_ids) > 0
    with pytest.raises(GenerateError, match="no latent"):
        generate(baseline, tok, PROMPT, code=0)
    with pytest.raises(GenerateError, match=r"code=8 is not allowed: an integer in \[0, 7\]"):
        generate(model, tok, PROMPT, code=8)
    with pytest.raises(GenerateError, match="inference='mean' is not allowed for a discrete latent"):
        generate(model, tok, PROMPT, inference="mean")


def test_cli_generates_with_a_code_and_rejects_bad_arguments(tiny_lpc_run, lpc_model):
    from lpc.evaluation.generate import generate

    proc = generate_cli(tiny_lpc_run, f"prompt={PROMPT}", "code=2", "greedy=true", "max_new_tokens=8")
    assert proc.returncode == 0, proc.stderr
    model, tok = lpc_model
    expected = generate(model, tok, PROMPT, code=2, greedy=True, max_new_tokens=8)[0].text
    assert "### z: code 2" in proc.stdout and expected in proc.stdout

    bad = generate_cli(tiny_lpc_run, "prompt=hi", "code=8")  # exits before the weights load
    assert bad.returncode == 2 and "code=8 is not allowed: an integer in [0, 7]" in bad.stderr, bad.stderr


@pytest.mark.parametrize(
    "args,message",
    [
        (["prompt=hi", "inference=mean"], "inference='mean' is not allowed for a discrete latent"),
        (["prompt=hi", "temperature=0"], "temperature='0' is not allowed"),
        (["prompt=hi", "top_p=1.5"], "top_p='1.5' is not allowed"),
        (["prompt=hi", "code=two"], "code='two' is not allowed"),
        (["colour=red", "prompt=hi"], "unknown argument 'colour'"),
        ([], "prompt= is required"),
    ],
)
def test_cli_bad_arguments_are_clear_errors(tiny_lpc_run, capsys, args, message):
    from lpc.evaluation.generate import main

    assert main([str(tiny_lpc_run), *args]) == 2
    assert message in capsys.readouterr().err


def test_cli_rejects_a_missing_checkpoint_and_code_on_a_baseline(tmp_path, capsys):
    from lpc.evaluation.generate import main

    assert main([str(tmp_path / "nope"), "prompt=hi"]) == 2
    assert "not a checkpoint" in capsys.readouterr().err
    (tmp_path / "final").mkdir()
    (tmp_path / "final" / "config.json").write_text("{}")  # a baseline checkpoint has no latent.yaml
    assert main([str(tmp_path), "prompt=hi", "code=0"]) == 2
    assert "has no latent" in capsys.readouterr().err


def test_every_command_opens_a_sweep_run_whose_name_has_equals_and_commas(tiny_lpc_run, tmp_path, capsys):
    """Sweep runs are named like ``codebook=8,seed=0``: every post-training command reads such a directory as
    the run, not as an option (one convention: RUN key=value ...)."""
    from lpc.evaluation import export, generate, harness, steering

    run = tmp_path / "sweep" / "codebook=8,seed=0"
    run.parent.mkdir()
    run.symlink_to(tiny_lpc_run, target_is_directory=True)
    assert generate.main([str(run), "prompt=Please describe rivers.", "code=1", "max_new_tokens=3"]) == 0
    assert "### z: code 1" in capsys.readouterr().out
    # the other commands get past argument parsing to the option they reject (not their usage text)
    assert harness.main([str(run), "tasks=bogus_local"]) == 2
    err = capsys.readouterr()
    assert "bogus_local" in err.out + err.err and "options (key=value)" not in err.out
    assert export.main([str(run), "format=bogus"]) != 0
    err = capsys.readouterr()
    assert "bogus" in err.out + err.err
    assert steering.main([str(run), "prompts=bogus"]) == 2
    assert "prompts='bogus' is not allowed" in capsys.readouterr().err


def test_a_sweep_directory_runs_each_command_once_per_completed_run(tiny_lpc_run, tmp_path, capsys):
    import shutil

    from lpc.evaluation import export, harness, steering
    from lpc.training import rundir

    sweep = tmp_path / "sweep"
    for seed in (0, 1):
        run = sweep / f"codebook=8,seed={seed}"
        shutil.copytree(tiny_lpc_run / "final", run / "final")
        shutil.copy(tiny_lpc_run / "metrics.json", run / "metrics.json")
    (sweep / "codebook=8,seed=2").mkdir()  # a run that never finished: skipped
    assert [p.name for p in rundir.run_dirs(sweep)] == ["codebook=8,seed=0", "codebook=8,seed=1"]

    assert export.main([str(sweep), "format=alpaca_eval", "limit=1", "max_new_tokens=2"]) == 0
    wrote = [line for line in capsys.readouterr().out.splitlines() if line.startswith("wrote ")]
    assert len(wrote) == 2
    for seed in (0, 1):
        out = sweep / f"codebook=8,seed={seed}" / "eval" / "alpaca_eval" / "model_outputs.json"
        assert len(json.loads(out.read_text())) == 1
    assert export.main([str(sweep), "format=alpaca_eval", f"out={tmp_path / 'one.json'}"]) == 2  # two runs, one file
    assert "leave out= unset" in capsys.readouterr().err

    assert steering.main([str(sweep), "prompts=2", "samples=1", "max_new_tokens=2"]) == 0
    assert all((sweep / f"codebook=8,seed={s}" / "analysis" / "steering.json").exists() for s in (0, 1))

    assert harness.main([str(sweep), "tasks=arc_easy_local", "limit=2"]) == 0
    out = capsys.readouterr().out
    assert out.count("# ") == 2 and out.count("lm_eval/arc_easy_local/acc=") == 2
    for seed in (0, 1):
        metrics = json.loads((sweep / f"codebook=8,seed={seed}" / "metrics.json").read_text())
        assert metrics["lm_eval/arc_easy_local/n_samples"] == 2 and "eval/pref_accuracy" in metrics


@pytest.mark.parametrize("pool", ["last", "mean"])
def test_the_prior_reads_a_prompt_the_same_in_training_generation_and_batched_inference(lpc_model, pool):
    """``latent.pool`` decides what the prior reads of a prompt; the training batch (right-padded pairs), a single
    prompt (generation, steering) and left-padded prompts (lm-eval, the integrity checks) must give the same z."""
    from lpc.data import PairCollator, encode_prompt
    from lpc.evaluation.generate import latent_z
    from lpc.evaluation.inference import left_pad, prompt_prior_z
    from lpc.policy import hidden_states

    model, tok = lpc_model
    before, model.latent.pool = model.latent.pool, pool
    try:
        prompts = [encode_prompt(tok, p) for p in (PROMPT, "[source_1] Please sketch the old harbors of islands.")]
        assert len(prompts[0]) != len(prompts[1])  # so the padding differs between the paths
        rows = [
            {"prompt_input_ids": p, "chosen_input_ids": [5, 6, 7, 2][: 2 + i], "rejected_input_ids": [8, 2]}
            for i, p in enumerate(prompts)
        ]
        batch = PairCollator(pad_token_id=tok.pad_token_id)(rows)
        with torch.no_grad():
            h_prompt, _, _ = model.latent_inputs(hidden_states(model.lm, batch), batch)
            trained = model.latent.prior_z(h_prompt)
            ids, mask = left_pad(prompts, tok.pad_token_id)
            batched = prompt_prior_z(model.lm, model.latent, ids, mask)
        single = torch.stack([latent_z(model, torch.tensor([p]))[0] for p in prompts])
        assert trained.norm(dim=-1).min() > 0 and (trained[0] - trained[1]).norm() > 1e-4  # z differs by prompt
        torch.testing.assert_close(batched, trained, rtol=0, atol=1e-5)
        torch.testing.assert_close(single, trained, rtol=0, atol=1e-5)
        # and "mean" is not "last": the two read different states
        other = "last" if pool == "mean" else "mean"
        model.latent.pool = other
        with torch.no_grad():
            h_other = model.latent_inputs(hidden_states(model.lm, batch), batch)[0]
            assert (model.latent.prior_z(h_other) - trained).abs().max() > 1e-4
    finally:
        model.latent.pool = before
