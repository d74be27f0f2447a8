"""Every loss against values computed by hand (math.log/exp on the numbers in the comments).

The algorithm objects are also run through ``PreferenceTrainer.compute_loss`` with a stub policy,
so the summed-vs-length-averaged choice (``average_logps`` / IPO ``length_normalize``) is checked
where the trainer makes it, for the policy and the reference alike.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from lpc.losses import DPO, IPO, SimPO, dpo_loss, ipo_loss, lpc_objective, simpo_loss
from lpc.policy import PolicyOutput
from lpc.training.trainer import PreferenceTrainer


def T(*xs):
    return torch.tensor(xs, dtype=torch.float64)


def softplus(x):  # -log sigmoid(-x) = log(1 + e^x)
    return math.log(1.0 + math.exp(x))


def close(t, expected, tol=1e-9):
    assert t.tolist() == pytest.approx(expected, abs=tol)


# Two pairs of summed log-probs.
POL_C, POL_R = T(-1.0, -2.0), T(-3.0, -1.0)
REF_C, REF_R = T(-1.5, -2.0), T(-2.5, -1.5)


def test_dpo_loss_by_hand():
    out = dpo_loss(POL_C, POL_R, REF_C, REF_R, beta=0.1)
    # chosen rewards   0.1*(-1 - -1.5) = 0.05,  0.1*(-2 - -2) = 0
    # rejected rewards 0.1*(-3 - -2.5) = -0.05, 0.1*(-1 - -1.5) = 0.05
    close(out.chosen_rewards, [0.05, 0.0])
    close(out.rejected_rewards, [-0.05, 0.05])
    # margins 0.1 and -0.05; loss = -log sigmoid(m) = log(1 + e^{-m})
    close(out.losses, [softplus(-0.1), softplus(0.05)])
    assert out.losses.tolist() == pytest.approx([0.6443966600735709, 0.7184596480132862], abs=1e-12)


def test_dpo_beta_scales_rewards():
    out = DPO(beta=0.5)(POL_C, POL_R, REF_C, REF_R)
    # margins 0.5*(0.5 - -0.5) = 0.5 and 0.5*(0 - 0.5) = -0.25
    close(out.chosen_rewards - out.rejected_rewards, [0.5, -0.25])
    close(out.losses, [softplus(-0.5), softplus(0.25)])


def test_simpo_loss_by_hand():
    avg_c, avg_r = T(-0.5, -1.2), T(-1.5, -0.9)  # length-averaged log-probs
    out = simpo_loss(avg_c, avg_r, beta=2.0, gamma=1.0)
    # rewards 2*avg: chosen -1.0, -2.4; rejected -3.0, -1.8; margins 2.0, -0.6
    close(out.chosen_rewards, [-1.0, -2.4])
    close(out.rejected_rewards, [-3.0, -1.8])
    # loss = -log sigmoid(margin - gamma) = log(1 + e^{-(m - 1)}): m-1 = 1.0 and -1.6
    close(out.losses, [softplus(-1.0), softplus(1.6)])


def test_ipo_loss_by_hand():
    out = ipo_loss(T(-4.0, -6.0), T(-8.0, -3.0), T(-5.0, -6.5), T(-7.0, -4.0), tau=0.5)
    # rho_w = 1.0, 0.5; rho_l = -1.0, 1.0; h = 2.0, -0.5; target 1/(2*0.5) = 1
    close(out.chosen_rewards, [1.0, 0.5])
    close(out.rejected_rewards, [-1.0, 1.0])
    close(out.losses, [(2.0 - 1.0) ** 2, (-0.5 - 1.0) ** 2])  # 1.0, 2.25


def test_lpc_objective_by_hand():
    # -(E_q log f - lambda KL) with the per-pair losses -log f: 0.5 + 0.05*0.2, 1.0 + 0.05*0.4
    out = lpc_objective(T(0.5, 1.0), T(0.2, 0.4), kl_weight=0.05)
    close(out, [0.51, 1.02])
    close(lpc_objective(T(0.5, 1.0), T(0.2, 0.4), kl_weight=0.0), [0.5, 1.0])


# --------------------------------------------------------------------------- through the trainer


def stub_trainer(algo, pol_sums, pol_counts, ref_sums=None, ref_counts=None):
    """A PreferenceTrainer whose policy and reference return fixed (chosen; rejected) log-prob sums."""
    t = PreferenceTrainer.__new__(PreferenceTrainer)
    t.algo = algo
    t.model = lambda batch, progress=0.0, latent_mode="train": PolicyOutput(pol_sums, pol_counts, None)
    t._reference_logps = lambda batch: None if ref_sums is None else (ref_sums, ref_counts)
    t.accelerator = SimpleNamespace()
    return t


# (chosen pair 1, chosen pair 2; rejected pair 1, rejected pair 2); the reference scores the same tokens
SUMS, COUNTS = T(-4.0, -6.0, -8.0, -3.0), T(4, 2, 8, 3)
REF_SUMS = T(-5.0, -6.5, -7.0, -4.0)


@pytest.mark.parametrize("length_normalize", [False, True])
def test_ipo_algo_summed_and_length_normalised(length_normalize):
    algo = IPO(tau=0.5, length_normalize=length_normalize)
    assert algo.needs_reference and algo.average_logps == length_normalize
    loss, metrics, (cr, rr, _) = stub_trainer(algo, SUMS, COUNTS, REF_SUMS, COUNTS).compute_loss({}, 0.0)
    if not length_normalize:
        # summed: h = (-4 - -5) - (-8 - -7) = 2.0 and (-6 - -6.5) - (-3 - -4) = -0.5
        exp_cr, exp_rr, exp_losses = [1.0, 0.5], [-1.0, 1.0], [1.0, 2.25]
    else:
        # per token: chosen -4/4 - -5/4 = 0.25, -6/2 - -6.5/2 = 0.25;
        #            rejected -8/8 - -7/8 = -0.125, -3/3 - -4/3 = 1/3
        # h = 0.375, 0.25 - 1/3 = -1/12; loss (h - 1)^2 = 0.390625, (13/12)^2
        exp_cr, exp_rr, exp_losses = [0.25, 0.25], [-0.125, 1 / 3], [0.390625, (13 / 12) ** 2]
    close(cr, exp_cr)
    close(rr, exp_rr)
    assert loss.item() == pytest.approx(sum(exp_losses) / 2, abs=1e-9)
    assert metrics["loss"].item() == pytest.approx(sum(exp_losses) / 2, abs=1e-9)
    margins = [c - r for c, r in zip(exp_cr, exp_rr)]
    assert metrics["rewards/margins"].item() == pytest.approx(sum(margins) / 2, abs=1e-9)
    assert metrics["rewards/accuracies"].item() == pytest.approx(sum(m > 0 for m in margins) / 2)
    # TRL's logps/* are the summed policy log-probs whatever the loss uses
    assert metrics["logps/chosen"].item() == pytest.approx(-5.0)
    assert metrics["logps/rejected"].item() == pytest.approx(-5.5)


def test_dpo_algo_uses_summed_logps():
    algo = DPO(beta=0.1)
    assert algo.needs_reference and not algo.average_logps
    loss, metrics, (cr, rr, _) = stub_trainer(algo, SUMS, COUNTS, REF_SUMS, COUNTS).compute_loss({}, 0.0)
    # rewards 0.1*rho (summed): chosen 0.1, 0.05; rejected -0.1, 0.1; margins 0.2, -0.05
    close(cr, [0.1, 0.05])
    close(rr, [-0.1, 0.1])
    assert loss.item() == pytest.approx((softplus(-0.2) + softplus(0.05)) / 2, abs=1e-9)
    assert metrics["rewards/chosen"].item() == pytest.approx(0.075)
    assert metrics["rewards/rejected"].item() == pytest.approx(0.0)
    assert metrics["rewards/margins"].item() == pytest.approx(0.075)
    assert metrics["rewards/accuracies"].item() == pytest.approx(0.5)


def test_simpo_algo_uses_length_averaged_logps_and_no_reference():
    algo = SimPO(beta=2.0, gamma=1.0)
    assert not algo.needs_reference and algo.average_logps
    loss, metrics, (cr, rr, _) = stub_trainer(algo, SUMS, COUNTS).compute_loss({}, 0.0)
    # averages: chosen -1.0, -3.0; rejected -1.0, -1.0 -> rewards 2*avg: -2, -6; -2, -2
    # margins 0, -4; loss log(1 + e^{-(m - 1)}) = softplus(1), softplus(5)
    close(cr, [-2.0, -6.0])
    close(rr, [-2.0, -2.0])
    assert loss.item() == pytest.approx((softplus(1.0) + softplus(5.0)) / 2, abs=1e-9)
    assert metrics["rewards/margins"].item() == pytest.approx(-2.0)
    assert metrics["rewards/accuracies"].item() == pytest.approx(0.0)  # a tie is not "correct"
