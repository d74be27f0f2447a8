"""The latent acts in a trained run (issue: "a latent that acts, and proof that it does").

A short LPC-DPO run on two opposite, visible annotator types must end with a z that matters: setting
it to 0 flips decisions, giving each prompt another prompt's z costs accuracy, the prior is far from
uniform and its codes follow the types; and generating with each type's best code raises that
type's ground-truth reward over the other's (what no DPO policy can be steered to do)."""

from __future__ import annotations

import json
import math

import pytest

from conftest import read_metrics


def test_trained_lpc_run_reports_a_latent_that_acts(tiny_lpc_acting_run):
    m = read_metrics(tiny_lpc_acting_run)
    assert m["status"] == "completed"
    # z = 0 changes decisions; a shuffled z (same distribution, wrong prompt) costs accuracy
    assert m["eval/latent/decisions_changed"] > 0.01 and m["eval/latent/inert"] == 0.0
    # over 2 points: this run gave 5.9 to 11.3 under the three kernel settings (tests/conftest.py), its configuration
    # a mean over 10 seeds above 5 (docs/method.md §7); a prompt-independent z gives 0
    assert m["eval/pref_accuracy"] - m["eval/pref_accuracy/z_shuffled"] > 0.02
    assert m["eval/latent/prompt_independent"] == 0.0
    # the prior is confident, not uniform (1.0 = uniform over K codes), and its codes follow the two types
    assert m["eval/latent/prior_entropy_normalized"] < 0.5
    assert m["eval/codes_used"] >= 2
    assert m["eval/nmi"] > m["eval/nmi_chance"] + 0.5
    # the codes grew from 0 to the hidden state's scale (0.48-0.50 of its norm under the three kernel settings)
    assert 0.2 < m["eval/latent/z_hidden_norm_ratio"] < 5
    # the synthetic data knows its best achievable accuracy: every type is knowable from the tag
    assert m["eval/ceiling"] == pytest.approx(1.0)


def test_diagnostics_reach_the_training_log(tiny_lpc_acting_run):
    rows = [json.loads(ln) for ln in (tiny_lpc_acting_run / "train_log.jsonl").read_text().splitlines()]
    final = rows[-1]
    assert final["eval/pref_accuracy"] == read_metrics(tiny_lpc_acting_run)["eval/pref_accuracy"]
    logged = [r for r in rows if "latent/prior_entropy_normalized" in r]
    # the prior starts near uniform and ends confident
    assert logged[0]["latent/prior_entropy_normalized"] > 0.9 > 0.5 > logged[-1]["latent/prior_entropy_normalized"]


def test_type_steered_generation_specialises_codes(tiny_lpc_acting_run, capsys):
    """python -m lpc.evaluation.steering: the codes specialise. Each type's reward is higher when
    generating with its own best code (chosen on one half of the prompts) than with the other type's
    best code, on the other half, beyond both 95% intervals; likewise for the codes the prior picks for
    the two source tags. (Whether the reward also ends above the other type's is a property of the
    backbone's lean as well: docs/synthetic-benchmark.md counts it per seed.)"""
    from lpc.evaluation.steering import main

    assert main([str(tiny_lpc_acting_run), "prompts=16", "samples=4"]) == 0
    result = json.loads((tiny_lpc_acting_run / "analysis" / "steering.json").read_text())
    assert "best code for type 0" in capsys.readouterr().out
    for kind in ("best_code", "prior_code"):
        codes = result[kind]
        assert codes["0"]["code"] != codes["1"]["code"], codes
        for m, other in ((0, 1), (1, 0)):
            mine, ci_mine = codes[str(m)]["report"][m]  # type m's reward with its own code
            theirs, ci_theirs = codes[str(other)]["report"][m]  # ... with the other type's code
            assert mine - ci_mine > theirs + ci_theirs, (kind, codes)
    # opposite types: every response's two rewards sum to zero
    for name, row in result["rows"].items():
        assert math.isclose(sum(mu for mu, _ in row["report"]), 0.0, abs_tol=1e-9), name


def test_steering_refuses_a_baseline_run(tiny_dpo_run, capsys):
    from lpc.evaluation.steering import main

    assert main([str(tiny_dpo_run)]) == 2
    assert "discrete latent" in capsys.readouterr().err
