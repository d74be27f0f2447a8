"""The synthetic benchmark's generator: determinism, the conflict and visibility knobs, label noise, and
that its rows survive the pipeline (flip marker, tokenizer limits). Rewards are recomputed from the
text with the word lists, independently of the generator's own reward code."""

import math

import pytest

from lpc.data import flip_labels, tokenize_pairs
from lpc.data.synthetic import BLUNT, POLITE, SPECIFIC, VAGUE, SyntheticPreferences


def tone(text: str) -> float:
    words = text.split()
    return (sum(w in POLITE for w in words) - sum(w in BLUNT for w in words)) / len(words)


def detail(text: str) -> float:
    words = text.split()
    return (sum(w in SPECIFIC for w in words) - sum(w in VAGUE for w in words)) / len(words)


def gen(n=400, seed=0, **kw):
    return SyntheticPreferences(n_train=n, n_eval=8, seed=seed, **kw)()["train"]


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b, c = gen(seed=3), gen(seed=3), gen(seed=4)
    assert a.to_list() == b.to_list()
    assert a["chosen"] != c["chosen"]
    d = SyntheticPreferences(n_train=50, n_eval=30, seed=3)()
    assert d["eval"].to_list() == SyntheticPreferences(n_train=400, n_eval=30, seed=3)()["eval"].to_list()  # eval fixed


def test_identical_types_all_prefer_every_chosen_response():
    ds = gen(n_types=3, conflict=0.0)
    assert set(ds["type"]) == {0, 1, 2}
    # every type's reward is tone: the chosen response has the higher tone on every pair, whoever labelled it
    assert all(tone(c) > tone(r) for c, r in zip(ds["chosen"], ds["rejected"]))


def test_opposite_types_disagree_on_every_pair():
    ds = gen(n_types=2, conflict=1.0)
    for row in ds:
        d_first = tone(row["chosen"]) - tone(row["rejected"])  # type 0: r = tone; type 1 (opposite): r = -tone
        assert d_first != 0
        assert (d_first > 0) == (row["type"] == 0)  # the labeller prefers chosen, the other type rejected
    assert 0.35 < sum(ds["type"]) / len(ds) < 0.65


def test_half_conflict_makes_first_and_last_type_orthogonal():
    ds = gen(n_types=2, conflict=0.5)
    for row in ds:
        f = tone if row["type"] == 0 else detail  # angles 0 and pi/2
        assert f(row["chosen"]) > f(row["rejected"])


def test_visibility_shows_or_hides_the_source_tag():
    always, never = gen(visibility="always"), gen(visibility="never")
    assert all(p.startswith(f"[{s}] ") for p, s in zip(always["prompt"], always["source"]))
    assert not any("[source_" in p for p in never["prompt"])
    sometimes = gen(n=1000, visibility="sometimes")
    assert 0.44 < sum(p.startswith("[source_") for p in sometimes["prompt"]) / 1000 < 0.56
    with pytest.raises(ValueError, match="data.visibility"):
        SyntheticPreferences(visibility="often")


def test_bradley_terry_noise_flips_labels_at_the_expected_rate():
    clean = gen(n=300, label_noise=0.0)
    assert not any(clean["noisy_label"])
    ds = gen(n=3000, label_noise=0.1, conflict=0.0)
    # a noisy label is one where the labeller's own reward (tone at conflict 0) prefers the rejected response
    from_text = [tone(c) < tone(r) for c, r in zip(ds["chosen"], ds["rejected"])]
    assert from_text == ds["noisy_label"]
    observed = sum(from_text) / len(ds)
    expected = sum(1 / (1 + math.exp(m / 0.1)) for m in ds["margin"]) / len(ds)  # P(flip) = sigmoid(-margin/T)
    # the rate docs/synthetic-benchmark.md states for T = 0.1 (10-11%), and what the rows show
    assert 0.095 < expected < 0.12
    assert abs(observed - expected) < 0.015


def test_an_empty_split_keeps_its_columns_but_is_refused_as_a_setting():
    gen = SyntheticPreferences(n_train=16, n_eval=1)
    empty = gen.generate(0, seed=0)
    assert len(empty) == 0 and empty.column_names == gen()["train"].column_names
    with pytest.raises(ValueError, match=r"data.n_eval=0 is not allowed: an integer >= 1"):
        SyntheticPreferences(n_train=16, n_eval=0)


def test_flip_marker_rows_fit_the_tiny_models_prompt_limit():
    from lpc.backbones import build_tiny_tokenizer

    tok = build_tiny_tokenizer(1024)
    ds = SyntheticPreferences(n_train=200, n_eval=8, n_types=12)()["train"]  # two-digit source tags
    flipped = flip_labels(ds, 0.5, seed=0, marker="[FLIP]")
    assert sum(flipped["flipped"]) == 100 and all(
        p.endswith("[FLIP]") for p, f in zip(flipped["prompt"], flipped["flipped"]) if f
    )
    out, stats = tokenize_pairs(flipped, tok, max_length=64, max_prompt_length=24, split="train")
    assert len(out) == 200 and stats == {}


def test_tag_accuracy_makes_the_tag_a_weak_clue():
    ds = gen(n=4000, conflict=1.0, visibility="always", tag_accuracy=0.75)
    right = sum(p.startswith(f"[{s}]") for p, s in zip(ds["prompt"], ds["source"])) / len(ds)
    assert 0.72 < right < 0.78
    with pytest.raises(ValueError, match="data.tag_accuracy"):
        SyntheticPreferences(tag_accuracy=1.5)


@pytest.mark.parametrize(
    "kw,ceiling",
    [
        (dict(conflict=1.0, visibility="always"), 1.0),  # the tag names the type: all knowable
        (dict(conflict=1.0, visibility="never"), 0.5),  # opposite types, no clue: a coin
        (dict(conflict=1.0, visibility="always", tag_accuracy=0.75), 0.75),  # follow the tag: right 3 times in 4
        (dict(conflict=0.0, visibility="never"), 1.0),  # one preference: all knowable
    ],
)
def test_bayes_ceiling_by_hand(kw, ceiling):
    """Opposite or identical types make every pair's ceiling the same number, worked out by hand."""
    ds = gen(n=200, **kw)
    assert ds["ceiling"] == pytest.approx([ceiling] * 200)


def test_bayes_ceiling_at_orthogonal_types_is_the_share_of_pairs_they_agree_on():
    """conflict 0.5, no tag: the two types are tone and detail. Where both rank the pair the same way the
    ceiling is 1; where they disagree it is 1/2 (each type equally likely, both pass min_margin) or 1
    (only one type's margin passes min_margin, so only it can have labelled the pair)."""
    ds = gen(n=500, conflict=0.5, visibility="never")
    for c, r, ceil in zip(ds["chosen"], ds["rejected"], ds["ceiling"]):
        dt, dd = tone(c) - tone(r), detail(c) - detail(r)
        if abs(dt) >= 0.05 and abs(dd) >= 0.05:
            assert ceil == pytest.approx(1.0 if dt * dd > 0 else 0.5)
        else:
            assert ceil == pytest.approx(1.0)


def test_generated_text_is_read_with_the_generators_words():
    from lpc.data.synthetic import generator_words, type_rewards

    assert generator_words("preciselybakeries kindly\\x1c stuffwhatnot sari a") == [
        "precisely",
        "bakeries",
        "kindly",
        "stuff",
        "whatnot",
        "a",
    ]
    # type 0 = tone at conflict 1: (1 polite - 0 blunt) / 3 words; type 1 is its opposite
    assert type_rewards("kindlyforests and", 2, 1.0) == pytest.approx([1 / 3, -1 / 3])
