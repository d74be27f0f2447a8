"""At step 0 the LPC policy is the reference model, as DPO requires (issue: LPC on a pretrained LM).

For every latent (discrete, continuous), both places z enters (``latent.z_injection``) and both backbones
(the random-init tiny Llama and the pretrained SmolLM2-135M): the first step's implicit rewards are 0, its
loss less lambda x KL is ln 2, the policy's log-probs equal the reference's, and greedy generation with the
prior's z equals the base model's. The discrete default starts its codes at 0 (``latent.codebook_init=zeros``);
the continuous latent's training samples (u ~ N(0, 1) at the hidden state's scale) are not 0: its gate
(``latent.gate_init=0``) makes z = 0.
"""

from __future__ import annotations

import math

import pytest
import torch

from conftest import compose
from lpc.policy import hidden_states, response_logps


def build(model: str, latent: str, injection: str, tmp_path, extra=()):
    from lpc.run import build_trainer

    cfg = compose(
        [
            f"model={model}",
            f"latent={latent}",
            f"latent.z_injection={injection}",
            "data.n_train=16",
            "data.n_eval=8",
            "trainer.batch_size=4",
            "trainer.max_length=40",
            "trainer.max_prompt_length=24",
            "trainer.reference_logps=on_the_fly",
            *extra,
        ]
    )
    return build_trainer(cfg, tmp_path)[0]


def check_step_zero(trainer):
    batch = next(trainer._micro_batches(0))
    loss, metrics, _ = trainer.compute_loss(batch, progress=0.0)
    latent = trainer.model.latent
    # z is exactly 0 at the start, whatever code or sample was drawn
    assert metrics["latent/z_norm"].item() == 0.0
    assert metrics["rewards/chosen"].item() == 0.0 and metrics["rewards/rejected"].item() == 0.0
    # the loss is DPO's ln 2 plus lambda x KL(q || p) (the discrete heads are random, so the KL is not 0; the
    # continuous heads' means start at 0 with equal variances, a KL of 0)
    dpo_part = loss.item() - latent.kl_weight_at(0.0) * metrics["latent/kl"].item()
    assert dpo_part == pytest.approx(math.log(2), abs=1e-4)
    assert (metrics["latent/kl"].item() > 0) == (latent.name == "discrete")
    # the policy's response log-probs are the reference's (z-conditioned policy vs frozen initial LM)
    out = trainer.model(batch, progress=0.0)
    ref, _ = response_logps(trainer.ref_model, hidden_states(trainer.ref_model, batch), batch)
    torch.testing.assert_close(out.logps, ref, rtol=0, atol=1e-5)
    return batch


@pytest.mark.parametrize("latent", ["discrete", "continuous"])
@pytest.mark.parametrize("injection", ["head", "pre_norm"])
def test_tiny_policy_is_the_reference_at_step_zero(latent, injection, tmp_path):
    check_step_zero(build("tiny", latent, injection, tmp_path))


def test_codes_at_the_hidden_norm_without_a_gate_are_not_the_reference(tmp_path):
    """The check above can fail: codes at the hidden state's norm with no gate move the policy off the
    reference before any step (the former default)."""
    trainer = build("tiny", "discrete", "head", tmp_path, ["latent.gate_init=null", "latent.codebook_init=hidden"])
    batch = next(trainer._micro_batches(0))
    loss, metrics, _ = trainer.compute_loss(batch, progress=0.0)
    assert metrics["latent/z_norm"].item() > 1.0
    assert abs(metrics["rewards/margins"].item()) > 1e-3


def test_codes_at_the_hidden_norm_behind_a_closed_gate_start_at_the_reference(tmp_path):
    check_step_zero(build("tiny", "discrete", "head", tmp_path, ["latent.gate_init=0", "latent.codebook_init=hidden"]))


def test_a_closed_gate_on_zero_codes_is_refused(tmp_path):
    with pytest.raises(Exception, match="no gradient"):
        build("tiny", "discrete", "head", tmp_path, ["latent.gate_init=0", "latent.codebook_init=zeros"])


@pytest.mark.slow
@pytest.mark.parametrize("latent,injection", [("discrete", "head"), ("continuous", "head"), ("discrete", "pre_norm")])
def test_smollm2_policy_is_the_reference_at_step_zero(latent, injection, tmp_path):
    """The pretrained LM: the step-1 loss is ln 2 and greedy answers with the prior's z are the base model's."""
    from lpc.evaluation.integrity import LMProbe

    trainer = build("smollm2", latent, injection, tmp_path)
    check_step_zero(trainer)
    model = trainer.accelerator.unwrap_model(trainer.model)
    probe = LMProbe(trainer.tokenizer, chat_template=True)
    answers = probe.greedy(model.lm, model.latent)
    assert answers == probe.greedy(trainer.ref_model)
    # ... and they are answers, not the gibberish of an ungated code
    assert "Paris" in trainer.tokenizer.decode(answers[0])
