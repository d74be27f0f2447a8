"""Latent-analysis metrics on hand-computed examples, the written plots, and the end-of-training hook."""

import math
from collections import Counter

import numpy as np
import pytest
import torch

from lpc.evaluation.analysis import (
    PLOT_FILES,
    accuracy_by_group,
    code_usage,
    latent_report,
    mean_prior_entropy,
    nmi,
    purity,
)


def test_nmi_and_purity_by_hand():
    true, pred = [0, 0, 1, 1], [0, 0, 0, 1]
    # H(T) = ln 2; H(C) = -(3/4 ln 3/4 + 1/4 ln 1/4);
    # I = 1/2 ln(4/3) + 1/4 ln(2/3) + 1/4 ln 2 = 0.215762
    h_t = math.log(2)
    h_c = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))
    mi = 0.5 * math.log(4 / 3) + 0.25 * math.log(2 / 3) + 0.25 * math.log(2)
    assert mi == pytest.approx(0.215762, abs=1e-6)
    assert nmi(true, pred) == pytest.approx(mi / ((h_t + h_c) / 2)) == pytest.approx(0.343711, abs=1e-6)
    assert purity(true, pred) == 0.75  # cluster 0 holds {0, 0, 1}: majority 2; cluster 1 holds {1}
    assert nmi([0, 0, 1, 1], [7, 7, 3, 3]) == pytest.approx(1.0)  # a relabelling
    assert nmi([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)  # independent
    assert purity([0, 1, 0, 1], [0, 0, 0, 0]) == 0.5


def test_code_usage_and_prior_entropy_by_hand():
    u = code_usage([0, 0, 1, 3], 4)
    assert u["histogram"] == [2, 1, 0, 1] and u["used"] == 3
    h = -(0.5 * math.log(0.5) + 2 * 0.25 * math.log(0.25))  # 1.0397
    assert u["entropy"] == pytest.approx(h) and u["perplexity"] == pytest.approx(math.exp(h))
    assert mean_prior_entropy([[0.25] * 4, [1.0, 0, 0, 0]]) == pytest.approx(math.log(4) / 2)
    assert accuracy_by_group([1, 0, 1, 1], ["a", "a", "b", "b"]) == {"a": 0.5, "b": 1.0}


def test_latent_report_metrics_and_plots(tmp_path):
    types = [0] * 6 + [1] * 6
    # type 0: 5 of 6 pairs ranked right; type 1: 3 of 6
    chosen = torch.tensor([1.0] * 5 + [-1.0] + [1.0] * 3 + [-1.0] * 3)
    probs = torch.tensor([[0.8, 0.1, 0.1]] * 6 + [[0.1, 0.1, 0.8]] * 5 + [[0.7, 0.2, 0.1]])
    pairs = {
        "chosen_rewards": chosen,
        "rejected_rewards": torch.zeros(12),
        "prior_probs": probs,
        "prior_code": probs.argmax(-1),
        "posterior_code": torch.tensor(types),
    }
    m = latent_report(pairs, [f"source_{t}" for t in types], types, tmp_path, embedding="pca")  # t-SNE: in training
    assert m["eval/pref_accuracy"] == pytest.approx(8 / 12)
    assert m["eval/pref_accuracy/type_0"] == pytest.approx(5 / 6)
    assert m["eval/pref_accuracy/type_1"] == pytest.approx(3 / 6)
    # NMI by hand: the prior argmax is code 0 for types {0 x6, 1 x1}, code 2 for {1 x5}; H(T) = ln 2
    mi = 6 / 12 * math.log(12 / 7) + 1 / 12 * math.log(2 / 7) + 5 / 12 * math.log(2)  # 0.453913
    h_c = -(7 / 12 * math.log(7 / 12) + 5 / 12 * math.log(5 / 12))  # 0.679193
    assert m["eval/nmi"] == pytest.approx(mi / ((math.log(2) + h_c) / 2)) == pytest.approx(0.661516, abs=1e-6)
    assert m["eval/purity"] == pytest.approx(11 / 12)
    assert m["eval/posterior_nmi"] == pytest.approx(1.0)
    assert m["eval/codes_used"] == 2
    assert all(isinstance(v, (int, float)) for v in m.values())
    for name in PLOT_FILES.values():
        data = (tmp_path / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000
    # without types, the sources are the truth; a DPO run (no prior) gets accuracy only and no plots
    m2 = latent_report(
        {"chosen_rewards": chosen, "rejected_rewards": torch.zeros(12)}, ["a"] * 6 + ["b"] * 6, None, tmp_path / "dpo"
    )
    assert m2 == {
        "eval/pref_accuracy": pytest.approx(8 / 12),
        "eval/pref_accuracy/source_a": pytest.approx(5 / 6),
        "eval/pref_accuracy/source_b": pytest.approx(0.5),
    }
    assert not (tmp_path / "dpo").exists()
    with pytest.raises(ValueError, match="types has 3 entries"):
        latent_report(pairs, None, [0, 1, 0])


def nmi_by_hand(truth, codes) -> float:
    """I(T; C) / ((H(T) + H(C)) / 2) from the contingency counts; 1.0 when both have one label."""
    n = len(truth)
    joint = Counter(zip(truth, codes))
    pt, pc = Counter(truth), Counter(codes)
    mi = sum(c / n * math.log(c * n / (pt[t] * pc[k])) for (t, k), c in joint.items())
    h = lambda cnt: -sum(c / n * math.log(c / n) for c in cnt.values())  # noqa: E731
    denom = (h(pt) + h(pc)) / 2
    return 1.0 if denom == 0 else mi / denom


def reload_and_score(run_dir):
    """The run's final evaluation again, from final/: per-pair rewards and prior codes, and the eval set's types."""
    from accelerate import Accelerator
    from hydra.utils import instantiate

    from lpc.run import build_datasets, preference_trainer
    from lpc.training.checkpoint import load_checkpoint

    model, tokenizer, cfg = load_checkpoint(run_dir)
    _, eval_ds, _ = build_datasets(cfg, tokenizer)
    ref, _ = instantiate(cfg.model)  # DPO's frozen initial model
    trainer = preference_trainer(cfg, model, ref, tokenizer, eval_ds, eval_ds, run_dir, Accelerator(cpu=True))
    _, pairs = trainer.evaluate(return_pairs=True)
    return pairs, list(eval_ds["type"])


def test_nmi_by_hand_helper_agrees_with_the_worked_examples():
    assert nmi_by_hand([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(0.343711, abs=1e-6)
    assert nmi_by_hand([0, 0, 1, 1], [7, 7, 3, 3]) == pytest.approx(1.0)
    assert nmi_by_hand([0, 0, 1, 1], [0, 1, 0, 1]) == pytest.approx(0.0)


def test_training_writes_the_latent_analysis(tiny_lpc_run):
    from conftest import read_metrics

    m = read_metrics(tiny_lpc_run)
    for key in (
        "eval/nmi",
        "eval/purity",
        "eval/code_perplexity",
        "eval/prior_entropy",
        "eval/pref_accuracy/type_0",
        "eval/pref_accuracy/type_1",
    ):
        assert key in m, key
    # The final checkpoint, reloaded and evaluated again, gives per-pair decisions and prior codes; the run's
    # per-type accuracies, codes used and NMI are recomputed from them by hand (counts, not sklearn).
    pairs, types = reload_and_score(tiny_lpc_run)
    correct = (pairs["chosen_rewards"] > pairs["rejected_rewards"]).tolist()
    codes = pairs["prior_code"].tolist()
    assert len(types) == len(codes) == 64
    for t in (0, 1):
        mine = [c for c, ty in zip(correct, types) if ty == t]
        assert m[f"eval/pref_accuracy/type_{t}"] == pytest.approx(sum(mine) / len(mine), abs=1e-9)
    assert m["eval/pref_accuracy"] == pytest.approx(sum(correct) / 64, abs=1e-9)
    assert m["eval/codes_used"] == len(set(codes))
    assert m["eval/nmi"] == pytest.approx(nmi_by_hand(types, codes), abs=1e-6)
    for name in PLOT_FILES.values():
        assert (tiny_lpc_run / "analysis" / name).read_bytes()[:4] == b"\x89PNG"


def test_final_analysis_reports_accuracy_per_labelling_rating(tmp_path):
    """Mixed-preference UltraFeedback pairs (data.rating=mixed) carry the rating that labelled them;
    the end-of-training analysis splits the accuracy by it, as the rebuttal's table does."""
    import datasets
    import torch

    from lpc.evaluation.analysis import final_analysis

    ds = datasets.Dataset.from_dict(
        {"rating": ["helpfulness", "honesty", "helpfulness", "honesty", "honesty"], "source": ["a", "a", "b", "b", "b"]}
    )
    # correct: helpfulness 1 of 2, honesty 3 of 3
    pairs = {
        "chosen_rewards": torch.tensor([1.0, 2.0, -1.0, 0.5, 0.1]),
        "rejected_rewards": torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0]),
    }

    class StubTrainer:
        eval_dataset, tracker, step = ds, None, 0
        accelerator = type("Acc", (), {"is_main_process": True})()

        def evaluate(self, return_pairs=False):
            return {}, pairs

    m = final_analysis(StubTrainer(), tmp_path)
    assert m["eval/pref_accuracy"] == pytest.approx(4 / 5)
    assert m["eval/pref_accuracy/rating_helpfulness"] == pytest.approx(1 / 2)
    assert m["eval/pref_accuracy/rating_honesty"] == pytest.approx(3 / 3)


def test_embedding_of_identical_rows_does_not_crash():
    """A confident prior gives one identical row per pair; t-SNE would divide by zero spread (and
    scikit-learn 1.9 segfaults on it): the embedding falls back to PCA, all points at the origin."""
    from lpc.evaluation.analysis import embed_2d

    x = np.zeros((64, 8))
    x[:, 3] = 1.0
    assert np.allclose(embed_2d(x, "tsne"), 0.0)


def test_final_analysis_reads_each_pairs_own_type(tmp_path):
    """Per-type accuracy and NMI by hand from a stub trainer: a shifted ``type`` column changes both."""
    import datasets

    from lpc.evaluation.analysis import final_analysis

    class Stub:
        class accelerator:
            is_main_process = True

        tracker = None

    types = [0, 0, 0, 1, 1, 1]
    correct = [False, True, True, True, False, False]  # type 0: 2/3, type 1: 1/3
    codes = [4, 4, 7, 7, 7, 4]
    stub = Stub()
    stub.eval_dataset = datasets.Dataset.from_dict({"type": types, "source": [f"s{t}" for t in types]})
    pairs = {
        "chosen_rewards": torch.tensor([1.0 if c else -1.0 for c in correct]),
        "rejected_rewards": torch.zeros(6),
        "prior_probs": torch.nn.functional.one_hot(torch.tensor(codes), 8).float(),
        "prior_code": torch.tensor(codes),
    }
    m = final_analysis(stub, tmp_path, pairs=pairs, embedding="pca")
    assert m["eval/pref_accuracy/type_0"] == pytest.approx(2 / 3) and m["eval/pref_accuracy/type_1"] == pytest.approx(
        1 / 3
    )
    # NMI by hand: code 4 holds types {0, 0, 1}, code 7 holds {0, 1, 1}; H(T) = H(C) = ln 2
    mi = 4 / 6 * math.log(4 / 3) + 2 / 6 * math.log(2 / 3)
    assert m["eval/nmi"] == pytest.approx(mi / math.log(2))
    assert m["eval/purity"] == pytest.approx(4 / 6)
    shifted = types[1:] + types[:1]
    stub.eval_dataset = datasets.Dataset.from_dict({"type": shifted, "source": [f"s{t}" for t in shifted]})
    m2 = final_analysis(stub, tmp_path, pairs=pairs, embedding="pca")
    assert m2["eval/pref_accuracy/type_0"] != m["eval/pref_accuracy/type_0"] and m2["eval/nmi"] != m["eval/nmi"]


def test_final_analysis_alone_evaluates_reports_ceiling_and_ratings_and_logs_its_plots(tmp_path, monkeypatch):
    """Called without pairs, final_analysis asks the trainer for per-pair outputs; it reads the eval set's type,
    source, ceiling and rating columns, draws the embedding coloured by source with the embedding method and title
    it was given, and logs the metrics and both plots to the tracker at the trainer's step (main process only)."""
    import datasets
    import wandb

    from lpc.evaluation import analysis

    drawn, logged, asked = [], [], []

    def fake_embedding(probs, colour, path, method, title, codes):
        drawn.append({"colour": colour, "method": method, "title": title, "codes": codes})
        path.write_bytes(b"png")

    def fake_usage(histogram, path, title):
        drawn.append({"histogram": histogram, "title": title})
        path.write_bytes(b"png")

    monkeypatch.setattr(analysis, "plot_prior_embedding", fake_embedding)
    monkeypatch.setattr(analysis, "plot_code_usage", fake_usage)
    monkeypatch.setattr(wandb, "Image", lambda path: ("image", path))
    pairs = {
        "chosen_rewards": torch.tensor([1.0, 0.0, 2.0, -1.0]),  # pair 1 is a tie: not ranked right
        "rejected_rewards": torch.tensor([0.0, 0.0, 1.0, 0.0]),
        "prior_probs": torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.1, 0.7, 0.1]] * 2),
        "prior_code": torch.tensor([0, 2, 0, 2]),
    }

    class Trainer:
        eval_dataset = datasets.Dataset.from_dict(
            {
                "type": [0, 0, 1, 1],
                "source": ["a", "b", "a", "b"],
                "ceiling": [1.0, 0.5, 1.0, 0.5],
                "rating": ["honesty", "honesty", "helpfulness", "helpfulness"],
            }
        )
        tracker, step = {"wandb": object()}, 7

        class accelerator:
            is_main_process = True

            @staticmethod
            def log(metrics, step):
                logged.append((metrics, step))

        @staticmethod
        def evaluate(return_pairs=False):
            asked.append(return_pairs)
            return ({}, pairs) if return_pairs is True else {}

    m = analysis.final_analysis(Trainer(), tmp_path, embedding="pca", title="tiny DPO seed 0")
    assert asked == [True]
    assert m["eval/ceiling"] == pytest.approx(0.75)  # (1 + 0.5 + 1 + 0.5) / 4
    assert m["eval/pref_accuracy/rating_honesty"] == 0.5 and m["eval/pref_accuracy/rating_helpfulness"] == 0.5
    assert m["eval/pref_accuracy/type_0"] == 0.5 and m["eval/pref_accuracy/type_1"] == 0.5
    assert drawn == [
        {
            "colour": ["a", "b", "a", "b"],
            "method": "pca",
            "title": "tiny DPO seed 0 (K=4, 2 used): prior p(z|x), PCA",
            "codes": [0, 2, 0, 2],
        },
        {"histogram": [2, 0, 2, 0], "title": "tiny DPO seed 0 (K=4, 2 used)"},
    ]
    images = {
        "eval/prior_embedding": ("image", str(tmp_path / "prior_embedding.png")),
        "eval/code_usage": ("image", str(tmp_path / "code_usage.png")),
    }
    assert logged == [({**m, **images}, 7)]
    # the defaults: t-SNE, no title
    drawn.clear()
    (tmp_path / "defaults").mkdir()
    analysis.final_analysis(Trainer(), tmp_path / "defaults", pairs=pairs)
    assert drawn[0]["method"] == "tsne" and drawn[0]["title"] == "(K=4, 2 used): prior p(z|x), TSNE"
    # another process: the same metrics, no plots, nothing logged
    Trainer.accelerator.is_main_process = False
    logged.clear()
    assert analysis.final_analysis(Trainer(), tmp_path / "rank1", pairs=pairs) == m
    assert not (tmp_path / "rank1").exists() and logged == []
