"""LPC: the latent module, its integration in the trainer, save/load, and config errors."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import FAST, compose, evaluate_loaded, first_batch, make_trainer, read_metrics, run_train


# ---------------------------------------------------------------------- helpers
# ---------------------------------------------------------------------- KL
def test_categorical_kl_matches_hand_computation():
    from lpc.latent import categorical_kl

    # row 0: q = (1/4, 3/4), p = (1/2, 1/2): KL = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.1308120
    # row 1: q = (1/4, 1/2, 1/4), p = (1/4, 1/4, 1/2): KL = 1/2 ln 2 + 1/4 ln(1/2) = 1/4 ln 2 = 0.1732868
    q0, p0 = torch.tensor([[0.0, math.log(3)]]), torch.tensor([[5.0, 5.0]])  # logits: shifts do not matter
    q1, p1 = torch.tensor([[0.0, math.log(2), 0.0]]), torch.tensor([[1.0, 1.0, 1.0 + math.log(2)]])
    assert categorical_kl(q0, p0).item() == pytest.approx(0.1308120, abs=1e-6)
    assert categorical_kl(q1, p1).item() == pytest.approx(0.1732868, abs=1e-6)
    assert categorical_kl(q1, q1).item() == pytest.approx(0.0, abs=1e-7)


def test_gaussian_kl_matches_hand_computation():
    from lpc.latent import gaussian_kl

    # KL(N(mu_q, s_q^2) || N(mu_p, s_p^2)) = 1/2 [ln(s_p^2/s_q^2) + (s_q^2 + (mu_q - mu_p)^2)/s_p^2 - 1]
    # dim 0: q = N(1, 1), p = N(0, 4): 1/2 [ln 4 + 2/4 - 1] = 0.4431472
    # dim 1: q = N(0, 2), p = N(1, 1): 1/2 [ln(1/2) + 3 - 1] = 0.6534264
    mu_q, lv_q = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, math.log(2)]])
    mu_p, lv_p = torch.tensor([[0.0, 1.0]]), torch.tensor([[math.log(4), 0.0]])
    assert gaussian_kl(mu_q[:, :1], lv_q[:, :1], mu_p[:, :1], lv_p[:, :1]).item() == pytest.approx(0.4431472, abs=1e-6)
    assert gaussian_kl(mu_q, lv_q, mu_p, lv_p).item() == pytest.approx(0.4431472 + 0.6534264, abs=1e-6)


def test_latent_forward_kl_is_the_heads_kl():
    from lpc.latent import DiscreteLatent, categorical_kl

    torch.manual_seed(0)
    lat = DiscreteLatent(hidden_size=8, codebook_size=5)
    hx, hw, hl = torch.randn(3, 4, 8).unbind(0)
    out = lat(hx, hw, hl, progress=0.3)
    expected = categorical_kl(lat.posterior(torch.cat([hw, hl], -1)), lat.prior(hx))
    torch.testing.assert_close(out.kl, expected)
    assert out.z.shape == (4, 8) and out.metrics["latent/g"].item() == pytest.approx(0.3)


# ---------------------------------------------------------------------- the g schedule
def test_mixing_weight_schedules():
    from lpc.latent import mixing_weight

    assert [mixing_weight(p, "linear") for p in (0.0, 0.25, 1.0)] == [0.0, 0.25, 1.0]
    # rises only between mix_start and mix_end
    assert [mixing_weight(p, "linear", start=0.2, end=0.6) for p in (0.1, 0.4, 0.8)] == pytest.approx([0.0, 0.5, 1.0])
    # half cosine: 1/2 (1 - cos(pi t))
    assert mixing_weight(0.25, "cosine") == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))  # 0.1464
    assert mixing_weight(0.5, "cosine") == pytest.approx(0.5)
    assert mixing_weight(0.3, "cosine", start=0.3, end=0.5) == 0.0
    assert mixing_weight(0.5, "cosine", start=0.3, end=0.5) == pytest.approx(1.0)
    assert [mixing_weight(p, "constant", value=0.3) for p in (0.0, 0.7, 1.0)] == [0.3, 0.3, 0.3]
    with pytest.raises(ValueError, match="mix_schedule"):
        mixing_weight(0.5, "bogus")


def test_logged_g_follows_the_linear_schedule(tiny_lpc_run):
    """The trainer's progress is step / (total - 1): with 40 steps logged every 10, the logged g is the
    mean of step/39 over the 10 steps of the window."""
    rows = [json.loads(ln) for ln in (tiny_lpc_run / "train_log.jsonl").read_text().splitlines()]
    g = {r["step"]: r["latent/g"] for r in rows if "latent/g" in r}
    assert g[10] == pytest.approx(4.5 / 39, abs=1e-6)
    assert g[40] == pytest.approx(34.5 / 39, abs=1e-6)


# ---------------------------------------------------------------------- the exact relation to DPO
def test_lpc_dpo_with_one_zero_code_and_no_kl_is_exactly_dpo(tmp_path):
    """K = 1 makes q = p = (1) (KL = 0) and every Gumbel-softmax weight 1, so z = e_1; with e_1 = 0 the
    policy is the unconditioned LM. Loss and LM gradients must equal plain DPO's bit for bit."""
    dpo = make_trainer([], tmp_path / "dpo")
    lpc = make_trainer(["latent=discrete", "latent.codebook_size=1", "latent.kl_weight=0"], tmp_path / "lpc")
    with torch.no_grad():
        lpc.model.latent.codebook.zero_()
    batch = first_batch(dpo)
    for p in (0.0, 0.5, 1.0):
        for t in (dpo, lpc):
            t.optimizer.zero_grad(set_to_none=True)
        loss_dpo, m_dpo, _ = dpo.compute_loss(batch, progress=p)
        loss_lpc, m_lpc, _ = lpc.compute_loss(batch, progress=p)
        loss_dpo.backward(), loss_lpc.backward()
        assert torch.equal(loss_dpo, loss_lpc)
        assert m_lpc["latent/kl"].item() == 0.0
        for key in ("rewards/chosen", "rewards/rejected", "logps/chosen"):
            assert torch.equal(m_dpo[key], m_lpc[key])
        grads = [(n, a.grad, b.grad) for (n, a), b in zip(dpo.model.lm.named_parameters(), lpc.model.lm.parameters())]
        assert all(ga is not None for _, ga, _ in grads)
        for name, ga, gb in grads:
            assert torch.equal(ga, gb), name
    # ... and the relation is not vacuous: a non-zero code changes the loss
    with torch.no_grad():
        lpc.model.latent.codebook.normal_(0, 1.0)
    assert not torch.equal(dpo.compute_loss(batch, 0.5)[0], lpc.compute_loss(batch, 0.5)[0])


# ---------------------------------------------------------------------- gradients reach the latent module
def _grads(trainer, batch, progress):
    trainer.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    trainer.compute_loss(batch, progress)[0].backward()
    lat = trainer.model.latent

    def norm(module_or_param):
        ps = (
            [module_or_param] if isinstance(module_or_param, torch.nn.Parameter) else list(module_or_param.parameters())
        )
        return sum(float(p.grad.abs().sum()) if p.grad is not None else 0.0 for p in ps)

    return {
        "codebook": norm(lat.codebook),
        "prior": norm(lat.prior),
        "posterior": norm(lat.posterior),
        "lm": norm(trainer.model.lm),
    }


def test_gradients_reach_codebook_prior_and_posterior(tmp_path):
    t = make_trainer(["latent=discrete", "codebook=4"], tmp_path / "a")
    batch = first_batch(t)
    g = _grads(t, batch, progress=0.5)  # g = 0.5: both samples enter z, and the KL term is on
    assert all(v > 0 for v in g.values()), g
    # Without the KL term, the schedule decides which head gets the policy's gradient:
    t0 = make_trainer(["latent=discrete", "codebook=4", "latent.kl_weight=0"], tmp_path / "b")
    at_start, at_end = _grads(t0, batch, progress=0.0), _grads(t0, batch, progress=1.0)
    assert at_start["posterior"] > 0 and at_start["prior"] == 0.0 and at_start["codebook"] > 0
    assert at_end["prior"] > 0 and at_end["posterior"] == 0.0 and at_end["codebook"] > 0


def test_continuous_latent_gradients_and_kl(tmp_path):
    t = make_trainer(["latent=continuous"], tmp_path / "c")
    batch = first_batch(t)
    g = _grads_continuous(t, batch)
    assert g["prior"] > 0 and g["posterior"] > 0


def _grads_continuous(trainer, batch):
    trainer.optimizer.zero_grad(set_to_none=True)
    loss, metrics, _ = trainer.compute_loss(batch, 0.5)
    loss.backward()
    lat = trainer.model.latent
    assert metrics["latent/kl"].item() >= 0.0
    return {
        k: sum(float(p.grad.abs().sum()) for p in getattr(lat, k).parameters() if p.grad is not None)
        for k in ("prior", "posterior")
    }


# ---------------------------------------------------------------------- cost: backbone forwards per step
def count_backbone_forwards(trainer, steps=2):
    from lpc.policy import backbone_of

    calls = {"policy": 0, "reference": 0}
    hooks = [
        backbone_of(trainer.model.lm).register_forward_hook(
            lambda *_: calls.__setitem__("policy", calls["policy"] + 1)
        ),
        backbone_of(trainer.ref_model).register_forward_hook(
            lambda *_: calls.__setitem__("reference", calls["reference"] + 1)
        ),
    ]
    trainer.evaluate = lambda *a, **k: ({}, {}) if k.get("return_pairs") else {}  # count training steps only
    trainer.total_steps = steps
    try:
        trainer.train()
    finally:
        for h in hooks:
            h.remove()
    return calls


@pytest.mark.parametrize(
    "latent",
    [[], ["latent=discrete", "codebook=4"], ["latent=continuous"]],
    ids=["dpo", "lpc_discrete", "lpc_continuous"],
)
def test_backbone_forwards_per_step_equal_dpo(tmp_path, latent):
    """DPO: one policy pass and one reference pass per micro-batch (chosen and rejected stacked).
    LPC reads h_x and h_{x,y} from that same policy pass: the counts must not change."""
    t = make_trainer(latent + ["trainer.gradient_accumulation_steps=2"], tmp_path)
    assert count_backbone_forwards(t, steps=2) == {"policy": 4, "reference": 4}


# ---------------------------------------------------------------------- z positions
def test_z_positions_response_and_all_score_the_same(tmp_path):
    """z enters only at the LM head (logits = W (h + z)), and the hidden states do not depend on z, so
    adding z at prompt positions changes only prompt-position logits, which no loss reads: the scored
    log-probs are the same. generation's hook (conditioned_on, z at every position) must agree too."""
    from lpc.policy import conditioned_on

    t = make_trainer(["latent=discrete", "codebook=4"], tmp_path)
    model, batch = t.model, first_batch(t)
    with torch.no_grad():
        model.latent.codebook.normal_(0, 1.0)  # codes large enough to matter
        model.latent.z_positions = "response"
        resp = model(batch, latent_mode="prior")
        model.latent.z_positions = "all"
        full = model(batch, latent_mode="prior")
        torch.testing.assert_close(resp.logps, full.logps, rtol=0, atol=1e-4)
        # the z-conditioned full forward, as generation runs it
        z = torch.cat([resp.latent.z, resp.latent.z])
        with conditioned_on(model.lm, z):
            logits = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        lp = logits.float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        torch.testing.assert_close((lp * batch["response_mask"][:, 1:]).sum(1), resp.logps, rtol=0, atol=1e-4)
        # and z does matter: without it the scores differ
        model.latent.codebook.zero_()
        assert (model(batch, latent_mode="prior").logps - resp.logps).abs().max() > 1e-2


# ---------------------------------------------------------------------- save / load round trip
def reload_and_evaluate(run_dir):
    """Reload final/ with load_checkpoint and evaluate on the eval set built as run.build_datasets does."""
    from lpc.training.checkpoint import load_checkpoint

    model, tokenizer, cfg = load_checkpoint(run_dir)
    return model, evaluate_loaded(model, tokenizer, cfg, run_dir)


EVAL_KEYS = ("eval/pref_accuracy", "eval/margin", "eval/loss", "eval/rewards/chosen", "eval/rewards/rejected")


def test_lpc_checkpoint_reload_reproduces_eval_metrics(tiny_lpc_run):
    from lpc.latent import DiscreteLatent

    model, metrics = reload_and_evaluate(tiny_lpc_run)
    assert isinstance(model.latent, DiscreteLatent) and model.latent.codebook_size == 8
    saved = read_metrics(tiny_lpc_run)
    assert {k: metrics[k] for k in EVAL_KEYS} == {k: saved[k] for k in EVAL_KEYS}
    assert saved["eval/pref_accuracy"] > 0.6  # the run learned something (chance is 0.5)


# The one documented loading call, in a process that has seen nothing of the run (docs: README "After training").
FRESH = """
import json, sys
sys.path.insert(0, sys.argv[2])
from lpc.evaluation.pretrained import LPCPolicy
from conftest import evaluate_loaded

policy = LPCPolicy.from_pretrained(sys.argv[1])
out = {"metrics": evaluate_loaded(policy.model, policy.tokenizer, policy.run_config, sys.argv[1])}
out["code"] = policy.generate(PROMPT, code=1, greedy=True, max_new_tokens=12)[0].token_ids
out["prior"] = policy.generate(PROMPT, greedy=True, max_new_tokens=12)[0].token_ids
print(json.dumps(out))
"""
PROMPT = "[source_0] Please describe rivers."


def test_one_call_loads_a_saved_lpc_policy_in_a_fresh_process(tiny_lpc_run, tmp_path):
    from lpc.evaluation.generate import generate
    from lpc.evaluation.pretrained import LPCPolicy
    from lpc.training.checkpoint import load_checkpoint

    policy = LPCPolicy.from_pretrained(tiny_lpc_run)  # a run directory: its final/
    assert policy.latent.codebook_size == 8 and not policy.chat_template
    saved = tmp_path / "policy"
    policy.save_pretrained(saved)  # the checkpoint layout plus a model card
    assert (saved / "latent.safetensors").exists() and "library_name: lpc" in (saved / "README.md").read_text()

    script = FRESH.replace("PROMPT", repr(PROMPT))
    tests_dir = str(Path(__file__).parents[1])  # where conftest (and its evaluate_loaded) lives
    proc = subprocess.run([sys.executable, "-c", script, str(saved), tests_dir], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    fresh = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = read_metrics(tiny_lpc_run)
    assert {k: fresh["metrics"][k] for k in EVAL_KEYS} == {k: expected[k] for k in EVAL_KEYS}
    model, tokenizer, _ = load_checkpoint(tiny_lpc_run)  # the run's own final/, loaded the low-level way
    by_code = generate(model, tokenizer, PROMPT, code=1, greedy=True, max_new_tokens=12)[0].token_ids
    by_prior = generate(model, tokenizer, PROMPT, greedy=True, max_new_tokens=12)[0].token_ids
    assert fresh["code"] == by_code and fresh["prior"] == by_prior and len(by_code) > 0


@pytest.fixture(scope="module")
def tiny_continuous_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("tiny_continuous")
    run_train(FAST + ["latent=continuous"], run_dir)
    return run_dir


def test_continuous_run_trains_and_reloads(tiny_continuous_run):
    from lpc.latent import ContinuousLatent

    saved = read_metrics(tiny_continuous_run)
    assert saved["status"] == "completed" and saved["eval/pref_accuracy"] > 0.6
    rows = [json.loads(ln) for ln in (tiny_continuous_run / "train_log.jsonl").read_text().splitlines()]
    assert any("latent/kl" in r for r in rows)
    model, metrics = reload_and_evaluate(tiny_continuous_run)
    assert isinstance(model.latent, ContinuousLatent)
    assert {k: metrics[k] for k in EVAL_KEYS} == {k: saved[k] for k in EVAL_KEYS}


# ---------------------------------------------------------------------- config errors
BAD_LATENT_OPTIONS = [
    ("latent.codebook_size=0", "latent.codebook_size"),
    ("latent.codebook_size=2.5", "latent.codebook_size"),  # codebook=K outside the group: test_config
    ("latent.temperature=0", "latent.temperature"),
    ("latent.temperature_min=-1", "latent.temperature_min"),
    ("latent.kl_weight=-1", "latent.kl_weight"),
    ("latent.kl_weight=abc", "latent.kl_weight"),  # not a number: the key, not a TypeError
    ("latent.mix_schedule=bogus", "latent.mix_schedule"),
    ("latent.mix_start=2", "latent.mix_start"),
    ("latent.inference=bogus", "latent.inference"),
    ("latent.codebook_init=bogus", "latent.codebook_init"),
    ("latent.center=bogus", "latent.center"),
    ("latent.pool=first", "latent.pool"),
    ("latent.running_momentum=0", "latent.running_momentum"),
    ("latent.lr_multiplier=0", "latent.lr_multiplier"),
]


@pytest.mark.parametrize("override,key", BAD_LATENT_OPTIONS)
def test_bad_latent_options_are_config_errors_naming_the_key(override, key):
    """In-process: validate builds the latent (on the meta device) and its constructor refuses the value."""
    from lpc.config import validate
    from lpc.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        validate(compose(["latent=discrete", override]))
    assert key in str(err.value) and "not allowed" in str(err.value)


def test_a_bad_latent_option_stops_the_entry_point_before_any_model_loads(tmp_path):
    proc = run_train(["latent=discrete", "latent.temperature=0"], tmp_path, check=False, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "latent.temperature=" in out and "is not allowed" in out, out
    assert not (tmp_path / "final").exists() and not (tmp_path / "metrics.json").exists()
    assert not (tmp_path / "checkpoints").exists()


# ---------------------------------------------------------------------- making z act: the mechanisms
def test_codebook_is_calibrated_to_the_hidden_state_norm(tmp_path):
    """codebook_init=hidden: every code has norm scale x ||final norm weight|| (sqrt(d) = sqrt(128) for the
    tiny model's initial RMSNorm); codebook_init=normal keeps N(0, scale^2) entries."""
    from lpc.policy import expected_hidden_norm

    t = make_trainer(["latent=discrete", "codebook=4", "latent.codebook_init_scale=0.5"], tmp_path / "a")
    assert expected_hidden_norm(t.model.lm) == pytest.approx(math.sqrt(128), rel=1e-6)
    norms = t.model.latent.codebook.detach().norm(dim=-1)
    torch.testing.assert_close(norms, torch.full((4,), 0.5 * math.sqrt(128)))
    t2 = make_trainer(
        ["latent=discrete", "codebook=64", "latent.codebook_init=normal", "latent.codebook_init_scale=0.02"],
        tmp_path / "b",
    )
    assert t2.model.latent.codebook.detach().std().item() == pytest.approx(0.02, rel=0.05)


@pytest.mark.parametrize(
    "options,rates",
    [
        ([], [1e-3, 1e-2, 3e-3]),  # the defaults: the codes' own rate, the heads' own
        # a multiple of the LM's
        (["latent.lr=null", "latent.lr_multiplier=10", "latent.head_lr=null"], [1e-3, 1e-2, 1e-2]),
        (["latent.lr=3e-2", "latent.head_lr=null"], [1e-3, 3e-2, 3e-2]),  # its own rate (lr_multiplier not read)
        (["latent.lr=3e-2", "latent.head_lr=1e-4", "latent.lr_multiplier=10"], [1e-3, 3e-2, 1e-4]),
    ],
)
def test_latent_parameters_get_their_own_learning_rate(tmp_path, options, rates):
    """Three groups: the LM, what z is made of (codes, gate) and the prior/posterior heads."""
    t = make_trainer(
        [
            "latent=discrete",
            "codebook=4",
            "trainer.lr=1e-3",
            "trainer.warmup_steps=0",
            "trainer.lr_scheduler=constant",
            *options,
        ],
        tmp_path,
    )
    groups = t.optimizer.param_groups
    assert [g["lr"] for g in groups] == pytest.approx(rates)
    lat = t.model.latent
    heads = {id(p) for p in [*lat.prior.parameters(), *lat.posterior.parameters()]}
    assert {id(p) for p in groups[1]["params"]} == {id(lat.codebook), id(lat.gate)}
    assert {id(p) for p in groups[2]["params"]} == heads
    assert not {id(p) for p in lat.parameters()} & {id(p) for p in groups[0]["params"]}


def test_temperature_annealing_and_kl_warmup_by_hand():
    from lpc.latent import annealed_temperature, kl_warmup_weight

    assert annealed_temperature(0.5, 1.0, None) == 1.0
    # exponential: tau_0 (tau_min / tau_0)^p
    assert annealed_temperature(0.0, 2.0, 0.5) == pytest.approx(2.0)
    assert annealed_temperature(0.5, 2.0, 0.5) == pytest.approx(1.0)
    assert annealed_temperature(1.0, 2.0, 0.5) == pytest.approx(0.5)
    assert kl_warmup_weight(0.1, 0.05, 0.0) == 0.05
    assert kl_warmup_weight(0.1, 0.05, 0.4) == pytest.approx(0.0125)
    assert kl_warmup_weight(0.8, 0.05, 0.4) == pytest.approx(0.05)


def test_free_bits_charge_no_kl_below_the_threshold():
    from lpc.losses import lpc_objective

    base, kl = torch.tensor([0.5, 1.0]), torch.tensor([0.02, 0.4], requires_grad=True)
    # KL 0.02 is charged as 0.1 (and gets no gradient), KL 0.4 as itself
    out = lpc_objective(base, kl, 0.05, free_bits=0.1)
    torch.testing.assert_close(out, torch.tensor([0.5 + 0.05 * 0.1, 1.0 + 0.05 * 0.4]))
    out.sum().backward()
    torch.testing.assert_close(kl.grad, torch.tensor([0.0, 0.05]))


def test_trainer_loss_is_base_plus_warmed_up_lambda_times_kl(tmp_path):
    """compute_loss adds lambda(progress) * KL per pair to the base loss of the same z."""
    t = make_trainer(["latent=discrete", "codebook=4", "latent.kl_weight=0.2", "latent.kl_warmup=0.5"], tmp_path)
    batch = first_batch(t)
    for progress, lam in ((0.25, 0.1), (0.75, 0.2)):
        torch.manual_seed(0)
        loss, metrics, (cr, rr, lat) = t.compute_loss(batch, progress)
        torch.manual_seed(0)
        out = t.model(batch, progress=progress)
        base = t._algo_output(out.logps, out.n_tokens, t._reference_logps(batch)).losses
        torch.testing.assert_close(loss, (base + lam * out.latent.kl).mean())
        assert metrics["latent/kl_weight"].item() == pytest.approx(lam)
        assert out.latent.kl.abs().sum() > 0  # the term is not vacuous


# ---------------------------------------------------------------------- the z ablations
def score_eval_set_by_hand(t, z_of):
    """Margins (chosen - rejected reward) of the whole eval set in one batch, z = ``z_of(latent_output)``."""
    from lpc.policy import hidden_states

    n = len(t.eval_dataset)
    batch = t._to_device(t.collate([t.eval_dataset[i] for i in range(n)]))
    with torch.no_grad():
        model = t.model
        hidden = hidden_states(model.lm, batch)
        lat = model.latent(*model.latent_inputs(hidden, batch), mode="prior")
        res = t._algo_output(*model.score(hidden, batch, z_of(lat)), t._reference_logps(batch))
    return res.chosen_rewards - res.rejected_rewards


def test_z_ablations_are_exact_when_z_cannot_matter(tmp_path):
    """With every code zero, z = 0, a shuffled z and the posterior's code all score like the prior's z:
    no decision changes. With the codes at the hidden state's scale (as built) and a prior that puts
    softmax([9, 0, 0, 0]) on every prompt, each ablation's margins and the diagnostics equal a recomputation."""
    from lpc.evaluation.analysis import latent_diagnostics

    t = make_trainer(["latent=discrete", "codebook=4"], tmp_path, n_eval=64)
    codebook = t.model.latent.codebook.detach().clone()  # calibrated: rows of the hidden state's norm
    with torch.no_grad():
        t.model.latent.codebook.zero_()
    m, pairs = t.evaluate(return_pairs=True, diagnostics=True)
    d = latent_diagnostics(pairs)
    margin = pairs["chosen_rewards"] - pairs["rejected_rewards"]
    for name in ("z_zero", "z_shuffled", "z_posterior"):
        torch.testing.assert_close(pairs[f"margin/{name}"], margin)
        assert d[f"eval/pref_accuracy/{name}"] == m["eval/pref_accuracy"]
    assert d["eval/latent/decisions_changed"] == 0.0 and d["eval/latent/inert"] == 1.0
    assert d["eval/latent/z_norm"] == 0.0
    with torch.no_grad():
        t.model.latent.codebook.copy_(codebook)
        t.model.latent.prior[-1].weight.zero_()
        t.model.latent.prior[-1].bias.copy_(torch.tensor([9.0, 0.0, 0.0, 0.0]))
    m2, pairs = t.evaluate(return_pairs=True, diagnostics=True)
    d = latent_diagnostics(pairs)
    z = torch.tensor([9.0, 0.0, 0.0, 0.0]).softmax(-1) @ codebook  # the same z for every prompt
    prior_margin = score_eval_set_by_hand(t, lambda lat: z.expand_as(lat.z))
    torch.testing.assert_close(pairs["chosen_rewards"] - pairs["rejected_rewards"], prior_margin)
    torch.testing.assert_close(pairs["margin/z_zero"], margin)  # z = 0 whatever the codebook
    torch.testing.assert_close(pairs["margin/z_shuffled"], prior_margin)  # every prompt has the same z
    post = score_eval_set_by_hand(t, lambda lat: codebook[lat.posterior_probs.argmax(-1)])
    torch.testing.assert_close(pairs["margin/z_posterior"], post)
    assert (prior_margin - margin).abs().max() > 1e-3  # z at this scale moves the margins
    changed = ((margin > 0) != (prior_margin > 0)).float().mean().item()
    assert d["eval/latent/decisions_changed"] == pytest.approx(changed)
    assert d["eval/latent/inert"] == float(changed < 0.01)
    assert m2["eval/pref_accuracy"] == pytest.approx((prior_margin > 0).float().mean().item())
    assert d["eval/pref_accuracy/z_zero"] == pytest.approx((margin > 0).float().mean().item())
    assert d["eval/latent/z_norm"] == pytest.approx(z.norm().item(), rel=1e-5)


def test_shuffled_z_is_another_prompts_prior_z(tmp_path):
    """Row i of the shuffled ablation is scored with the prior z of row perm[i] (perm seeded by the
    trainer's seed): recompute every row by hand. The codes stay as built (the hidden state's norm); the
    prior's last layer is scaled up so that prompts pick different codes, as a trained prior does."""
    # pool=last: the random-init tiny model's mean-pooled prompts are too alike for an untrained prior to tell apart
    t = make_trainer(["latent=discrete", "codebook=4", "latent.pool=last"], tmp_path, n_eval=16)
    with torch.no_grad():
        t.model.latent.prior[-1].weight.mul_(200.0)
    _, pairs = t.evaluate(return_pairs=True, diagnostics=True)
    perm = torch.randperm(16, generator=torch.Generator().manual_seed(t.cfg.seed))
    shuffled = score_eval_set_by_hand(t, lambda lat: lat.z[perm])
    own = score_eval_set_by_hand(t, lambda lat: lat.z)
    torch.testing.assert_close(pairs["margin/z_shuffled"], shuffled)
    torch.testing.assert_close(pairs["chosen_rewards"] - pairs["rejected_rewards"], own)
    assert (shuffled - own).abs().max() > 1e-3  # an unshuffled z would fail the first check


# ---------------------------------------------------------------------- the method's terms through the trainer
def test_continuous_kl_through_the_trainer_is_the_heads_gaussian_kl(tmp_path):
    """The KL compute_loss adds is gaussian_kl of the posterior's and the prior's (mu, logvar) heads."""
    from lpc.latent import gaussian_kl
    from lpc.policy import hidden_states

    t = make_trainer(["latent=continuous", "latent.kl_weight=0.3"], tmp_path)
    lat = t.model.latent
    with torch.no_grad():  # heads away from their zero init, so the KL is not trivially 0
        for head in (lat.prior, lat.posterior):
            head[-1].weight.normal_(0, 0.05)
    batch = first_batch(t)
    torch.manual_seed(0)
    out = t.model(batch, progress=0.5)
    with torch.no_grad():
        h_x, h_w, h_l = t.model.latent_inputs(hidden_states(t.model.lm, batch), batch)
        mu_q, lv_q = lat._params(lat.posterior, lat.combine(h_w, h_l))
        mu_p, lv_p = lat._params(lat.prior, h_x)
    expected = gaussian_kl(mu_q, lv_q, mu_p, lv_p)
    torch.testing.assert_close(out.latent.kl, expected)
    assert expected.min() > 1e-3
    torch.manual_seed(0)
    loss, _, _ = t.compute_loss(batch, 0.5)
    base = t._algo_output(out.logps, out.n_tokens, t._reference_logps(batch)).losses
    torch.testing.assert_close(loss, (base + 0.3 * expected).mean())


@pytest.mark.parametrize("algo", ["simpo", "ipo"])
def test_lpc_simpo_and_ipo_train_through_the_trainer(tmp_path, algo):
    """LPC with the other two algorithms: the loss is the algorithm's own loss of the z-conditioned
    log-probs plus lambda KL (checked against the pure loss functions), and a few steps update the
    latent's parameters."""
    from lpc.losses import ipo_loss, simpo_loss

    t = make_trainer([f"algo={algo}", "latent=discrete", "codebook=4"], tmp_path)
    batch = first_batch(t)
    torch.manual_seed(0)
    out = t.model(batch, progress=0.3)
    half = out.logps.shape[0] // 2
    if algo == "simpo":
        avg = out.logps / out.n_tokens
        base = simpo_loss(avg[:half], avg[half:], t.algo.beta, t.algo.gamma).losses
    else:
        ref_sum, ref_n = t._reference_logps(batch)
        pol, ref = out.logps / out.n_tokens, ref_sum / ref_n  # IPO length-normalises by default
        base = ipo_loss(pol[:half], pol[half:], ref[:half], ref[half:], t.algo.tau).losses
    torch.manual_seed(0)
    loss, _, _ = t.compute_loss(batch, 0.3)
    torch.testing.assert_close(loss, (base + 0.05 * out.latent.kl).mean())
    before = t.model.latent.codebook.detach().clone()
    for _ in range(3):
        t.train_step()
    assert not torch.equal(before, t.model.latent.codebook.detach())


# ---------------------------------------------------------------------- where z enters
def test_z_before_the_final_norm_scores_like_generation_and_differs_from_the_head(tmp_path):
    """latent.z_injection=pre_norm: logits = W norm(h_pre + z). The training scorer must equal a full forward
    under conditioned_on(at="pre_norm") (what generation and the harness run), zero codes must give the
    unconditioned policy, and non-zero codes must score differently from z at the LM head."""
    from lpc.policy import conditioned_on

    t = make_trainer(["latent=discrete", "codebook=4", "latent.z_injection=pre_norm"], tmp_path / "a")
    model, batch = t.model, first_batch(t)
    with torch.no_grad():
        out = model(batch, latent_mode="prior")
        z = torch.cat([out.latent.z, out.latent.z])
        with conditioned_on(model.lm, z, at="pre_norm"):
            logits = model.lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        lp = logits.float().log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
        torch.testing.assert_close((lp * batch["response_mask"][:, 1:]).sum(1), out.logps, rtol=0, atol=1e-4)
        model.latent.z_injection = "head"
        at_head = model(batch, latent_mode="prior").logps
        assert (at_head - out.logps).abs().max() > 1e-2
        model.latent.z_injection = "pre_norm"
        model.latent.codebook.zero_()
        plain = make_trainer([], tmp_path / "b").model(batch).logps
        torch.testing.assert_close(model(batch, latent_mode="prior").logps, plain, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------- LPC-SimPO and LPC-IPO through the trainer
@pytest.mark.parametrize("algo", ["simpo", "ipo"])
def test_lpc_simpo_and_ipo_losses_by_hand_through_the_trainer(algo, tmp_path):
    """compute_loss = mean over pairs of the algorithm's loss on the z-conditioned (length-averaged)
    log-probs, plus lambda x KL, each written out here from the paper's formulas."""
    from lpc.policy import hidden_states, response_logps

    overrides = [f"algo={algo}", "latent=discrete", "codebook=4", "latent.kl_weight=0.3", "trainer.warmup_steps=0"]
    t = make_trainer(overrides, tmp_path)
    with torch.no_grad():
        t.model.latent.codebook.normal_(0, 1.0)  # codes that move the log-probs
    batch = first_batch(t)
    torch.manual_seed(0)
    loss, metrics, _ = t.compute_loss(batch, progress=0.5)
    torch.manual_seed(0)  # the same Gumbel draws: the same z
    with torch.no_grad():
        out = t.model(batch, progress=0.5, latent_mode="train")
    half = out.logps.shape[0] // 2
    avg = out.logps / out.n_tokens
    if algo == "simpo":  # -log sigmoid(beta/|y_w| log pi(y_w|x,z) - beta/|y_l| log pi(y_l|x,z) - gamma)
        beta, gamma = t.algo.beta, t.algo.gamma
        base = -torch.nn.functional.logsigmoid(beta * (avg[:half] - avg[half:]) - gamma)
    else:  # (h - 1/(2 tau))^2, h the per-token-averaged log-ratio margin against the reference
        with torch.no_grad():
            ref = response_logps(t.ref_model, hidden_states(t.ref_model, batch), batch)[0] / out.n_tokens
        h = (avg[:half] - ref[:half]) - (avg[half:] - ref[half:])
        base = (h - 1 / (2 * t.algo.tau)) ** 2
    assert out.latent.kl.abs().sum() > 0 and metrics["latent/kl_weight"].item() == pytest.approx(0.3)
    expected = (base + 0.3 * out.latent.kl).mean()
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
    # and it learns: one optimizer step on this batch lowers the loss
    t.optimizer.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    t.compute_loss(batch, progress=0.5)[0].backward()
    t.optimizer.step()
    torch.manual_seed(0)
    assert t.compute_loss(batch, progress=0.5)[0].item() < loss.item()


def test_trl_logits_metrics_by_hand(tmp_path):
    # TRL's logits/chosen and logits/rejected: the mean logit over the responses' tokens and the vocabulary,
    # here recomputed from the full LM output with z added to every position's head input
    t = make_trainer(["latent=discrete", "codebook=4"], tmp_path)
    batch = first_batch(t)
    t.model.eval()
    with torch.no_grad():
        _, metrics, (_, _, latent_out) = t.compute_loss(batch, progress=0.5, latent_mode="prior")
        hidden = t.model.lm.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        z = torch.cat([latent_out.z, latent_out.z])
        logits = t.model.lm.lm_head(hidden + z[:, None, :])[:, :-1]  # position t predicts token t+1
    mask = batch["response_mask"][:, 1:]
    half = logits.shape[0] // 2
    for name, rows in (("chosen", slice(0, half)), ("rejected", slice(half, None))):
        expected = logits[rows][mask[rows]].mean()  # (tokens, vocab) -> one number
        assert metrics[f"logits/{name}"].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    assert metrics["logits/chosen"].item() != pytest.approx(metrics["logits/rejected"].item())
