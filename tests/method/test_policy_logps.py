"""lpc.policy on a tiny random Llama: the scored log-probs with and without z (at the head, before the final
norm, at response or all positions), the counts and TRL's logit sums, recomputed by hand from the full
Hugging Face forward; the latent's inputs and the hidden-state norm that calibrates it."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from lpc.latent import DiscreteLatent
from lpc.policy import PreferenceModel, expected_hidden_norm, response_logps


@pytest.fixture(scope="module")
def lm():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=11,
        hidden_size=8,
        intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=16,
    )
    model = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        model.model.norm.weight.copy_(torch.linspace(0.5, 2.0, 8))  # not all ones: the norm's input matters
    return model


# rows 0-1 are the chosen responses of two pairs, rows 2-3 the rejected ones; row 3 is right-padded
IDS = torch.tensor([[1, 5, 6, 7, 2], [1, 4, 3, 9, 8], [1, 5, 6, 3, 2], [1, 4, 3, 10, 0]])
ATTN = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
RESP = torch.tensor(
    [[0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 1], [0, 0, 0, 1, 0]], dtype=torch.bool
)  # prompts of 3 tokens; responses of 2, 2, 2 and 1 tokens
BATCH = {"input_ids": IDS, "attention_mask": ATTN, "response_mask": RESP}
Z = torch.tensor([[0.5] * 8, [-1.0, 2.0, 0.0, 0.0, 1.0, 0.0, -0.5, 3.0]])  # one z per pair


def norm_input(lm):
    """The final norm's input of the full forward (captured by a hook)."""
    captured = {}
    handle = lm.model.norm.register_forward_hook(lambda _m, args, _o: captured.__setitem__("pre", args[0]))
    try:
        lm.model(input_ids=IDS, attention_mask=ATTN)
    finally:
        handle.remove()
    return captured["pre"].detach()


def by_hand(lm, z=None, where="head"):
    """Each row's summed log p(response token) from the full forward (every position through the head)."""
    z4 = None if z is None else torch.cat([z, z])  # the pair's z for its chosen and its rejected row
    with torch.no_grad():
        h_pre = norm_input(lm)
        if z4 is not None and where == "pre_norm":
            h = lm.model.norm(h_pre + z4[:, None, :])
        else:
            h = lm.model.norm(h_pre) + (z4[:, None, :] if z4 is not None else 0.0)
        logits = lm.lm_head(h)
    logp = logits.log_softmax(-1)
    sums, counts, logit_sums = [], [], []
    for i in range(4):
        s = m = 0.0
        n = 0
        for t in range(1, 5):
            if RESP[i, t]:
                s += logp[i, t - 1, IDS[i, t]].item()
                m += logits[i, t - 1].mean().item()
                n += 1
        sums.append(s), counts.append(n), logit_sums.append(m)
    return torch.tensor(sums), torch.tensor(counts), torch.tensor(logit_sums)


def test_response_logps_without_z_and_with_logits(lm):
    hidden = lm.model(input_ids=IDS, attention_mask=ATTN).last_hidden_state.detach()
    sums, counts, logit_sums, z_kl = response_logps(lm, hidden, BATCH, with_logits=True, z_kl=True)
    assert z_kl is None  # no z: nothing to compare
    ref_sums, ref_counts, ref_logits = by_hand(lm)
    torch.testing.assert_close(sums, ref_sums, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == ref_counts.tolist() == [2, 2, 2, 1]
    torch.testing.assert_close(logit_sums, ref_logits, atol=1e-5, rtol=1e-5)
    two = response_logps(lm, hidden, BATCH)
    assert len(two) == 2 and torch.equal(two[0], sums)


@pytest.mark.parametrize("z_positions", ["response", "all"])
def test_response_logps_with_z_at_the_head(lm, z_positions):
    model = PreferenceModel(lm, None)
    hidden = lm.model(input_ids=IDS, attention_mask=ATTN).last_hidden_state.detach()
    model.latent = SimpleNamespace(z_positions=z_positions)
    sums, counts, logit_sums, z_kl = model.score(hidden, BATCH, Z, with_logits=True)
    assert z_kl is None  # not asked for
    ref_sums, _, ref_logits = by_hand(lm, Z)
    torch.testing.assert_close(sums, ref_sums, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(logit_sums, ref_logits, atol=1e-5, rtol=1e-5)
    assert counts.tolist() == [2, 2, 2, 1]
    assert (sums - by_hand(lm)[0]).abs().min() > 1e-3  # z changes every row's score


def test_z_kl_is_the_response_tokens_kl_to_the_lm_without_z(lm):
    """latent.lm_kl_weight's penalty: per row, the sum over response positions of KL(softmax(W(h+z)) || softmax(W h)),
    from the full forward."""
    hidden = lm.model(input_ids=IDS, attention_mask=ATTN).last_hidden_state.detach()
    z_kl = response_logps(lm, hidden, BATCH, torch.cat([Z, Z]), with_logits=True, z_kl=True)[3]
    with torch.no_grad():
        h = lm.model.norm(norm_input(lm))
        log_p = lm.lm_head(h + torch.cat([Z, Z])[:, None, :]).log_softmax(-1)
        log_p0 = lm.lm_head(h).log_softmax(-1)
    expected = [
        sum(
            (log_p[i, t - 1].exp() * (log_p[i, t - 1] - log_p0[i, t - 1])).sum().item()
            for t in range(1, 5)
            if RESP[i, t]
        )
        for i in range(4)
    ]
    torch.testing.assert_close(z_kl, torch.tensor(expected), atol=1e-5, rtol=1e-5)
    assert (z_kl > 0).all()


@pytest.mark.parametrize("z_positions", ["response", "all"])
def test_response_logps_with_z_before_the_final_norm(lm, z_positions):
    hidden = lm.model(input_ids=IDS, attention_mask=ATTN).last_hidden_state.detach()
    z4 = torch.cat([Z, Z])
    sums, counts = response_logps(lm, hidden, BATCH, z4, z_positions, norm_input(lm))
    torch.testing.assert_close(sums, by_hand(lm, Z, "pre_norm")[0], atol=1e-5, rtol=1e-5)
    assert (sums - by_hand(lm, Z, "head")[0]).abs().min() > 1e-3  # not the head's injection


def test_forward_scores_what_encode_and_score_give(lm):
    from lpc.latent import DiscreteLatent

    latent = DiscreteLatent(hidden_size=8, codebook_size=2, head_hidden_size=4)
    model = PreferenceModel(lm, latent)
    out = model(BATCH, progress=1.0, latent_mode="prior")
    hidden = lm.model(input_ids=IDS, attention_mask=ATTN).last_hidden_state
    lat = latent(
        hidden[:2, 2],
        hidden[:2, 4],
        hidden[2:].gather(1, torch.tensor([4, 3])[:, None, None].expand(2, 1, 8))[:, 0],
        mode="prior",
    )
    torch.testing.assert_close(out.latent.z, lat.z)
    ref_sums, ref_counts, ref_logits = by_hand(lm, lat.z.detach())
    torch.testing.assert_close(out.logps, ref_sums, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.logit_sums, ref_logits, atol=1e-5, rtol=1e-5)
    assert out.n_tokens.tolist() == [2, 2, 2, 1]
    plain = PreferenceModel(lm, None)(BATCH)
    assert plain.latent is None
    torch.testing.assert_close(plain.logps, by_hand(lm)[0], atol=1e-5, rtol=1e-5)


def test_latent_inputs_pool_the_prompt_and_each_response_as_the_latent_says():
    hidden = torch.arange(4 * 5 * 2, dtype=torch.float32).view(4, 5, 2)  # hidden[i, t] = (10 i + 2 t, +1)
    batch = {  # prompts of 3 and 2 tokens; responses at 3-4, 2-3 (row 1), 3 (row 2), 2-4 (row 3); row 1 padded at 4
        "attention_mask": torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]),
        "response_mask": torch.tensor(
            [[0, 0, 0, 1, 1], [0, 0, 1, 1, 0], [0, 0, 0, 1, 0], [0, 0, 1, 1, 1]], dtype=torch.bool
        ),
    }
    model = PreferenceModel(torch.nn.Identity(), DiscreteLatent(2, codebook_size=2, pool="last"), calibrate=False)
    h_prompt, h_w, h_l = model.latent_inputs(hidden, batch)
    assert h_prompt.tolist() == [[4.0, 5.0], [12.0, 13.0]]  # rows 0, 1 at positions 2, 1
    assert h_w.tolist() == [[8.0, 9.0], [16.0, 17.0]]  # rows 0, 1 at positions 4, 3
    assert h_l.tolist() == [[26.0, 27.0], [38.0, 39.0]]  # rows 2, 3 at positions 3, 4
    model.latent.pool = "mean"
    h_prompt, h_w, h_l = model.latent_inputs(hidden, batch)
    assert h_prompt.tolist() == [[2.0, 3.0], [11.0, 12.0]]  # row 0: positions 0-2 (0, 2, 4); row 1: 0-1 (10, 12)
    assert h_w.tolist() == [[7.0, 8.0], [15.0, 16.0]]  # row 0: 3-4 (6, 8); row 1: 2-3 (14, 16)
    assert h_l.tolist() == [[26.0, 27.0], [36.0, 37.0]]  # row 2: 3 alone; row 3: 2-4 (34, 36, 38)


def test_expected_hidden_norm_is_the_final_norm_weights_norm():
    def fake(weight, hidden_size):
        return SimpleNamespace(
            base_model_prefix="model",
            model=SimpleNamespace(norm=SimpleNamespace(weight=weight)),
            config=SimpleNamespace(hidden_size=hidden_size),
        )

    assert expected_hidden_norm(fake(torch.tensor([3.0, 4.0]), 2)) == pytest.approx(5.0)
    assert expected_hidden_norm(fake(torch.tensor([3.0, 4.0, 0.0]), 4)) == pytest.approx(2.0)  # not d: sqrt(d)
    assert expected_hidden_norm(fake(None, 9)) == pytest.approx(3.0)
    assert expected_hidden_norm(fake(torch.tensor([3.0, 4.0], dtype=torch.bfloat16), 2)) == pytest.approx(5.0)


def test_a_fresh_latent_is_calibrated_to_the_backbone(lm):
    from lpc.latent import DiscreteLatent

    latent = DiscreteLatent(hidden_size=8, codebook_size=3, codebook_init="hidden")
    PreferenceModel(lm, latent)
    norm = torch.linspace(0.5, 2.0, 8).norm().item()
    torch.testing.assert_close(latent.codebook.detach().norm(dim=-1), torch.full((3,), norm))
    kept = DiscreteLatent(hidden_size=8, codebook_size=3, codebook_init="hidden")
    before = kept.codebook.detach().clone()
    PreferenceModel(lm, kept, calibrate=False)
    assert torch.equal(kept.codebook.detach(), before)
    assert math.isclose(norm, 3.7985, rel_tol=1e-4)  # sqrt(sum of squares of 0.5, 0.71, ..., 2)
