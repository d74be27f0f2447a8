"""Data: the hub loaders on fixtures in the hubs' own schemas, bad-row handling, label flips,
tokenisation and the pair collator."""

import json

import datasets
import pytest
import torch

from conftest import FIXTURES, compose
from lpc.data import (
    DataError,
    PairCollator,
    check_rows,
    flip_labels,
    from_conversation,
    hold_out,
    pair_key,
    tokenize_pairs,
)
from lpc.data.hub import JsonlPreferences, UltraFeedback, UltraFeedbackBinarized, _load
from lpc.data.synthetic import SyntheticPreferences
from lpc.run import build_datasets

UF = str(FIXTURES / "ultrafeedback.jsonl")
UF_BIN = str(FIXTURES / "ultrafeedback_binarized")
PAIRS = str(FIXTURES / "pairs.jsonl")


@pytest.fixture(scope="module")
def tokenizer():
    from lpc.backbones import build_tiny_tokenizer

    return build_tiny_tokenizer(1024)


def all_rows(dd: datasets.DatasetDict) -> dict[str, dict]:
    """train + eval rows keyed by prompt."""
    rows = list(dd["train"]) + list(dd["eval"])
    return {r["prompt"]: r for r in rows}


# --------------------------------------------------------------------------- raw UltraFeedback


def test_ultrafeedback_pairs_best_vs_random_other():
    dd = UltraFeedback(path=UF, seed=0)()
    assert len(dd["train"]) + len(dd["eval"]) == 8 and len(dd["eval"]) >= 1
    rows = all_rows(dd)
    r = rows["Name a primary colour."]
    assert r["chosen"] == "UF-1-A red"  # overall 8.5, the best
    assert r["rejected"] in {"UF-1-B green", "UF-1-C purple", "UF-1-D banana"}
    assert r["source"] == "evol_instruct"
    # two completions tied for best: y_w is the first, y_l is never the other winner
    r = rows["Give a synonym of fast."]
    assert r["chosen"] == "UF-5-A quick" and r["rejected"] in {"UF-5-C slow", "UF-5-D table"}
    assert rows["What happens if you swallow gum?"]["source"] == "truthful_qa"
    assert rows["What happens if you swallow gum?"]["chosen"] == "UF-6-A it passes through"
    # all four completions tied: no pair, the row reaches check_rows empty and is dropped there
    tied = rows["Why is the moon made of cheese?"]
    assert tied["chosen"] is None and tied["rejected"] is None
    kept, stats = check_rows(datasets.concatenate_datasets([dd["train"], dd["eval"]]), "train")
    assert len(kept) == 7 and stats == {"data/skipped_train/missing_chosen": 1}
    assert "Why is the moon made of cheese?" not in kept["prompt"]


def test_ultrafeedback_rejected_is_deterministic_by_seed():
    def rejected(seed):
        return {p: r["rejected"] for p, r in all_rows(UltraFeedback(path=UF, seed=seed)()).items()}

    assert rejected(0) == rejected(0)
    # over seeds the random y_l of the first prompt takes more than one of its three candidates
    seen = {rejected(s)["Name a primary colour."] for s in range(8)}
    assert len(seen) >= 2 and seen <= {"UF-1-B green", "UF-1-C purple", "UF-1-D banana"}


def test_ultrafeedback_worst_rejected():
    rows = all_rows(UltraFeedback(path=UF, rejected="worst")())
    assert rows["Name a primary colour."]["rejected"] == "UF-1-D banana"
    assert rows["Name a planet."]["rejected"] == "UF-8-B the Sun"


def test_ultrafeedback_na_ratings_are_ignored():
    rows = all_rows(UltraFeedback(path=UF, rating="helpfulness")())
    # helpfulness "N/A", "5", "N/A", "2": only B and D are rated, so the pair is exactly B > D
    r = rows["Translate 'cat' to French."]
    assert (r["chosen"], r["rejected"], r["source"]) == ("UF-3-B le chat", "UF-3-D gato", "flan_v2_niv2")
    # only one rated completion: no pair
    assert rows["Say hello."]["chosen"] is None
    # every other prompt has all helpfulness ratings tied at "4": no pair either
    assert sum(r["chosen"] is not None for r in rows.values()) == 1


def test_ultrafeedback_bad_rating_key():
    with pytest.raises(ValueError, match="data.rating"):
        UltraFeedback(path=UF, rating="coolness")


# --------------------------------------------------------------------------- binarized


def test_ultrafeedback_binarized_local_split_files():
    dd = UltraFeedbackBinarized(path=UF_BIN)()
    assert len(dd["train"]) == 5 and len(dd["eval"]) == 2  # train_prefs / test_prefs, not a random split
    r = dd["train"][0]
    assert (r["prompt"], r["chosen"], r["rejected"]) == ("Name a primary colour.", "BIN-1 red", "BIN-1 banana")
    assert dd["eval"]["chosen"] == ["BIN-T1 le chat", "BIN-T2 it passes"]
    kept, stats = check_rows(dd["train"], "train")
    assert len(kept) == 4 and stats == {"data/skipped_train/identical_chosen_rejected": 1}
    assert len(UltraFeedbackBinarized(path=UF_BIN, max_rows=2)()["train"]) == 2


def test_local_dir_without_the_split_is_a_clear_error():
    with pytest.raises(DataError, match="no file for split 'train_sft'"):
        _load(UF_BIN, "train_sft")


# --------------------------------------------------------------------------- bad rows

EXPECTED_BAD = {
    "data/skipped_train/missing_chosen": 1,
    "data/skipped_train/empty_rejected": 1,
    "data/skipped_train/empty_prompt": 1,
    "data/skipped_train/identical_chosen_rejected": 2,
}


def test_check_rows_counts_every_reason_and_skips():
    ds = _load(PAIRS)
    assert len(ds) == 11
    kept, stats = check_rows(ds, "train", "skip")
    assert stats == EXPECTED_BAD
    assert len(kept) == 6 and "Name a tree." not in kept["prompt"]


def test_check_rows_error_mode_names_the_counts_and_rows():
    # rows are numbered from 1 in the file (pairs.jsonl: line 7 has no chosen, lines 10 and 11 tie)
    message = (
        "train split has bad rows (1 empty_prompt: row 9; 1 empty_rejected: row 8; "
        "2 identical_chosen_rejected: rows 10, 11; 1 missing_chosen: row 7); fix the data or set data.on_bad_row=skip"
    )
    with pytest.raises(DataError) as err:
        check_rows(_load(PAIRS), "train", "error")
    assert str(err.value) == message
    good = _load(PAIRS).select(range(6))
    assert len(check_rows(good, "train", "error")[0]) == 6  # no bad rows: no error


def test_missing_column_is_an_error(tmp_path):
    path = tmp_path / "no_rejected.jsonl"
    path.write_text(json.dumps({"prompt": "p", "chosen": "a", "answer": "b"}) + "\n")
    with pytest.raises(DataError, match=r"no column\(s\) \['rejected'\]"):
        check_rows(_load(str(path)), "train", "skip")


def held_out_copy(tmp_path) -> str:
    """pairs.jsonl with every non-empty response changed (" !" appended): the same bad rows, other pairs."""
    rows = [json.loads(line) for line in open(PAIRS)]
    for r in rows:
        for key in ("chosen", "rejected"):
            if r.get(key):
                r[key] = r[key].strip() + " !"
    path = tmp_path / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_bad_rows_counted_through_the_pipeline(tokenizer, tmp_path):
    eval_file = held_out_copy(tmp_path)
    cfg = compose(["data=jsonl", f"data.train_file={PAIRS}", f"data.eval_file={eval_file}"])
    train, ev, stats = build_datasets(cfg, tokenizer)
    assert len(train) == len(ev) == 6
    for key, n in EXPECTED_BAD.items():
        assert stats[key] == n and stats[key.replace("train", "eval")] == n
    assert stats["data/train_pairs"] == 6
    cfg = compose(["data=jsonl", f"data.train_file={PAIRS}", f"data.eval_file={eval_file}", "data.on_bad_row=error"])
    with pytest.raises(DataError, match="train split has bad rows"):
        build_datasets(cfg, tokenizer)


def test_jsonl_split_when_no_eval_file():
    dd = JsonlPreferences(train_file=PAIRS, eval_size=3, seed=0)()
    assert (len(dd["train"]), len(dd["eval"])) == (8, 3)
    assert dd["eval"]["prompt"] == JsonlPreferences(train_file=PAIRS, eval_size=3, seed=0)()["eval"]["prompt"]


# --------------------------------------------------------------------------- label flips


def toy(n):
    return datasets.Dataset.from_list(
        [{"prompt": f"p{i}", "chosen": f"good{i}", "rejected": f"bad{i}"} for i in range(n)]
    )


@pytest.mark.parametrize("n,fraction", [(10, 0.3), (7, 0.5), (20, 0.0), (5, 1.0), (13, 0.25)])
def test_flip_labels_flips_exactly_round_f_n(n, fraction):
    out = flip_labels(toy(n), fraction, seed=0, marker="[FLIP]")
    assert sum(out["flipped"]) == round(fraction * n)
    for i, r in enumerate(out):
        if r["flipped"]:
            assert (r["prompt"], r["chosen"], r["rejected"]) == (f"p{i} [FLIP]", f"bad{i}", f"good{i}")
        else:
            assert (r["prompt"], r["chosen"], r["rejected"]) == (f"p{i}", f"good{i}", f"bad{i}")


def test_flip_labels_is_deterministic_and_seeded():
    def flipped(seed):
        return flip_labels(toy(40), 0.3, seed=seed, marker=None)["flipped"]

    assert flipped(1) == flipped(1)
    assert flipped(1) != flipped(2)
    out = flip_labels(toy(40), 0.3, seed=1, marker=None)
    assert not any("[FLIP]" in p for p in out["prompt"])  # marker=None: prompts unchanged
    assert sorted(out["chosen"][i] for i in range(40) if out["flipped"][i])[0].startswith("bad")


def test_flip_through_the_config_never_touches_eval(tokenizer):
    base = ["data.n_train=50", "data.n_eval=20", "seed=3"]
    clean_train, clean_eval, _ = build_datasets(compose(base), tokenizer)
    train, ev, _ = build_datasets(compose(base + ["flip=0.3"]), tokenizer)
    assert sum(train["flipped"]) == round(0.3 * 50) == 15
    for c, f in zip(clean_train, train):
        if f["flipped"]:
            assert (f["prompt"], f["chosen"], f["rejected"]) == (c["prompt"] + " [FLIP]", c["rejected"], c["chosen"])
            assert f["chosen_input_ids"] == c["rejected_input_ids"]
        else:
            assert (f["prompt"], f["chosen"], f["rejected"]) == (c["prompt"], c["chosen"], c["rejected"])
    # the evaluation pairs are the clean ones, untouched
    assert "flipped" not in ev.column_names
    assert ev["prompt"] == clean_eval["prompt"] and ev["chosen"] == clean_eval["chosen"]
    assert not any("[FLIP]" in p for p in ev["prompt"])
    # the same config gives the same flips; data.flip_marker=null flips without a marker
    again, _, _ = build_datasets(compose(base + ["flip=0.3"]), tokenizer)
    assert again["flipped"] == train["flipped"]
    unmarked, _, _ = build_datasets(compose(base + ["flip=0.3", "data.flip_marker=null"]), tokenizer)
    assert unmarked["flipped"] == train["flipped"] and not any("[FLIP]" in p for p in unmarked["prompt"])


# --------------------------------------------------------------------------- tokenisation


def test_tokenize_pairs_bos_eos_and_prompt_too_long(tokenizer):
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ds = datasets.Dataset.from_list(
        [
            {"prompt": "Please describe rivers.", "chosen": "kindly rivers", "rejected": "whatever"},
            {"prompt": "<|bos|>Please describe rivers.", "chosen": "thanks", "rejected": "fine"},  # BOS already there
            {"prompt": "Please " * 30, "chosen": "a", "rejected": "b"},  # too long
        ]
    )
    out, stats = tokenize_pairs(ds, tokenizer, max_length=64, max_prompt_length=24, split="train")
    assert stats == {"data/skipped_train/prompt_too_long": 1} and len(out) == 2
    for r in out:
        p = r["prompt_input_ids"]
        assert p[0] == bos and p.count(bos) == 1
        for key in ("chosen_input_ids", "rejected_input_ids"):
            assert r[key][-1] == eos and r[key].count(eos) == 1 and bos not in r[key]
    assert out[0]["prompt_input_ids"] == out[1]["prompt_input_ids"]
    assert out[0]["chosen_input_ids"] == tokenizer("kindly rivers", add_special_tokens=False)["input_ids"] + [eos]
    with pytest.raises(DataError, match="1 prompt_too_long"):
        tokenize_pairs(ds, tokenizer, 64, 24, "train", on_bad_row="error")


def test_tokenize_pairs_truncates_responses_to_max_length(tokenizer):
    ds = datasets.Dataset.from_list([{"prompt": "Hi.", "chosen": "kindly " * 40, "rejected": "just fine"}])
    out, _ = tokenize_pairs(ds, tokenizer, max_length=16, max_prompt_length=8, split="train")
    r = out[0]
    assert len(r["prompt_input_ids"]) + len(r["chosen_input_ids"]) == 16
    assert r["rejected_input_ids"][-1] == tokenizer.eos_token_id  # short: untouched, ends in EOS


def test_tokenize_pairs_chat_template_one_bos(tokenizer):
    ds = datasets.Dataset.from_list([{"prompt": "hi", "chosen": "a", "rejected": "b"}])
    out, _ = tokenize_pairs(ds, tokenizer, 64, 24, "train", chat_template=True)
    p = out[0]["prompt_input_ids"]
    assert p.count(tokenizer.bos_token_id) == 1 and p[0] == tokenizer.bos_token_id
    assert tokenizer.decode(p[1:]) == "<|user|>hi\n<|assistant|>"


# --------------------------------------------------------------------------- collator


def test_pair_collator_by_hand():
    rows = [
        {"prompt_input_ids": [1, 5, 6], "chosen_input_ids": [7, 2], "rejected_input_ids": [8, 9, 2], "type": 0},
        {"prompt_input_ids": [1, 5], "chosen_input_ids": [7, 7, 7, 2], "rejected_input_ids": [2], "type": 1},
    ]
    b = PairCollator(pad_token_id=0)(rows)
    # rows: chosen 0, chosen 1, rejected 0, rejected 1; right-padded to the longest (6)
    assert b["input_ids"].tolist() == [[1, 5, 6, 7, 2, 0], [1, 5, 7, 7, 7, 2], [1, 5, 6, 8, 9, 2], [1, 5, 2, 0, 0, 0]]
    assert b["attention_mask"].tolist() == [[1, 1, 1, 1, 1, 0], [1] * 6, [1] * 6, [1, 1, 1, 0, 0, 0]]
    assert b["response_mask"].int().tolist() == [
        [0, 0, 0, 1, 1, 0],
        [0, 0, 1, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],
        [0, 0, 1, 0, 0, 0],
    ]
    assert set(b) == {"input_ids", "attention_mask", "response_mask", "type"}
    assert b["type"].tolist() == [0, 1]
    assert b["input_ids"].dtype == torch.long


def test_data_seed_fixes_split_pairs_and_flips_across_training_seeds(tokenizer):
    # the paper-scale data (raw UltraFeedback schema) with label flips: training seeds 0 and 3 see the same
    # train/eval split, the same y_l and the same flipped pairs; only data.seed changes them
    def pairs(*overrides):
        cfg = compose(["data=ultrafeedback", f"data.path={UF}", "data.eval_size=2", "flip=0.5", *overrides])
        train, ev, _ = build_datasets(cfg, tokenizer)
        return sorted(zip(train["prompt"], train["chosen"], train["rejected"])), sorted(ev["prompt"])

    assert pairs("seed=0") == pairs("seed=3")
    assert any(pairs("seed=0") != pairs("seed=0", f"data.seed={s}") for s in range(1, 6))
    flipped = [p for p, *_ in pairs("seed=0")[0] if p.endswith("[FLIP]")]
    assert len(flipped) == 2  # round(0.5 x 5 training pairs) = 2 (the 7 usable pairs less 2 for eval)


def test_instruct_models_train_in_their_chat_template():
    assert compose(["model=llama3_8b_instruct", "data=ultrafeedback"]).data.chat_template is True
    assert compose(["model=llama3_8b", "data=ultrafeedback"]).data.chat_template is False
    assert compose(["model=mistral7b", "data=jsonl", "data.train_file=x"]).data.chat_template is False
    assert compose(["model=smollm2", "data=ultrafeedback_binarized"]).data.chat_template is True
    assert compose(["model=smollm2"]).data.chat_template is False  # the synthetic data's plain prompts


# --------------------------------------------------------------------------- eval held out from train


def keys(ds) -> set:
    return {pair_key(r) for r in ds}


@pytest.mark.parametrize(
    "source",
    [
        SyntheticPreferences(seed=0),
        SyntheticPreferences(seed=7, conflict=0.0, visibility="never", flip=0.3),
        UltraFeedback(path=UF, eval_size=2),
        UltraFeedbackBinarized(path=UF_BIN),
        JsonlPreferences(train_file=PAIRS, eval_size=3),
    ],
    ids=["synthetic", "synthetic-flip", "ultrafeedback", "binarized", "jsonl-split"],
)
def test_every_source_gives_eval_pairs_disjoint_from_train(source):
    pairs, stats = source.pairs()
    assert len(pairs["eval"]) > 0 and not keys(pairs["train"]) & keys(pairs["eval"])
    assert "data/skipped_eval/also_in_train" not in stats  # disjoint by construction: nothing had to go


def test_hold_out_removes_eval_pairs_that_are_training_pairs_in_either_order():
    train = datasets.Dataset.from_list(
        [{"prompt": "p1", "chosen": "a", "rejected": "b"}, {"prompt": "p2", "chosen": "c", "rejected": "d"}]
    )
    eval_ds = datasets.Dataset.from_list(
        [
            {"prompt": "p1", "chosen": "b", "rejected": "a"},  # the same comparison, labels swapped
            {"prompt": "p2", "chosen": "c", "rejected": "e"},  # same prompt, another comparison: kept
            {"prompt": " p2 ", "chosen": "c ", "rejected": "d"},  # the same after stripping
        ]
    )
    kept, stats = hold_out(train, eval_ds)
    assert kept["rejected"] == ["e"] and stats == {"data/skipped_eval/also_in_train": 2}
    with pytest.raises(DataError, match=r"eval split has bad rows \(2 also_in_train: rows 1, 3\)"):
        hold_out(train, eval_ds, "error")
    with pytest.raises(DataError, match="all 2 eval pairs are also training pairs"):
        hold_out(train, train)


# --------------------------------------------------------------------------- conversational rows

USER, BOT = "user", "assistant"


def msg(role, content):
    return {"role": role, "content": content}


CONVERSATIONS = [
    (  # binarized, one turn: the prompt string is repeated as the first message
        {"prompt": "Q", "chosen": [msg(USER, "Q"), msg(BOT, "A")], "rejected": [msg(USER, "Q"), msg(BOT, "B")]},
        ("Q", "A", "B", ""),
    ),
    (  # binarized, several turns: every turn before the replies is the prompt, not only the first question
        {
            "prompt": "Q1",
            "chosen": [msg(USER, "Q1"), msg(BOT, "A1"), msg(USER, "Q2"), msg(BOT, "A")],
            "rejected": [msg(USER, "Q1"), msg(BOT, "A1"), msg(USER, "Q2"), msg(BOT, "B")],
        },
        ("user: Q1\n\nassistant: A1\n\nuser: Q2", "A", "B", [msg(USER, "Q1"), msg(BOT, "A1"), msg(USER, "Q2")]),
    ),
    (  # TRL's explicit-prompt conversational format: the prompt is a message list, the lists hold the replies
        {"prompt": [msg("system", "S"), msg(USER, "Q")], "chosen": [msg(BOT, "A")], "rejected": [msg(BOT, "B")]},
        ("system: S\n\nuser: Q", "A", "B", [msg("system", "S"), msg(USER, "Q")]),
    ),
    (  # TRL's implicit-prompt format: no prompt, the shared turns are the prompt
        {"chosen": [msg(USER, "Q"), msg(BOT, "A")], "rejected": [msg(USER, "Q"), msg(BOT, "B")]},
        ("Q", "A", "B", ""),
    ),
]


@pytest.mark.parametrize("row,expected", CONVERSATIONS, ids=["binarized", "multi-turn", "trl-explicit", "trl-implicit"])
def test_from_conversation(row, expected):
    out = from_conversation(row)
    prompt, chosen, rejected, turns = expected
    assert (out["prompt"], out["chosen"], out["rejected"], out["bad_reason"]) == (prompt, chosen, rejected, "")
    assert out["messages"] == (json.dumps(turns) if turns else "")


def test_a_conversation_that_is_not_one_reply_each_is_a_bad_row():
    two_replies = {"prompt": "Q", "chosen": [msg(BOT, "A"), msg(BOT, "A2")], "rejected": [msg(BOT, "B")]}
    assert from_conversation(two_replies)["bad_reason"] == "not_a_conversation_pair"
    assert from_conversation({"prompt": "Q", "chosen": [], "rejected": []})["bad_reason"] == "not_a_conversation_pair"


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_conversational_jsonl_trains_through_the_chat_template(tokenizer, tmp_path):
    rows = [
        {
            "prompt": [msg(USER, f"Q{i}"), msg(BOT, f"A{i}"), msg(USER, "again")],
            "chosen": [msg(BOT, "kindly yes")],
            "rejected": [msg(BOT, "no")],
        }
        for i in range(6)
    ]
    rows.append({"prompt": "Q", "chosen": [msg(BOT, "a"), msg(BOT, "b")], "rejected": [msg(BOT, "c")]})  # bad
    train = write_jsonl(tmp_path / "train.jsonl", rows)
    lengths = ["trainer.max_length=128", "trainer.max_prompt_length=96"]  # byte-level tokens of the tiny model
    cfg = compose(["data=jsonl", f"data.train_file={train}", "data.eval_size=2", "data.chat_template=true", *lengths])
    train_ds, eval_ds, stats = build_datasets(cfg, tokenizer)
    assert len(train_ds) + len(eval_ds) == 6 and stats["data/skipped_train/not_a_conversation_pair"] == 1
    r = train_ds[0]
    turns = json.loads(r["messages"])
    assert [t["role"] for t in turns] == [USER, BOT, USER] and turns[2]["content"] == "again"
    expected = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(r["prompt_input_ids"][1:]) == expected  # after the one BOS: every turn, templated
    assert r["chosen"] == "kindly yes"
    # without the template (a base model) the turns are the plain-text prompt
    cfg = compose(["data=jsonl", f"data.train_file={train}", "data.eval_size=2", *lengths])
    plain, _, _ = build_datasets(cfg, tokenizer)
    assert tokenizer.decode(plain[0]["prompt_input_ids"][1:]) == plain[0]["prompt"]
    assert plain[0]["prompt"].startswith("user: Q") and plain[0]["prompt"].endswith("\n\nuser: again")


def test_multi_turn_binarized_keeps_every_turn(tmp_path):
    conv = [msg(USER, "Q1"), msg(BOT, "A1"), msg(USER, "Q2")]
    for split in ("train_prefs", "test_prefs"):
        rows = [
            {"prompt": f"Q1 {split} {i}", "chosen": [*conv, msg(BOT, "good")], "rejected": [*conv, msg(BOT, "bad")]}
            for i in range(3)
        ]
        for r in rows:  # the first user message carries the row's own text, as in the hub's set
            for key in ("chosen", "rejected"):
                r[key] = [{**r[key][0], "content": r["prompt"]}, *r[key][1:]]
        write_jsonl(tmp_path / f"{split}.jsonl", rows)
    dd = UltraFeedbackBinarized(path=str(tmp_path))()
    r = dd["train"][0]
    assert r["prompt"] == "user: Q1 train_prefs 0\n\nassistant: A1\n\nuser: Q2"
    assert (r["chosen"], r["rejected"], r["row"]) == ("good", "bad", 1)
    assert [t["content"] for t in json.loads(r["messages"])] == ["Q1 train_prefs 0", "A1", "Q2"]


def test_flip_marks_the_last_turn_of_a_conversation():
    ds = datasets.Dataset.from_list(
        [{"prompt": "user: Q\n\nassistant: A\n\nuser: R", "chosen": "x", "rejected": "y",
          "messages": json.dumps([msg(USER, "Q"), msg(BOT, "A"), msg(USER, "R")])}]
    )  # fmt: skip
    out = flip_labels(ds, 1.0, seed=0, marker="[FLIP]")[0]
    assert out["prompt"].endswith("R [FLIP]") and json.loads(out["messages"])[-1]["content"] == "R [FLIP]"
    assert (out["chosen"], out["rejected"]) == ("y", "x")
