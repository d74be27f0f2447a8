"""PreferenceTrainer.evaluate by hand: the metrics over several eval batches equal the loss and rewards of one
batch holding every pair, computed from the model's outputs (LPC: prior z at progress 1, lambda x KL added);
batching, the dataset argument, the returned pairs, the training RNG and the model's mode."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import compose

LPC = ["latent=discrete", "codebook=4", "latent.kl_warmup=0.5", "latent.temperature_min=0.5"]

# Batched (evaluate: batches of 4 + 2 pairs) against one batch of all 6 pairs is not the same arithmetic: other
# shapes take other kernel paths, whose float32 sums round differently, and those differ between CPUs. Measured
# on the quantities of these tests under ATEN_CPU_CAPABILITY=default, avx2 and unset (AVX512 here),
# at 1 and 2 threads: a pair's reward differs by at most 7.6e-7 (default kernels; 3.8e-7 under avx2 and AVX512),
# one float32 ulp of a summed log-prob (|log p| <= 86 here, ulp 7.6e-6) times beta 0.1; the means over the 6
# pairs by at most 1.3e-7 (the other x86 CPU: 1.3e-7 too, where abs=1e-7 failed). The tolerances below
# are about 5x those (4e-6 per pair, 1e-6 for a mean): still 1e-4 of the rewards (~1e-2), far below what a wrong
# pair, batch weight or beta would move them.
PAIR_ATOL, MEAN_ATOL = 4e-6, 1e-6


def make_trainer(overrides, run_dir, n_eval=6):
    from lpc.run import build_trainer

    cfg = compose(
        [
            "data.n_train=16",
            f"data.n_eval={n_eval}",
            "trainer.batch_size=4",
            "trainer.eval_batch_size=4",
            "trainer.eval_every=0",
            "trainer.save_every=0",
            "trainer.reference_logps=on_the_fly",
            *overrides,
        ]
    )
    return build_trainer(cfg, run_dir)[0]


def by_hand(t, rows):
    """Loss, per-pair rewards and latent output of one batch holding the eval pairs ``rows``."""
    batch = t._to_device(t.collate([t.eval_dataset[i] for i in rows]))
    with torch.no_grad():
        out = t.model(batch, progress=1.0, latent_mode="prior")
        res = t._algo_output(out.logps, out.n_tokens, t._reference_logps(batch))
    losses = res.losses
    if out.latent is not None:
        losses = losses + 0.05 * out.latent.kl  # lambda after its warm-up (progress 1), no free bits
    return losses, res.chosen_rewards, res.rejected_rewards, out.latent


@pytest.mark.parametrize("overrides", [[], LPC], ids=["dpo", "lpc"])
def test_evaluate_over_two_batches_is_one_batch_of_every_pair(tmp_path, caplog, overrides):
    t = make_trainer(overrides, tmp_path)
    calls = []
    compute_loss = t.compute_loss

    def spy(batch, progress, latent_mode="train"):
        calls.append((batch["input_ids"].shape[0], progress, latent_mode, t.model.training))
        return compute_loss(batch, progress, latent_mode)

    t.compute_loss = spy
    torch.manual_seed(7)
    rng = torch.get_rng_state()
    with caplog.at_level(logging.INFO, logger="lpc.training.trainer"):
        m = t.evaluate()
    assert torch.equal(torch.get_rng_state(), rng)  # the training RNG did not move
    assert t.model.training  # back in training mode
    assert calls == [(8, 1.0, "prior", False), (4, 1.0, "prior", False)]  # 4 + 2 pairs (chosen; rejected rows)
    assert any(r.getMessage().startswith("evaluation: 2/2 done in") for r in caplog.records)
    losses, cr, rr, _ = by_hand(t, range(6))
    assert set(m) == {"eval/pref_accuracy", "eval/margin", "eval/loss", "eval/rewards/chosen", "eval/rewards/rejected"}
    assert m["eval/loss"] == pytest.approx(losses.mean().item(), rel=1e-5)
    assert m["eval/pref_accuracy"] == pytest.approx((cr > rr).float().mean().item())
    assert m["eval/margin"] == pytest.approx((cr - rr).mean().item(), rel=1e-5, abs=MEAN_ATOL)
    assert m["eval/rewards/chosen"] == pytest.approx(cr.mean().item(), rel=1e-5, abs=MEAN_ATOL)
    assert m["eval/rewards/rejected"] == pytest.approx(rr.mean().item(), rel=1e-5, abs=MEAN_ATOL)
    # another dataset: only its pairs
    sub = t.evaluate(dataset=t.eval_dataset.select([4, 5]))
    losses2, _, _, _ = by_hand(t, [4, 5])
    assert sub["eval/loss"] == pytest.approx(losses2.mean().item(), rel=1e-5)


def test_evaluate_returns_the_pairs_and_the_diagnostics_only_when_asked(tmp_path):
    t = make_trainer(LPC, tmp_path)
    losses, cr, rr, lat = by_hand(t, range(6))
    m, pairs = t.evaluate(return_pairs=True)
    assert set(pairs) == {"chosen_rewards", "rejected_rewards", "prior_probs", "prior_code", "posterior_code"}
    torch.testing.assert_close(pairs["chosen_rewards"], cr, rtol=1e-5, atol=PAIR_ATOL)
    torch.testing.assert_close(pairs["rejected_rewards"], rr, rtol=1e-5, atol=PAIR_ATOL)
    torch.testing.assert_close(pairs["prior_probs"], lat.prior_probs, rtol=1e-5, atol=1e-6)
    assert pairs["prior_code"].tolist() == lat.prior_probs.argmax(-1).tolist()
    assert pairs["posterior_code"].tolist() == lat.posterior_probs.argmax(-1).tolist()
    assert isinstance(t.evaluate(), dict)
    _, diag = t.evaluate(return_pairs=True, diagnostics=True)
    assert set(diag) - set(pairs) == {
        "margin/z_zero",
        "margin/z_shuffled",
        "margin/z_posterior",
        "z_norm",
        "hidden_norm",
        # the chosen responses' log-probs under each z and the reference, for the eval text's NLL (lm/chosen_nll)
        "chosen_logps/z_prior",
        "chosen_logps/z_zero",
        "chosen_logps/z_shuffled",
        "chosen_logps/z_posterior",
        "chosen_logps/reference",
        "chosen_tokens",
    }
    assert diag["chosen_tokens"].tolist() == [float(len(r)) for r in t.eval_dataset["chosen_input_ids"]]
    torch.testing.assert_close(diag["z_norm"], lat.z.norm(dim=-1), rtol=1e-5, atol=1e-6)
    dpo = make_trainer([], tmp_path / "dpo")
    _, dpo_pairs = dpo.evaluate(return_pairs=True, diagnostics=True)  # no latent: no diagnostics
    assert set(dpo_pairs) == {"chosen_rewards", "rejected_rewards"}


def eval_batch(t, rows):
    return t._to_device(t.collate([t.eval_dataset[i] for i in rows]))


def test_compute_loss_and_every_metric_by_hand(tmp_path):
    """LPC in training at progress 0.25: lambda = 0.05 x 0.25 / 0.5 (warm-up over half of training), KL below
    5 nats charged as 5; the TRL metrics from the same z (same seed)."""
    t = make_trainer([*LPC, "latent.kl_free_bits=5.0"], tmp_path)
    batch = eval_batch(t, range(4))
    torch.manual_seed(0)
    loss, m, (cr, rr, lat) = t.compute_loss(batch, progress=0.25)
    torch.manual_seed(0)
    with torch.no_grad():
        out = t.model(batch, progress=0.25, latent_mode="train")
        res = t._algo_output(out.logps, out.n_tokens, t._reference_logps(batch))
    assert (out.latent.kl < 5.0).all()  # every pair is charged the free 5 nats
    losses = res.losses + 0.025 * 5.0
    assert loss.item() == pytest.approx(losses.mean().item(), rel=1e-6)
    torch.testing.assert_close(cr, res.chosen_rewards)
    torch.testing.assert_close(rr, res.rejected_rewards)
    torch.testing.assert_close(lat.z, out.latent.z)
    n = out.n_tokens.float()
    expected = {
        "loss": losses.mean(),
        "rewards/chosen": res.chosen_rewards.mean(),
        "rewards/rejected": res.rejected_rewards.mean(),
        "rewards/accuracies": (res.chosen_rewards > res.rejected_rewards).float().mean(),
        "rewards/margins": (res.chosen_rewards - res.rejected_rewards).mean(),
        "logps/chosen": out.logps[:4].mean(),
        "logps/rejected": out.logps[4:].mean(),
        "logits/chosen": out.logit_sums[:4].sum() / n[:4].sum(),
        "logits/rejected": out.logit_sums[4:].sum() / n[4:].sum(),
        "latent/kl_weight": torch.tensor(0.025),
        **out.latent.metrics,
    }
    assert set(m) == set(expected)
    for key, value in expected.items():
        assert m[key].item() == pytest.approx(value.item(), rel=1e-5, abs=1e-7), key
        assert not m[key].requires_grad, key
    assert loss.requires_grad  # the loss itself is for backward


@pytest.mark.parametrize("algo", ["dpo", "ipo", "simpo"])
def test_a_precomputed_reference_is_read_from_the_batch(tmp_path, algo):
    """With ref_logps in the batch (reference_logps=precompute) no reference model runs: DPO's rewards are
    beta (pi - ref) summed; IPO's (length-normalised) divide both by the response tokens (the mask's count);
    SimPO has no reference."""
    t = make_trainer([f"algo={algo}"], tmp_path)
    t.ref_model = None
    batch = eval_batch(t, range(4))
    ref = torch.linspace(-30.0, -20.0, 8)
    batch["ref_logps"] = ref
    n_ref = batch["response_mask"][:, 1:].sum(1)
    _, _, (cr, rr, _) = t.compute_loss(batch, progress=1.0)
    with torch.no_grad():
        out = t.model(batch)
    pol, n = out.logps, out.n_tokens
    if algo == "dpo":
        expected = 0.1 * (pol - ref)
    elif algo == "ipo":
        expected = pol / n - ref / n_ref
    else:
        expected = t.algo.beta * pol / n  # SimPO: beta x the length-averaged log-prob, no reference
    torch.testing.assert_close(torch.cat([cr, rr]), expected, rtol=1e-5, atol=1e-6)
    assert (n == n_ref).all()  # the mask's count is the scored tokens'


def test_evaluate_on_one_pair_and_on_another_rank(tmp_path, caplog):
    """One pair: its own loss (no other divisor). A process other than the main one shows no progress."""
    t = make_trainer([], tmp_path)
    one = t.evaluate(dataset=t.eval_dataset.select([3]))
    losses, _, _, _ = by_hand(t, [3])
    assert one["eval/loss"] == pytest.approx(losses.item(), rel=1e-5)

    class OtherRank:
        is_main_process = False

        def __init__(self, accelerator):
            self._accelerator = accelerator

        def __getattr__(self, name):
            return getattr(self._accelerator, name)

    t.accelerator = OtherRank(t.accelerator)
    with caplog.at_level(logging.INFO, logger="lpc.training.trainer"):
        assert t.evaluate()["eval/loss"] == pytest.approx(by_hand(t, range(6))[0].mean().item(), rel=1e-5)
    assert not any(r.getMessage().startswith("evaluation:") for r in caplog.records)


def test_one_scored_token_and_a_reference_read_from_the_mask(tmp_path):
    """A pair with one scored token per response: TRL's logits metrics divide by 1. The precomputed reference's
    token counts are the mask's, from the first predicted position on."""
    t = make_trainer([], tmp_path)
    batch = eval_batch(t, [0])
    last = batch["attention_mask"].sum(1) - 1
    batch["response_mask"] = torch.zeros_like(batch["response_mask"])
    batch["response_mask"][torch.arange(2), last] = True
    _, m, _ = t.compute_loss(batch, progress=1.0)
    with torch.no_grad():
        out = t.model(batch)
    assert out.n_tokens.tolist() == [1, 1]
    assert m["logits/chosen"].item() == pytest.approx(out.logit_sums[0].item(), rel=1e-5)
    assert m["logits/rejected"].item() == pytest.approx(out.logit_sums[1].item(), rel=1e-5)
    mask = torch.tensor([[False, True, True], [False, False, True]])
    ref, counts = t._reference_logps({"ref_logps": torch.tensor([-1.0, -2.0]), "response_mask": mask})
    assert ref.tolist() == [-1.0, -2.0] and counts.tolist() == [2, 1]
