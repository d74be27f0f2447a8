"""LM integrity (lpc.evaluation.integrity): the plain-text NLL with and without z, greedy answers' repetition and
the ``lm/damaged`` flag, each computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from lpc.evaluation import integrity
from lpc.evaluation.integrity import (
    LMProbe,
    codes_to_probe,
    eval_text_nll,
    prompt_codes_flag,
    prompt_codes_nll,
    repeat_rate,
)
from lpc.experiments.report import latent_section
from lpc.latent import pool_states


def test_repeat_rate_counts_repeated_trigrams():
    assert repeat_rate([1, 2, 3, 4, 5]) == 0.0
    assert repeat_rate([7, 7, 7, 7, 7, 7]) == pytest.approx(1 - 1 / 4)  # 4 trigrams, 1 distinct
    assert repeat_rate([1, 2, 3, 1, 2, 3]) == pytest.approx(1 - 3 / 4)  # (1,2,3) twice
    assert repeat_rate([1, 2]) == 0.0


def test_codes_to_probe_orders_by_the_priors_use_then_index():
    class Discrete:
        num_codes = 5

    class Continuous:
        num_codes = 0

    pairs = {"prior_code": torch.tensor([3.0, 3.0, 1.0, 3.0, 1.0, 4.0])}
    assert codes_to_probe(pairs, Discrete(), 4) == [3, 1, 4, 0]
    assert codes_to_probe({}, Discrete(), 2) == [0, 1]
    assert codes_to_probe(pairs, Continuous(), 4) == []  # a continuous latent has no codes


def test_prompt_codes_nll_weights_the_probed_codes_by_the_prompts_that_pick_them():
    # prompts pick code 3 twice, code 1 three times, code 0 once (not probed); code 4 is probed but never picked
    per_z_nll = {"zero": 2.0, "prior": 2.02, "code_3": 2.2, "code_1": 2.0, "code_4": 3.0}
    m = prompt_codes_nll(per_z_nll, torch.tensor([3.0, 1.0, 3.0, 1.0, 0.0, 1.0]))
    assert m["lm/nll_ratio/prompt_codes_max"] == pytest.approx(1.1)  # code 4's 1.5 is no prompt's
    assert m["lm/nll_ratio/prompt_codes_mean"] == pytest.approx((2 * 1.1 + 3 * 1.0) / 5)
    assert m["lm/prompt_codes_over"] == pytest.approx(2 / 5)  # code 3 is over the 5% tolerance
    assert prompt_codes_nll(per_z_nll, None) == {}  # no prior (DPO, or no eval diagnostics)
    assert prompt_codes_nll({"zero": 2.0}, torch.tensor([0])) == {}  # no code probed


def test_the_prompts_codes_get_their_own_flag_where_the_lm_is_judged():
    judged = {"lm/damaged": 0.0, "lm/nll_ratio": 1.01}
    assert prompt_codes_flag({**judged, "lm/nll_ratio/prompt_codes_max": 1.1}) == {"lm/prompt_codes_damaged": 1.0}
    assert prompt_codes_flag({**judged, "lm/nll_ratio/prompt_codes_max": 1.049}) == {"lm/prompt_codes_damaged": 0.0}
    assert prompt_codes_flag({**judged, "lm/nll_ratio/prompt_codes_max": 1.051}) == {"lm/prompt_codes_damaged": 1.0}
    assert prompt_codes_flag({"lm/nll_ratio/prompt_codes_max": 1.5}) == {}  # no verdict: the random-init toy
    assert prompt_codes_flag(judged) == {}  # no prompt's code probed (DPO, a continuous latent)


def test_a_run_reports_the_nll_under_the_codes_its_prompts_get(tiny_lpc_run):
    """Through the trainer's hook: the prompt codes' figures sit beside the prior's, from the same per-z NLLs."""
    import json

    from conftest import read_metrics

    m = read_metrics(tiny_lpc_run)
    report = json.loads((tiny_lpc_run / "analysis" / "integrity.json").read_text())
    nll = report["per_z_nll"]
    ratios = [v / nll["zero"] for k, v in nll.items() if k.startswith("code_")]
    assert min(ratios) - 1e-9 <= m["eval/lm/nll_ratio/prompt_codes_mean"] <= m["eval/lm/nll_ratio/prompt_codes_max"]
    assert m["eval/lm/nll_ratio/prompt_codes_max"] in ratios and 0.0 <= m["eval/lm/prompt_codes_over"] <= 1.0
    assert report["metrics"]["eval/lm/nll_ratio/prompt_codes_max"] == m["eval/lm/nll_ratio/prompt_codes_max"]
    assert "eval/lm/prompt_codes_damaged" not in m  # the random-init tiny model gets the figures, no verdict


def test_eval_text_nll_is_minus_the_chosen_logps_per_token():
    pairs = {
        "chosen_tokens": torch.tensor([2.0, 3.0]),
        "chosen_logps/z_prior": torch.tensor([-4.0, -6.0]),
        "chosen_logps/z_zero": torch.tensor([-5.0, -5.0]),
        "chosen_logps/reference": torch.tensor([-1.0, -4.0]),
    }
    assert eval_text_nll(pairs) == pytest.approx(
        {"lm/chosen_nll/prior": 2.0, "lm/chosen_nll/zero": 2.0, "lm/chosen_nll/reference": 1.0}
    )
    assert eval_text_nll({}) == {}


class Bias(torch.nn.Module):
    """A latent stand-in (``lpc.latent.Latent``'s interface, as far as the probe uses it) whose prior's z is a
    fixed vector."""

    z_positions, z_injection, num_codes = "response", "head", 0

    def __init__(self, z):
        super().__init__()
        self.z = z

    def pooled(self, hidden, mask):
        return pool_states(hidden, mask, "last")

    def prior_z(self, h_prompt, inference=None):
        return self.z.expand(h_prompt.shape[0], -1)


@pytest.fixture(scope="module")
def tiny_lm():
    from lpc.backbones import tiny_llama

    torch.manual_seed(0)
    return tiny_llama()


def test_probe_nll_matches_the_lm_forward_by_hand(tiny_lm):
    lm, tok = tiny_lm
    probe = LMProbe(tok)
    lm.eval()
    got = probe.nll(lm, {"zero": None})["zero"]
    total, n = 0.0, 0
    with torch.no_grad():
        for row in probe.rows:
            ids = torch.tensor([row["prompt_input_ids"] + row["chosen_input_ids"]])
            logp = lm(ids).logits[0, :-1].log_softmax(-1)
            p = len(row["prompt_input_ids"])
            targets = ids[0, p:]
            total -= logp[p - 1 :].gather(-1, targets[:, None]).sum().item()
            n += len(targets)
    assert got == pytest.approx(total / n, rel=1e-5)


def test_a_large_z_is_flagged_and_a_zero_z_is_not(tiny_lm):
    lm, tok = tiny_lm
    probe = LMProbe(tok)
    reference = probe.measure_reference(lm)
    # the random-init model is no language model (NLL near ln V): its runs get the figures but no verdict
    assert reference["nll"] > integrity.LM_NLL_FRACTION * math.log(lm.config.vocab_size)
    unjudged = probe.measure(lm, Bias(torch.zeros(lm.config.hidden_size)), reference, generate=False)["metrics"]
    assert unjudged["lm/reference_is_lm"] == 0.0 and "lm/damaged" not in unjudged
    reference = {**reference, "nll": 0.5 * math.log(lm.config.vocab_size)}  # judged as if it were one
    d = lm.config.hidden_size
    calm = probe.measure(lm, Bias(torch.zeros(d)), reference, generate=True)["metrics"]
    assert calm["lm/nll_ratio"] == pytest.approx(1.0) and calm["lm/damaged"] == 0.0
    assert calm["lm/repeat_rate"] == pytest.approx(calm["lm/repeat_rate/reference"])  # same greedy answers
    # a z along one token's output embedding, 30 x the hidden state's norm: every answer token loses mass
    w = lm.get_output_embeddings().weight[5].detach()
    loud = probe.measure(lm, Bias(30 * math.sqrt(d) * w / w.norm()), reference, generate=False)["metrics"]
    assert loud["lm/nll_ratio"] > 1 + integrity.NLL_TOLERANCE and loud["lm/damaged"] == 1.0
    assert loud["lm/text_nll/reference"] == pytest.approx(reference["nll"]) and loud["lm/reference_is_lm"] == 1.0


def test_the_report_lists_damaged_runs(tmp_path):
    runs = [
        {"status": "completed", "dir": tmp_path / "ok", "metrics": {"eval/lm/damaged": 0.0}},
        {
            "status": "completed",
            "dir": tmp_path / "codes",
            "metrics": {
                "eval/latent/inert": 0.0,
                "eval/lm/damaged": 0.0,
                "eval/lm/prompt_codes_damaged": 1.0,
                "eval/lm/nll_ratio/prompt_codes_max": 1.123,
                "eval/lm/prompt_codes_over": 0.25,
            },
        },
        {
            "status": "completed",
            "dir": tmp_path / "broken",
            "metrics": {
                "eval/latent/inert": 0.0,
                "eval/lm/damaged": 1.0,
                "eval/lm/nll_ratio": 2.8,
                "eval/lm/repeat_rate": 0.75,
                "eval/lm/repeat_rate/reference": 0.05,
            },
        },
    ]
    text = latent_section({"runs": runs, "sweep_dir": tmp_path})
    assert "2 runs flagged (2 LPC runs" in text
    assert (
        "`codes`: prompts' codes damage the LM: the codes the prior picks for 25% of the eval prompts raise plain "
        "text's NLL by up to +12.3%" in text
    )
    assert "`broken`: LM damaged: the prior's z changes plain text's NLL by +180.0%, greedy answers repeat 75%" in text
    assert "`ok`" not in text


@pytest.mark.slow
def test_a_trained_smollm2_lpc_run_keeps_its_answers(tmp_path):
    """The run's own integrity report on the pretrained LM: after LPC-DPO steps at the defaults, plain text's NLL
    with the prior's z is within 5% of the LM without z, the run is not flagged, and greedy answers to plain
    questions stay coherent (written beside the base model's in analysis/integrity.json)."""
    import json

    from conftest import read_metrics, run_train

    run_dir = tmp_path / "run"
    run_train(
        [
            "model=smollm2",
            "codebook=4",
            "data.chat_template=true",
            "data.n_train=16",
            "data.n_eval=8",
            "trainer.max_steps=4",
            "trainer.batch_size=2",
            "trainer.eval_batch_size=8",
            "trainer.max_length=64",
            "trainer.max_prompt_length=48",
            "trainer.save_every=0",
            "trainer.eval_every=0",
            "trainer.lr=5e-7",  # the paper's DPO rate, as experiment=synthetic_pretrained
        ],
        run_dir,
        env={"HF_HUB_OFFLINE": "1"},
    )
    m = read_metrics(run_dir)
    assert m["eval/lm/reference_is_lm"] == 1.0 and m["eval/lm/damaged"] == 0.0
    assert abs(m["eval/lm/nll_ratio"] - 1.0) < integrity.NLL_TOLERANCE
    # the codes the prompts get, with their own flag: on the pretrained tier at 60 steps these reach 1.10-1.16
    # (docs/method.md §7)
    assert (
        1.0 - integrity.NLL_TOLERANCE
        < m["eval/lm/nll_ratio/prompt_codes_mean"]
        <= m["eval/lm/nll_ratio/prompt_codes_max"]
    )
    over = m["eval/lm/nll_ratio/prompt_codes_max"] > 1.0 + integrity.NLL_TOLERANCE
    assert m["eval/lm/prompt_codes_damaged"] == float(over)
    assert m["eval/lm/text_nll/reference"] < 4.0  # SmolLM2 models the answers (2.5 nats/token; ln V = 10.8)
    report = json.loads((run_dir / "analysis" / "integrity.json").read_text())
    answers, base = report["texts"]["answers"], report["texts"]["reference_answers"]
    # The answers are coherent, not the same: z rewords 6 of 8 (measured), and at the LM's own rate of 1e-5 a z of
    # 0.5% of the hidden state's norm answered the capital question in French, which the NLL does not see
    # (docs/method.md §7). Here, at the paper's LM rate: the capital is still Paris, the same LM without z reads the
    # answers as easily as the base model's own (0.60 vs 0.58 nats/token measured), and none repeats itself.
    assert "Paris" in answers[0] and "Paris" in base[0]
    assert m["eval/lm/answer_nll"] < 1.1 * m["eval/lm/answer_nll/reference"]
    assert max(map(integrity.repeat_rate, [a.split() for a in answers])) < 0.3
