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
