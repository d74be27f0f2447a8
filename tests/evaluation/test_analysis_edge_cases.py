"""The latent analysis's edge cases by hand: ties, empty sets, float codes (evaluate returns every per-pair
tensor as float), one-code priors, the chance baseline's permutations, prefixes, titles and colours."""

from __future__ import annotations

import math

import datasets
import numpy as np
import pytest
import torch

from lpc.evaluation import analysis
from lpc.evaluation.analysis import chance_baseline, code_usage, latent_report, preference_accuracy, purity


def test_preference_accuracy_counts_a_tie_as_wrong_and_is_nan_on_nothing():
    assert preference_accuracy([1.0, 0.0, 2.0], [1.0, -1.0, 3.0]) == pytest.approx(1 / 3)
    assert math.isnan(preference_accuracy([], []))
    assert math.isnan(purity([], []))


def test_code_usage_reads_float_codes():
    assert code_usage(torch.tensor([0.0, 2.0, 2.0]), 4)["histogram"] == [1, 0, 2, 0]


def test_chance_baseline_is_the_mean_over_20_seeded_permutations():
    truth, pred = [0, 0, 1, 1, 2, 2], [0, 0, 1, 1, 2, 2]
    rng = np.random.default_rng(0)
    by_hand = np.mean([purity(rng.permutation(truth).tolist(), pred) for _ in range(20)])
    assert chance_baseline(purity, truth, pred) == pytest.approx(by_hand) == pytest.approx(0.65)
    assert chance_baseline(purity, truth, pred, seed=1) == pytest.approx(0.641667, abs=1e-6)  # another draw


@pytest.fixture
def plots(monkeypatch):
    drawn = []
    monkeypatch.setattr(
        analysis, "plot_prior_embedding", lambda probs, colour, path, method, title, codes: drawn.append(locals())
    )
    monkeypatch.setattr(analysis, "plot_code_usage", lambda histogram, path, title: drawn.append(locals()))
    return drawn


PAIRS = {
    "chosen_rewards": torch.tensor([1.0, -1.0, 2.0, 0.5]),
    "rejected_rewards": torch.zeros(4),
    # evaluate(return_pairs=True) hands every per-pair tensor over as float
    "prior_probs": torch.tensor([[0.9, 0.1, 0.0], [0.1, 0.1, 0.8], [0.6, 0.2, 0.2], [0.2, 0.1, 0.7]]),
    "prior_code": torch.tensor([0.0, 2.0, 0.0, 2.0]),
    "posterior_code": torch.tensor([0.0, 2.0, 2.0, 2.0]),
    "margin/z_zero": torch.tensor([1.0, 1.0, -1.0, 1.0]),
}


def test_latent_report_defaults_titles_and_colours(tmp_path, plots):
    m = latent_report(PAIRS, out_dir=tmp_path)  # no types, no sources: accuracy and code statistics only
    assert "eval/nmi" not in m and not any(k.startswith("eval/pref_accuracy/source") for k in m)
    assert m["eval/pref_accuracy"] == 0.75 and m["eval/codes_used"] == 2
    embedding, usage = plots
    assert embedding["method"] == "tsne" and embedding["title"] == "(K=3, 2 used): prior p(z|x), TSNE"
    assert embedding["colour"] == ["source_0"] * 4  # nothing to colour by
    assert embedding["codes"] == [0, 2, 0, 2] and all(type(c) is int for c in embedding["codes"])
    assert usage["histogram"] == [2, 0, 2] and usage["title"] == "(K=3, 2 used)"
    plots.clear()
    latent_report(PAIRS, types=[0, 1, 0, 1], out_dir=tmp_path, embedding="pca", title="run")
    assert plots[0]["colour"] == ["type_0", "type_1", "type_0", "type_1"] and plots[0]["method"] == "pca"
    assert plots[0]["title"] == "run (K=3, 2 used): prior p(z|x), PCA" and plots[1]["title"] == "run (K=3, 2 used)"


def test_latent_report_prefix_and_length_checks():
    m = latent_report(PAIRS, sources=["a", "b", "a", "b"], prefix="val/")
    assert m["val/pref_accuracy/z_zero"] == 0.75 and m["val/latent/decisions_changed"] == 0.5
    assert m["val/pref_accuracy/source_a"] == 1.0 and m["val/pref_accuracy/source_b"] == 0.5
    assert m["val/posterior_nmi"] == pytest.approx(analysis.nmi(["a", "b", "a", "b"], [0, 2, 2, 2]))
    with pytest.raises(ValueError, match="^sources has 3 entries but the evaluation has 4 pairs$"):
        latent_report(PAIRS, sources=["a", "b", "a"])


@pytest.mark.parametrize("k", [1, 2])
def test_normalised_prior_entropy_for_one_and_two_codes(k):
    probs = torch.tensor([[1.0]] * 2) if k == 1 else torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    pairs = {"chosen_rewards": torch.ones(2), "rejected_rewards": torch.zeros(2), "prior_probs": probs}
    pairs["prior_code"] = probs.argmax(-1)
    m = latent_report(pairs)
    # K = 1: nothing to normalise by (0); K = 2: mean entropy (ln 2 + 0) / 2 over ln 2
    assert m["eval/latent/prior_entropy_normalized"] == (0.0 if k == 1 else pytest.approx(0.5))


def test_final_analysis_without_a_source_column(tmp_path, plots):
    class Trainer:
        eval_dataset = datasets.Dataset.from_dict({"type": [0, 1, 0, 1]})
        tracker = None

        class accelerator:
            is_main_process = True

    m = analysis.final_analysis(Trainer(), tmp_path, pairs=PAIRS)
    assert m["eval/pref_accuracy/type_0"] == 1.0 and m["eval/pref_accuracy/type_1"] == 0.5
    assert plots[0]["colour"] == ["type_0", "type_1", "type_0", "type_1"]


def test_latent_diagnostics_by_hand_at_the_thresholds():
    """100 pairs, 60 ranked right; z = 0 flips exactly one decision (1%: not inert, the threshold is strict);
    a shuffled z ranks 59 right (gap 0.01: not prompt-independent); margins of 0.5 count as right."""
    margin = torch.tensor([0.5] * 60 + [-0.5] * 40)
    z_zero = margin.clone()
    z_zero[0] = -0.5
    shuffled = margin.clone()
    shuffled[:2] = -0.5
    shuffled[60] = 0.5
    pairs = {
        "chosen_rewards": margin,
        "rejected_rewards": torch.zeros(100),
        "margin/z_zero": z_zero,
        "margin/z_shuffled": shuffled,
        "margin/z_posterior": torch.full((100,), 0.5),
        "z_norm": torch.full((100,), 3.0),
        "hidden_norm": torch.full((100,), 12.0),
    }
    d = analysis.latent_diagnostics(pairs, prefix="p/")
    assert d == {
        "p/pref_accuracy/z_zero": pytest.approx(0.59),
        "p/pref_accuracy/z_shuffled": pytest.approx(0.59),
        "p/pref_accuracy/z_posterior": 1.0,
        "p/latent/decisions_changed": pytest.approx(0.01),
        "p/latent/inert": 0.0,
        "p/latent/shuffle_gap": pytest.approx(0.01),
        "p/latent/prompt_independent": 0.0,
        "p/latent/z_norm": 3.0,
        "p/latent/z_hidden_norm_ratio": 0.25,
    }
    pairs["margin/z_shuffled"] = -margin  # every decision reversed: a gap of 0.6 - 0.4
    pairs["hidden_norm"] = torch.zeros(100)  # a zero norm is floored at 1e-12
    d = analysis.latent_diagnostics(pairs)
    assert d["eval/latent/shuffle_gap"] == pytest.approx(0.2) and d["eval/latent/prompt_independent"] == 0.0
    assert d["eval/latent/z_hidden_norm_ratio"] == pytest.approx(3.0e12)
    pairs["margin/z_shuffled"] = margin  # no gap: independent of the prompt
    assert analysis.latent_diagnostics(pairs)["eval/latent/prompt_independent"] == 1.0
    # a gap of exactly 0.01 (2 right against 1 right of 100: 0.02 - 0.01 is 0.01 in floating point) is not under it
    few = torch.tensor([0.5] * 2 + [-0.5] * 98)
    one = torch.tensor([0.5] * 1 + [-0.5] * 99)
    d = analysis.latent_diagnostics(
        {"chosen_rewards": few, "rejected_rewards": torch.zeros(100), "margin/z_shuffled": one}
    )
    assert d["eval/latent/shuffle_gap"] == 0.01 and d["eval/latent/prompt_independent"] == 0.0


def test_numpy_of_lists_and_of_tensors_that_need_grad():
    assert analysis._numpy([1, 2]).tolist() == [1, 2]
    assert analysis._numpy(torch.tensor([1.5], requires_grad=True)).tolist() == [1.5]


def test_a_title_that_starts_with_x_keeps_it(tmp_path, plots):
    latent_report(PAIRS, out_dir=tmp_path, embedding="pca", title="XL run")
    assert (
        plots[0]["title"] == "XL run (K=3, 2 used): prior p(z|x), PCA" and plots[1]["title"] == "XL run (K=3, 2 used)"
    )
