"""The data checks and the label flips by hand: each bad-row reason, the message that names the rows (at most ten
per reason), the warning of a skip, and exactly which pairs a seed flips."""

from __future__ import annotations

import json
import logging

import datasets
import pytest
import torch

from lpc.data import bad_row_reason, check_rows, flip_labels
from lpc.errors import DataError


@pytest.mark.parametrize(
    "row,reason",
    [
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, None),
        ({"prompt": None, "chosen": None, "rejected": "b"}, "missing_prompt"),  # the first column's reason
        ({"prompt": "p", "chosen": 3, "rejected": "b"}, "not_text_chosen"),
        ({"prompt": "p", "chosen": "a", "rejected": " \n"}, "empty_rejected"),
        ({"prompt": "p", "chosen": " a", "rejected": "a "}, "identical_chosen_rejected"),
        ({"prompt": "p", "chosen": "a"}, "missing_rejected"),
    ],
)
def test_bad_row_reason(row, reason):
    assert bad_row_reason(row) == reason


def rows(n_bad: int, n_good: int = 2) -> datasets.Dataset:
    bad = [{"prompt": f"q{i}", "chosen": "same", "rejected": "same"} for i in range(n_bad)]
    good = [{"prompt": f"g{i}", "chosen": "yes", "rejected": "no"} for i in range(n_good)]
    return datasets.Dataset.from_list(good + bad)


def test_an_error_names_at_most_ten_rows_per_reason():
    with pytest.raises(DataError) as err:
        check_rows(rows(12), "eval", "error")
    assert str(err.value) == (
        "eval split has bad rows (12 identical_chosen_rejected: rows 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, ...); "
        "fix the data or set data.on_bad_row=skip"
    )
    with pytest.raises(DataError, match=r"\(10 identical_chosen_rejected: rows 3, 4, 5, 6, 7, 8, 9, 10, 11, 12\);"):
        check_rows(rows(10), "eval", "error")
    with pytest.raises(DataError, match=r"\(1 identical_chosen_rejected: row 3\);"):
        check_rows(rows(1), "eval", "error")


def test_a_skip_warns_with_the_counts_and_keeps_the_good_rows_in_order(caplog):
    ds = datasets.Dataset.from_list(
        [
            {"prompt": "a", "chosen": "x", "rejected": "y", "row": 7},
            {"prompt": "", "chosen": "x", "rejected": "y", "row": 8},
            {"prompt": "b", "chosen": "x", "rejected": "z", "row": 9},
            {"prompt": "c", "chosen": "x", "rejected": "x", "row": 12},
        ]
    )
    with caplog.at_level(logging.WARNING, logger="lpc.data"):
        kept, stats = check_rows(ds, "train", "skip")
    assert kept["prompt"] == ["a", "b"]
    assert stats == {"data/skipped_train/empty_prompt": 1, "data/skipped_train/identical_chosen_rejected": 1}
    assert [r.getMessage() for r in caplog.records] == [
        "train split: skipped 2 of 4 rows (1 empty_prompt: row 8; 1 identical_chosen_rejected: row 12)"
    ]
    clean, none = check_rows(ds.select([0, 2]), "train", "skip")
    assert len(clean) == 2 and none == {}


def test_flip_labels_flips_the_first_round_f_n_of_the_seeded_permutation():
    ds = datasets.Dataset.from_list(
        [{"prompt": f"p{i}", "chosen": f"good{i}", "rejected": f"bad{i}", "messages": ""} for i in range(10)]
    )
    order = torch.randperm(10, generator=torch.Generator().manual_seed(4)).tolist()
    out = flip_labels(ds, 0.25, seed=4, marker="[FLIP]")  # round(2.5) = 2 pairs
    assert [i for i in range(10) if out[i]["flipped"]] == sorted(order[:2])
    for i in range(10):
        if i in order[:2]:
            assert (out[i]["prompt"], out[i]["chosen"], out[i]["rejected"]) == (f"p{i} [FLIP]", f"bad{i}", f"good{i}")
        else:
            assert (out[i]["prompt"], out[i]["chosen"], out[i]["rejected"]) == (f"p{i}", f"good{i}", f"bad{i}")
    assert out["messages"] == [""] * 10


def test_flip_marks_the_last_turn_and_an_unmarked_flip_keeps_the_turns():
    turns = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": "A"}, {"role": "user", "content": "R"}]
    ds = datasets.Dataset.from_list([{"prompt": "R", "chosen": "x", "rejected": "y", "messages": json.dumps(turns)}])
    marked = flip_labels(ds, 1.0, seed=0, marker="[FLIP]")[0]
    assert json.loads(marked["messages"])[-1] == {"role": "user", "content": "R [FLIP]"}
    assert json.loads(marked["messages"])[:2] == turns[:2]
    unmarked = flip_labels(ds, 1.0, seed=0, marker=None)[0]
    assert (unmarked["prompt"], unmarked["chosen"], unmarked["messages"]) == ("R", "y", json.dumps(turns))


def test_flip_labels_names_its_progress_bar(capfd):
    from datasets.utils import logging as ds_logging

    was_enabled = ds_logging.is_progress_bar_enabled()
    ds_logging.enable_progress_bar()
    try:
        flip_labels(rows(0, 3), 0.5, seed=0, marker=None)
    finally:
        if not was_enabled:
            ds_logging.disable_progress_bar()
    assert "flip labels: 100%" in capfd.readouterr().err
