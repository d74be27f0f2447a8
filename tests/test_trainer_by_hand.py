"""PreferenceTrainer.evaluate by hand: the metrics over several eval batches equal the loss and rewards of one
batch holding every pair, computed from the model's outputs (LPC: prior z at progress 1, lambda x KL added);
batching, the dataset argument, the returned pairs, the training RNG and the model's mode."""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import compose

LPC = ["latent=discrete", "codebook=4", "latent.kl_warmup=0.5", "latent.temperature_min=0.5"]


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
    assert m["eval/margin"] == pytest.approx((cr - rr).mean().item(), rel=1e-5, abs=1e-7)
    assert m["eval/rewards/chosen"] == pytest.approx(cr.mean().item(), rel=1e-5, abs=1e-7)
    assert m["eval/rewards/rejected"] == pytest.approx(rr.mean().item(), rel=1e-5, abs=1e-7)
    # another dataset: only its pairs
    sub = t.evaluate(dataset=t.eval_dataset.select([4, 5]))
    losses2, _, _, _ = by_hand(t, [4, 5])
    assert sub["eval/loss"] == pytest.approx(losses2.mean().item(), rel=1e-5)


def test_evaluate_returns_the_pairs_and_the_diagnostics_only_when_asked(tmp_path):
    t = make_trainer(LPC, tmp_path)
    losses, cr, rr, lat = by_hand(t, range(6))
    m, pairs = t.evaluate(return_pairs=True)
    assert set(pairs) == {"chosen_rewards", "rejected_rewards", "prior_probs", "prior_code", "posterior_code"}
    torch.testing.assert_close(pairs["chosen_rewards"], cr, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pairs["rejected_rewards"], rr, rtol=1e-5, atol=1e-6)
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
    }
    torch.testing.assert_close(diag["z_norm"], lat.z.norm(dim=-1), rtol=1e-5, atol=1e-6)
    dpo = make_trainer([], tmp_path / "dpo")
    _, dpo_pairs = dpo.evaluate(return_pairs=True, diagnostics=True)  # no latent: no diagnostics
    assert set(dpo_pairs) == {"chosen_rewards", "rejected_rewards"}
