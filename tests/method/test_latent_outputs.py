"""The latent modules on tiny hand-set heads: every output of ``forward`` (z, KL, the logged metrics, the
analysis tensors) and of ``prior_z`` recomputed by hand. The heads' first layer is zeroed, so each head
outputs its last bias whatever the input: the expected values need no MLP arithmetic."""

from __future__ import annotations

import math

import pytest
import torch

from lpc.latent import ContinuousLatent, DiscreteLatent, LatentOutput, gaussian_kl


def constant_head(head, bias):
    with torch.no_grad():
        for layer in (head[0], head[-1]):
            layer.weight.zero_()
            layer.bias.zero_()
        head[-1].bias.copy_(torch.tensor(bias, dtype=head[-1].bias.dtype))


H = torch.tensor([[1.0, -2.0], [0.5, 3.0]])  # two prompts' hidden states (ignored by constant heads)
HW, HL = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [2.0, 0.0]])


# ---------------------------------------------------------------------- continuous
def continuous(**kw):
    # no gate unless a test asks for one: z is then the heads' arithmetic alone (the gate's own tests are below)
    lat = ContinuousLatent(hidden_size=2, head_hidden_size=3, **{"gate_init": None, **kw})
    constant_head(lat.prior, [0.5, -1.0, math.log(4.0), 0.0])  # mu_p = (0.5, -1), logvar_p = (ln 4, 0)
    constant_head(lat.posterior, [1.0, 2.0, 0.0, math.log(0.25)])  # mu_q = (1, 2), logvar_q = (0, ln 1/4)
    lat.calibrate(6.0)  # z_scale = mean_scale x 6 / sqrt(2)
    return lat


MU_P, LV_P = torch.tensor([0.5, -1.0]), torch.tensor([math.log(4.0), 0.0])
MU_Q, LV_Q = torch.tensor([1.0, 2.0]), torch.tensor([0.0, math.log(0.25)])
# KL(q || p) per dimension: 1/2 [lv_p - lv_q + (var_q + (mu_q - mu_p)^2) / var_p - 1]
#   dim 0: 1/2 [ln 4 + (1 + 0.25) / 4 - 1] = 0.349397;  dim 1: 1/2 [ln 4 + (0.25 + 9) / 1 - 1] = 4.818147
KL_QP = 0.5 * (math.log(4) + 1.25 / 4 - 1) + 0.5 * (math.log(4) + 9.25 - 1)


def test_continuous_calibrate_sets_z_scale_from_the_hidden_norm():
    lat = ContinuousLatent(hidden_size=4, mean_scale=2.0)
    lat.calibrate(3.0)
    assert lat.z_scale.item() == pytest.approx(2.0 * 3.0 / 2.0)  # mean_scale x norm / sqrt(d)


def test_continuous_heads_clamp_the_log_variance():
    lat = continuous()
    constant_head(lat.prior, [0.0, 0.0, 15.0, -25.0])
    mu, logvar = lat._params(lat.prior, H)
    torch.testing.assert_close(logvar, torch.tensor([[10.0, -20.0]] * 2))
    torch.testing.assert_close(mu, torch.zeros(2, 2))
    lat.double()  # hidden states in another dtype are cast to the heads'
    assert lat._params(lat.prior, lat.prior_features(H))[0].dtype == torch.float64


def test_continuous_sample_is_reparameterised():
    mu, logvar = torch.tensor([[1.0, -1.0]]), torch.tensor([[math.log(4.0), 0.0]])
    torch.manual_seed(3)
    eps = torch.randn(1, 2)
    torch.manual_seed(3)
    torch.testing.assert_close(ContinuousLatent._sample(mu, logvar), mu + eps * torch.tensor([[2.0, 1.0]]))


def test_continuous_prior_z_mean_and_sample():
    lat = continuous(mean_scale=2.0)
    scale = 2.0 * 6.0 / math.sqrt(2)
    torch.testing.assert_close(lat.prior_z(H), scale * MU_P.expand(2, 2))
    torch.manual_seed(0)
    eps = torch.randn(2, 2)
    torch.manual_seed(0)
    torch.testing.assert_close(lat.prior_z(H, inference="sample"), scale * (MU_P + eps * torch.tensor([2.0, 1.0])))
    lat.inference = "sample"
    torch.manual_seed(0)
    torch.testing.assert_close(lat.prior_z(H), scale * (MU_P + eps * torch.tensor([2.0, 1.0])))
    torch.testing.assert_close(lat.prior_z(H, inference="mean"), scale * MU_P.expand(2, 2))
    assert lat.prior_probs(H) is None and lat.num_codes == 0 and ContinuousLatent.codes_in_config({}) == 0
    with pytest.raises(ValueError, match="code=0 is not allowed: a continuous latent has no codes"):
        lat.code_vector(0)


def test_continuous_forward_in_training_by_hand():
    lat = continuous(mix_start=0.0, mix_end=1.0)
    scale = 6.0 / math.sqrt(2)
    torch.manual_seed(0)
    eps_p, eps_q = torch.randn(2, 2), torch.randn(2, 2)  # the prior's sample is drawn first
    torch.manual_seed(0)
    out = lat(H, HW, HL, progress=0.25)  # g = 0.25 (linear)
    u = 0.25 * (MU_P + eps_p * torch.tensor([2.0, 1.0])) + 0.75 * (MU_Q + eps_q * torch.tensor([1.0, 0.5]))
    torch.testing.assert_close(out.z, scale * u)
    torch.testing.assert_close(out.kl, torch.tensor([KL_QP, KL_QP]))
    assert out.kl[0].item() == pytest.approx(0.349397 + 4.818147, abs=1e-5)
    m = out.metrics
    assert set(m) == {"latent/kl", "latent/g", "latent/prior_std", "latent/z_norm"}
    assert m["latent/kl"].item() == pytest.approx(KL_QP, rel=1e-6) and m["latent/g"].item() == 0.25
    assert m["latent/prior_std"].item() == pytest.approx((2.0 + 1.0) / 2)  # exp(lv_p / 2) averaged
    assert m["latent/z_norm"].item() == pytest.approx((scale * u).norm(dim=-1).mean().item(), rel=1e-6)
    torch.testing.assert_close(out.prior_mean, scale * MU_P.expand(2, 2))
    assert out.z_posterior is None and out.prior_probs is None and out.posterior_probs is None
    assert set(out.analysis()) == {"prior_mean"}
    torch.testing.assert_close(out.analysis()["prior_mean"], scale * MU_P.expand(2, 2))
    # the defaults: progress 1 (g = 1, the prior's sample alone), training mode
    torch.manual_seed(0)
    torch.testing.assert_close(lat(H, HW, HL).z, scale * (MU_P + eps_p * torch.tensor([2.0, 1.0])))
    with pytest.raises(ValueError, match=r"^training needs the posterior's inputs \(h_chosen, h_rejected\)$"):
        lat(H)
    with pytest.raises(ValueError, match="mode must be 'train' or 'prior', got 'bogus'"):
        lat(H, mode="bogus")


def test_continuous_forward_at_evaluation_by_hand():
    lat = continuous()
    scale = 6.0 / math.sqrt(2)
    out = lat(H, HW, HL, mode="prior")
    torch.testing.assert_close(out.z, scale * MU_P.expand(2, 2))
    torch.testing.assert_close(out.z_posterior, scale * MU_Q.expand(2, 2))  # the posterior's mean
    torch.testing.assert_close(out.kl, gaussian_kl(MU_Q, LV_Q, MU_P, LV_P).expand(2))
    assert out.metrics["latent/g"].item() == 1.0
    alone = lat(H, mode="prior")  # no posterior input: zero KL, no posterior z
    torch.testing.assert_close(alone.kl, torch.zeros(2))
    assert alone.z_posterior is None
    lat.inference = "sample"
    torch.manual_seed(1)
    eps = torch.randn(2, 2)
    torch.manual_seed(1)
    torch.testing.assert_close(lat(H, mode="prior").z, scale * (MU_P + eps * torch.tensor([2.0, 1.0])))


# ---------------------------------------------------------------------- discrete
def discrete(**kw):
    opts = {"gate_init": None, "codebook_init": "hidden", **kw}  # the codes are set below
    lat = DiscreteLatent(hidden_size=2, codebook_size=3, head_hidden_size=3, **opts)
    with torch.no_grad():
        lat.codebook.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]]))
    constant_head(lat.prior, [math.log(2.0), 0.0, math.log(1.0)])  # p = (1/2, 1/4, 1/4)
    constant_head(lat.posterior, [0.0, math.log(3.0), 0.0])  # q = (1/5, 3/5, 1/5)
    return lat


P, Q = torch.tensor([0.5, 0.25, 0.25]), torch.tensor([0.2, 0.6, 0.2])
E = torch.tensor([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0]])
KL_CAT = float((Q * (Q / P).log()).sum())  # 0.2 ln 0.4 + 0.6 ln 2.4 + 0.2 ln 0.8 = 0.297...


def test_discrete_prior_z_expectation_argmax_and_sample():
    lat = discrete()
    torch.testing.assert_close(lat.prior_probs(H), P.expand(2, 3))
    torch.testing.assert_close(lat.prior_z(H), (P @ E).expand(2, 2))  # (0.5 - 0.75, 0.5)
    torch.testing.assert_close(lat.prior_z(H, inference="argmax"), E[0].expand(2, 2))
    torch.manual_seed(0)
    z = lat.prior_z(H, inference="sample")
    assert all(any(torch.equal(row, e) for e in E) for row in z)  # a hard one-hot pick of a code
    with pytest.raises(ValueError, match="latent.inference must be one of"):
        lat.prior_z(H, inference="bogus")
    lat.inference = "argmax"
    torch.testing.assert_close(lat.prior_z(H), E[0].expand(2, 2))
    assert lat.num_codes == 3 and DiscreteLatent.codes_in_config({"codebook_size": 3}) == 3
    assert lat.code_vector(0).tolist() == [1.0, 0.0] and lat.code_vector(2).tolist() == [-3.0, 0.0]
    with pytest.raises(ValueError, match=r"code must be in \[0, 2\], got 3"):
        lat.code_vector(3)
    with pytest.raises(ValueError, match=r"code must be in \[0, 2\], got -1"):
        lat.code_vector(-1)


def test_discrete_calibrate_scales_every_code_to_the_hidden_norm():
    lat = DiscreteLatent(hidden_size=2, codebook_size=2, codebook_init="hidden", codebook_init_scale=0.5)
    with torch.no_grad():
        lat.codebook.copy_(torch.tensor([[3.0, 4.0], [0.0, -2.0]]))
    lat.calibrate(10.0)  # rows of norm 0.5 x 10
    torch.testing.assert_close(lat.codebook.detach(), torch.tensor([[3.0, 4.0], [0.0, -5.0]]))
    normal = DiscreteLatent(hidden_size=2, codebook_size=2, codebook_init="normal")
    before = normal.codebook.detach().clone()
    normal.calibrate(10.0)  # "normal" codes keep their draw
    torch.testing.assert_close(normal.codebook.detach(), before)


def test_discrete_temperature_annealing():
    lat = discrete(temperature=2.0, temperature_min=0.5)
    assert lat.tau(0.0) == 2.0 and lat.tau(0.5) == pytest.approx(1.0) and lat.tau(1.0) == pytest.approx(0.5)


def test_discrete_forward_in_training_by_hand():
    lat = discrete(hard=True)
    # the same Gumbel draws by hand: the prior's sample first, then the posterior's (logits up to a constant)
    torch.manual_seed(0)
    w_p = torch.nn.functional.gumbel_softmax(P.log().expand(2, 3), tau=1.0, hard=True)
    w_q = torch.nn.functional.gumbel_softmax(Q.log().expand(2, 3), tau=1.0, hard=True)
    torch.manual_seed(0)
    out = lat(H, HW, HL, progress=0.5)  # g = 0.5: half the prior's one-hot code, half the posterior's
    torch.testing.assert_close(out.z, 0.5 * (w_p @ E) + 0.5 * (w_q @ E))
    torch.testing.assert_close(out.kl, torch.tensor([KL_CAT, KL_CAT]))
    m = out.metrics
    assert m["latent/kl"].item() == pytest.approx(KL_CAT, rel=1e-6)
    assert m["latent/g"].item() == 0.5 and m["latent/temperature"].item() == 1.0
    h_p = -(P * P.log()).sum().item()  # 1.0397 nats
    assert m["latent/prior_entropy"].item() == pytest.approx(h_p, rel=1e-6)
    assert m["latent/prior_entropy_normalized"].item() == pytest.approx(h_p / math.log(3), rel=1e-6)
    h_q = -(Q * Q.log()).sum().item()  # code usage: the batch's mean posterior (the same q twice)
    assert m["latent/code_usage_entropy"].item() == pytest.approx(h_q, rel=1e-6)
    assert m["latent/code_perplexity"].item() == pytest.approx(math.exp(h_q), rel=1e-6)
    assert m["latent/prior_posterior_agreement"].item() == 0.0  # argmax p = 0, argmax q = 1
    assert m["latent/z_norm"].item() == pytest.approx(out.z.norm(dim=-1).mean().item(), rel=1e-6)
    torch.testing.assert_close(out.prior_probs, P.expand(2, 3))
    torch.testing.assert_close(out.posterior_probs, Q.expand(2, 3))
    assert out.z_posterior is None
    a = out.analysis()
    assert a["prior_code"].tolist() == [0, 0] and a["posterior_code"].tolist() == [1, 1]
    torch.testing.assert_close(a["prior_probs"], P.expand(2, 3))
    # g = 0 (progress 0): the posterior's sample alone (one draw); g = 1 (the default progress): the prior's alone
    torch.manual_seed(0)
    w_q0 = torch.nn.functional.gumbel_softmax(Q.log().expand(2, 3), tau=1.0, hard=True)
    torch.manual_seed(0)
    torch.testing.assert_close(lat(H, HW, HL, progress=0.0).z, w_q0 @ E)
    torch.manual_seed(0)
    torch.testing.assert_close(lat(H, HW, HL).z, w_p @ E)
    with pytest.raises(ValueError, match=r"^training needs the posterior's inputs \(h_chosen, h_rejected\)$"):
        lat(H)
    with pytest.raises(ValueError, match="mode must be 'train' or 'prior', got 'bogus'"):
        lat(H, HW, HL, mode="bogus")


def test_discrete_forward_at_evaluation_by_hand():
    lat = discrete()
    out = lat(H, HW, HL, mode="prior")
    torch.testing.assert_close(out.z, (P @ E).expand(2, 2))
    torch.testing.assert_close(out.z_posterior, E[1].expand(2, 2))  # the posterior's argmax code
    torch.testing.assert_close(out.kl, torch.tensor([KL_CAT, KL_CAT]))
    m = out.metrics
    assert m["latent/g"].item() == 1.0 and m["latent/prior_posterior_agreement"].item() == 0.0
    assert m["latent/z_norm"].item() == pytest.approx((P @ E).norm().item(), rel=1e-6)
    alone = lat(H, mode="prior")  # no posterior input: zero KL, code usage and agreement from the prior
    torch.testing.assert_close(alone.kl, torch.zeros(2))
    assert alone.z_posterior is None and alone.posterior_probs is None
    assert alone.metrics["latent/prior_posterior_agreement"].item() == 1.0
    assert alone.metrics["latent/code_usage_entropy"].item() == pytest.approx(-(P * P.log()).sum().item(), rel=1e-6)
    assert set(alone.analysis()) == {"prior_probs", "prior_code"}


def test_soft_samples_mix_codes_and_hard_ones_pick_one():
    soft = discrete(hard=False)
    torch.manual_seed(0)
    w = torch.nn.functional.gumbel_softmax(soft.prior_logits(H), tau=1.0, hard=False)
    torch.manual_seed(0)
    torch.testing.assert_close(soft._draw(soft.prior_logits(H), 1.0) @ soft.codes(), w @ E)
    assert not any(any(torch.allclose(row, e) for e in E) for row in w @ E)
    torch.manual_seed(0)
    w2 = torch.nn.functional.gumbel_softmax(soft.prior_logits(H), tau=0.5, hard=False)
    torch.manual_seed(0)
    torch.testing.assert_close(soft._draw(soft.prior_logits(H), 0.5) @ soft.codes(), w2 @ E)


def test_latent_output_analysis_without_a_discrete_prior():
    out = LatentOutput(z=torch.zeros(1, 2), kl=torch.zeros(1))
    assert out.analysis() == {} and out.metrics == {}


def test_mixing_weight_constant_defaults_to_one():
    from lpc.latent import mixing_weight

    assert mixing_weight(0.3, "constant") == 1.0 and mixing_weight(0.3, "constant", value=0.25) == 0.25


def test_a_prior_sample_alone_draws_only_the_priors_noise():
    """g = 1: the posterior's sample would be multiplied by 0, so it is not drawn (the RNG moves by one draw)."""
    lat = discrete()
    torch.manual_seed(0)
    lat(H, HW, HL, progress=1.0)
    after_forward = torch.rand(3)
    torch.manual_seed(0)
    torch.nn.functional.gumbel_softmax(P.log().expand(2, 3), tau=1.0, hard=True)
    assert torch.equal(after_forward, torch.rand(3))


def test_agreement_and_entropy_with_prompts_on_different_codes():
    """Rows whose prior argmax differs (codes 2 and 0): per-row agreement; K = 2 normalises by ln 2."""
    lat = discrete()
    logits = torch.tensor([[0.3, 0.3, 0.4], [0.9, 0.05, 0.05]]).log()
    lat.prior_logits = lambda h, update=False: logits
    out = lat(H, mode="prior")  # no posterior input: q = p, agreement 1
    assert out.metrics["latent/prior_posterior_agreement"].item() == 1.0
    assert out.analysis()["prior_code"].tolist() == [2, 0]
    two = DiscreteLatent(hidden_size=2, codebook_size=2)
    constant_head(two.prior, [0.0, 0.0])  # uniform over 2 codes: normalised entropy 1
    assert two(H, mode="prior").metrics["latent/prior_entropy_normalized"].item() == pytest.approx(1.0)


def test_one_code_and_one_dimension_without_a_posterior():
    one_code = DiscreteLatent(hidden_size=2, codebook_size=1)
    torch.testing.assert_close(one_code(H, mode="prior").kl, torch.zeros(2))
    one_dim = ContinuousLatent(hidden_size=1)
    torch.testing.assert_close(one_dim(H[:, :1], mode="prior").kl, torch.zeros(2))


def test_heads_in_double_precision_read_float_hidden_states():
    lat = discrete().double()
    out = lat(H, HW, HL, mode="prior")  # float32 inputs, float64 heads
    assert out.prior_probs.dtype == torch.float64 and out.kl.dtype == torch.float64


# ---------------------------------------------------------------------- the gate
@pytest.mark.parametrize("make", [discrete, continuous])
def test_the_gate_scales_every_z_and_starts_it_at_zero(make):
    """z = gate x the ungated z, in training (same noise), at the prior, for codes and the posterior's z."""
    plain, gated = make(), make(gate_init=0.5)
    torch.manual_seed(3)
    z_plain = plain(H, HW, HL, progress=0.3).z
    torch.manual_seed(3)
    out = gated(H, HW, HL, progress=0.3)
    torch.testing.assert_close(out.z, 0.5 * z_plain)
    assert out.metrics["latent/gate"].item() == 0.5
    torch.testing.assert_close(gated(H, HW, HL, mode="prior").z, 0.5 * plain(H, HW, HL, mode="prior").z)
    torch.testing.assert_close(
        gated(H, HW, HL, mode="prior").z_posterior, 0.5 * plain(H, HW, HL, mode="prior").z_posterior
    )
    if hasattr(plain, "codebook_size"):
        torch.testing.assert_close(gated.code_vector(2), torch.tensor([-1.5, 0.0]))
    closed = make(gate_init=0.0)
    z = closed(H, HW, HL, progress=0.3).z
    assert torch.count_nonzero(z) == 0
    # the first gradient reaches the gate alone: d z / d codes = gate = 0, d z / d gate = the ungated z
    (z * torch.tensor([1.0, -2.0])).sum().backward()
    assert closed.gate.grad.item() != 0.0
    for name, p in closed.named_parameters():
        if name != "gate" and p.grad is not None:
            assert torch.count_nonzero(p.grad) == 0, name


def test_zero_codes_give_z_zero_and_grow_from_their_own_pairs():
    lat = DiscreteLatent(hidden_size=2, codebook_size=3, head_hidden_size=3, gate_init=None, codebook_init="zeros")
    lat.calibrate(10.0)  # zeros stay zeros
    assert torch.count_nonzero(lat.codebook) == 0
    lat.hard, tau = True, 1.0
    torch.manual_seed(0)
    z = lat(H, HW, HL, progress=0.0).z
    assert torch.count_nonzero(z) == 0
    z.sum().backward()
    # straight-through one-hot samples: each code's gradient is the number of rows that drew it (x d sum / d z = 1)
    assert sorted(lat.codebook.grad[:, 0].tolist()) == sorted(lat.codebook.grad[:, 1].tolist())
    assert lat.codebook.grad.sum().item() == pytest.approx(2 * 2 * tau)  # 2 rows, 2 dimensions


def test_centred_codes_are_measured_from_their_running_usage_by_hand():
    """center=usage: code k is e_k - sum_j u_j e_j for the running usage u; a training batch is centred on the
    usage before it, then u moves toward the batch's mean code weights by center_momentum."""
    lat = DiscreteLatent(hidden_size=2, codebook_size=3, head_hidden_size=3, center="usage", running_momentum=0.25)
    constant_head(lat.prior, P.log().tolist())
    constant_head(lat.posterior, Q.log().tolist())
    with torch.no_grad():
        lat.codebook.copy_(E)
    u0 = torch.full((3,), 1 / 3)
    torch.testing.assert_close(lat.usage, u0)  # uniform before any batch
    torch.testing.assert_close(lat.codes(), E - u0 @ E)  # E's mean row (1/3, 2/3) off every code
    torch.manual_seed(0)
    w_q = torch.nn.functional.gumbel_softmax(Q.log().expand(2, 3), tau=1.0, hard=True)
    torch.manual_seed(0)
    out = lat(H, HW, HL, progress=0.0)  # g = 0: the posterior's one-hot samples
    torch.testing.assert_close(out.z, w_q @ (E - u0 @ E))
    u1 = 0.75 * u0 + 0.25 * w_q.mean(0)
    torch.testing.assert_close(lat.usage, u1)
    # the gradient of sum_i g_i . z_i on code j is sum_i g_i (w_ij - u_j): what the pairs share cancels
    g = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    (g * out.z).sum().backward()
    torch.testing.assert_close(lat.codebook.grad, (w_q - u0).T @ g)
    shared = torch.tensor([[1.0, 1.0], [1.0, 1.0]])  # the same gradient for both rows, with usage = their mean
    with torch.no_grad():
        lat.usage.copy_(w_q.mean(0))
    lat.codebook.grad = None
    (shared * (w_q @ lat.codes())).sum().backward()
    torch.testing.assert_close(lat.codebook.grad, torch.zeros(3, 2))
    # evaluation reads the usage and leaves it; a code every pair takes is z = 0
    with torch.no_grad():
        lat.usage.copy_(torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(lat.code_vector(1), torch.zeros(2))
    lat(H, HW, HL, mode="prior")
    torch.testing.assert_close(lat.usage, torch.tensor([0.0, 1.0, 0.0]))
    assert "usage" in lat.state_dict()  # checkpoints carry it, so a resumed run centres as the uninterrupted one


def test_centred_zero_codes_start_at_z_zero():
    lat = DiscreteLatent(hidden_size=2, codebook_size=3, head_hidden_size=3, center="usage")
    torch.manual_seed(0)
    out = lat(H, HW, HL, progress=0.3)
    assert torch.count_nonzero(out.z) == 0 and torch.count_nonzero(lat.prior_z(H)) == 0


@pytest.mark.parametrize("make", [discrete, continuous])
def test_centered_head_input_by_hand(make):
    """head_input=centered: a head reads its input less the running mean (the first training batch's mean, then
    moved by running_momentum), scaled to unit RMS per row; evaluation reads the mean and leaves it."""
    lat = make(head_input="centered", running_momentum=0.5)
    seen = []
    lat.prior.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))

    def unit_rms(y):
        return y / (y.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()

    lat(H, HW, HL)  # training batch 1: the mean is H's
    m1 = H.mean(0)
    torch.testing.assert_close(lat.prior_center.mean, m1)
    torch.testing.assert_close(seen[-1], unit_rms(H - m1))  # rows +-(0.25, -2.5): opposite, at unit RMS
    torch.testing.assert_close(lat.posterior_center.mean, torch.cat([HW, HL], -1).mean(0))
    h2 = torch.tensor([[3.0, 1.0], [1.0, 1.0]])
    lat(h2, HW, HL)  # training batch 2: the mean moves half way to this batch's
    m2 = 0.5 * m1 + 0.5 * h2.mean(0)
    torch.testing.assert_close(lat.prior_center.mean, m2)
    torch.testing.assert_close(seen[-1], unit_rms(h2 - m2))
    lat.prior_z(H)  # evaluation: the same mean, unchanged
    torch.testing.assert_close(seen[-1], unit_rms(H - m2))
    torch.testing.assert_close(lat.prior_center.mean, m2)
    assert int(lat.prior_center.batches) == 2 and "prior_center.mean" in lat.state_dict()


def test_batch_centred_codes_sum_to_zero_over_a_training_batch():
    """center=batch: z_i = (w_i - mean_j w_j) E in training (the batch's mean, with its gradient, so a gradient
    shared by every row reaches neither the codes nor the code weights); evaluation centres on the running usage."""
    lat = discrete(center="batch", running_momentum=1.0)
    torch.manual_seed(0)
    w = torch.nn.functional.gumbel_softmax(P.log().expand(2, 3), tau=1.0, hard=True)
    torch.manual_seed(0)
    out = lat(H, HW, HL)  # g = 1: the prior's draw
    torch.testing.assert_close(out.z, (w - w.mean(0)) @ E)
    torch.testing.assert_close(out.z.sum(0), torch.zeros(2))
    torch.testing.assert_close(lat.usage, w.mean(0))  # momentum 1: the last batch's usage
    (torch.ones(2, 2) * out.z).sum().backward()  # the same gradient on both rows
    torch.testing.assert_close(lat.codebook.grad, torch.zeros(3, 2))
    torch.testing.assert_close(lat.prior_z(H, "argmax"), (E - w.mean(0) @ E)[[0, 0]])
