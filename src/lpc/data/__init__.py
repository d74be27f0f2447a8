"""From a data source's raw pairs to padded training batches.

Pipeline: ``source() -> check_rows -> hold_out -> flip_labels (train only) -> tokenize_pairs -> PairCollator``.
Every source (synthetic, UltraFeedback, binarized, JSONL) is a :class:`PreferenceData`: calling it
returns a ``DatasetDict(train=..., eval=...)`` with string columns prompt/chosen/rejected, and its
:meth:`PreferenceData.build` runs the whole pipeline with the pipeline options it shares with every
other source (``flip``, ``flip_marker``, ``on_bad_row``, ``chat_template``). The ``data`` config node
instantiates one such object. The text stages (:meth:`PreferenceData.pairs`) need no tokenizer, so a run
checks its data before any model loads; only the token stage (:meth:`PreferenceData.tokenize`) follows it.

Rows may carry a ``row`` column: their 1-based position in the source file or split (for a JSONL file, the
line number when it has no blank lines), which errors and warnings quote. A conversation's prompt may carry a
``messages`` column (the prompt's turns as JSON) that the chat template renders (:func:`from_conversation`).
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import datasets
import torch

from lpc.errors import DataError, check_choice, require_number

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")
SHOWN_ROWS = 10  # row numbers quoted per reason in a bad-row message


def bad_row_reason(row: dict) -> str | None:
    for key in REQUIRED_COLUMNS:
        value = row.get(key)
        if value is None:
            return f"missing_{key}"
        if not isinstance(value, str):  # a number, a list that is no conversation, ...
            return f"not_text_{key}"
        if not value.strip():
            return f"empty_{key}"
    if row["chosen"].strip() == row["rejected"].strip():
        return "identical_chosen_rejected"
    return None


def _row_numbers(ds: datasets.Dataset) -> list[int]:
    """Each row's 1-based number in its source (the ``row`` column), else its position in ``ds``."""
    return list(ds["row"]) if "row" in ds.column_names else list(range(1, len(ds) + 1))


def _drop_bad(
    ds: datasets.Dataset, reasons: list[str | None], split: str, on_bad_row: str
) -> tuple[datasets.Dataset, dict]:
    counts = Counter(r for r in reasons if r is not None)
    if not counts:
        return ds, {}
    where = defaultdict(list)
    for number, reason in zip(_row_numbers(ds), reasons):
        if reason is not None:
            where[reason].append(number)
    parts = []
    for reason, n in sorted(counts.items()):
        rows = ", ".join(map(str, where[reason][:SHOWN_ROWS])) + (", ..." if n > SHOWN_ROWS else "")
        parts.append(f"{n} {reason}: row{'s' if n > 1 else ''} {rows}")
    summary = "; ".join(parts)
    if on_bad_row == "error":
        raise DataError(f"{split} split has bad rows ({summary}); fix the data or set data.on_bad_row=skip")
    log.warning("%s split: skipped %d of %d rows (%s)", split, sum(counts.values()), len(ds), summary)
    keep = [i for i, r in enumerate(reasons) if r is None]
    return ds.select(keep), {f"data/skipped_{split}/{k}": v for k, v in counts.items()}


def check_rows(ds: datasets.Dataset, split: str, on_bad_row: str = "skip") -> tuple[datasets.Dataset, dict]:
    """Error on missing columns; count rows with a missing/empty/non-text field or identical responses,
    then skip them with a warning (``on_bad_row=skip``) or raise naming their rows (``on_bad_row=error``)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{split} split has no column(s) {missing}; every row needs prompt, chosen and rejected "
            f"(columns found: {ds.column_names})"
        )
    columns = list(REQUIRED_COLUMNS) + (["bad_reason"] if "bad_reason" in ds.column_names else [])
    reasons = [r.get("bad_reason") or bad_row_reason(r) for r in ds.select_columns(columns)]
    return _drop_bad(ds, reasons, split, on_bad_row)


def require_rows(ds: datasets.Dataset, split: str, stage: str) -> None:
    """A split left empty is an error before training, not an empty evaluation at its end."""
    if len(ds) == 0:
        raise DataError(f"the {split} split has no pairs {stage}; check the data source and its options")


def pair_key(row: dict) -> tuple:
    """A comparison's identity: the prompt (with its turns) and the two responses in either order."""
    return (
        row.get("messages") or "",
        row["prompt"].strip(),
        frozenset((row["chosen"].strip(), row["rejected"].strip())),
    )


def hold_out(train: datasets.Dataset, eval_ds: datasets.Dataset, on_bad_row: str = "skip"):
    """Eval pairs disjoint from the training pairs: an eval pair that is also a training pair (same prompt,
    same two responses, in either order) is removed with a warning (or, under ``on_bad_row=error``, an error
    naming its rows). An eval set that is wholly the training set is an error in either mode."""
    seen = {pair_key(r) for r in train.select_columns(_key_columns(train))}
    reasons = ["also_in_train" if pair_key(r) in seen else None for r in eval_ds.select_columns(_key_columns(eval_ds))]
    n = reasons.count("also_in_train")
    if n and n == len(eval_ds):
        raise DataError(
            f"all {n} eval pairs are also training pairs: the evaluation would measure the training set; "
            "give a held-out eval split or file (data.eval_file, data.eval_split) or let the source split one off"
        )
    return _drop_bad(eval_ds, reasons, "eval", on_bad_row)


def _key_columns(ds: datasets.Dataset) -> list[str]:
    return list(REQUIRED_COLUMNS) + (["messages"] if "messages" in ds.column_names else [])


def flip_labels(ds: datasets.Dataset, fraction: float, seed: int, marker: str | None) -> datasets.Dataset:
    """Swap chosen/rejected on exactly ``round(fraction * len)`` pairs chosen with ``seed``;
    append ``marker`` (e.g. ``[FLIP]``) to their prompts so the prior can notice them."""
    n_flip = round(fraction * len(ds))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    flipped = set(order[:n_flip])

    def swap(row, idx):
        if idx not in flipped:
            return {"flipped": False}
        out = {"chosen": row["rejected"], "rejected": row["chosen"], "flipped": True}
        out["prompt"] = f"{row['prompt']} {marker}" if marker else row["prompt"]
        if marker and row.get("messages"):  # the chat template renders the turns: mark the last one too
            turns = json.loads(row["messages"])
            turns[-1]["content"] = f"{turns[-1]['content']} {marker}"
            out["messages"] = json.dumps(turns)
        return out

    return ds.map(swap, with_indices=True, desc="flip labels")


# --------------------------------------------------------------------------- conversations


def _is_conversation(value) -> bool:
    return isinstance(value, list) and all(isinstance(m, dict) and "content" in m for m in value)


def render_turns(turns: list[dict]) -> str:
    """A conversation as plain text, for models trained without a chat template: ``role: content`` turns
    separated by blank lines (one turn alone is its content)."""
    if len(turns) == 1:
        return turns[0]["content"]
    return "\n\n".join(f"{m.get('role', 'user')}: {m['content']}" for m in turns)


def from_conversation(row: dict) -> dict:
    """One row in the conversational format (``chosen``/``rejected`` as lists of ``{role, content}`` messages,
    as most hub preference sets store them) as the pipeline's text columns.

    The prompt is the whole conversation before the replies: the turns ``chosen`` and ``rejected`` share, or
    ``prompt`` (a string or its own message list) when the lists hold only the replies. The replies are what
    follows; each must be one message. ``messages`` keeps the prompt's turns (JSON) for the chat template when
    there is more than one; ``prompt`` is their plain-text rendering (:func:`render_turns`). A row that is not
    such a pair gets ``bad_reason`` ``not_a_conversation_pair`` (counted and skipped, or an error, by
    :func:`check_rows`)."""
    chosen, rejected, prompt = row.get("chosen"), row.get("rejected"), row.get("prompt")
    bad = {"prompt": prompt if isinstance(prompt, str) else "", "chosen": None, "rejected": None, "messages": ""}
    bad["bad_reason"] = "not_a_conversation_pair"
    if not (_is_conversation(chosen) and _is_conversation(rejected)):
        return bad
    if isinstance(prompt, str) and prompt.strip():
        given = [{"role": "user", "content": prompt}]
    elif _is_conversation(prompt):
        given = [{"role": m.get("role") or "user", "content": m["content"]} for m in prompt]
    else:
        given = []
    chosen = [{"role": m.get("role") or "assistant", "content": m["content"]} for m in chosen]
    rejected = [{"role": m.get("role") or "assistant", "content": m["content"]} for m in rejected]
    shared = 0
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
        shared += 1
    turns = chosen[:shared] or given  # the lists repeat the prompt (binarized, TRL implicit) or hold only replies
    replies = (chosen[shared:], rejected[shared:])
    if not turns or any(len(r) != 1 for r in replies):
        return bad
    return {
        "prompt": render_turns(turns),
        "chosen": replies[0][0]["content"],
        "rejected": replies[1][0]["content"],
        "messages": json.dumps(turns) if len(turns) > 1 else "",
        "bad_reason": "",
    }


def conversations_to_text(ds: datasets.Dataset) -> datasets.Dataset:
    """``ds`` with conversational ``chosen``/``rejected`` columns (lists of messages) as text columns
    (:func:`from_conversation`); a dataset whose replies are already text is returned as it is."""
    if "chosen" not in ds.column_names or not isinstance(ds.features["chosen"], (datasets.List, list)):
        return ds
    drop = [c for c in ("prompt", "chosen", "rejected", "messages") if c in ds.column_names]
    return ds.map(from_conversation, remove_columns=drop, desc="conversations")


# --------------------------------------------------------------------------- tokens


def encode_prompt(tokenizer, prompt: str, chat_template: bool = False, messages: str = "") -> list[int]:
    """A prompt's token ids as training sees them (and generation must too): optionally wrapped in the
    tokenizer's chat template (a multi-turn prompt's ``messages``, JSON, turn by turn), then exactly one BOS
    at the start (if the tokenizer has one). Without the template a conversation is its plain ``prompt``."""
    if chat_template:
        turns = json.loads(messages) if messages else [{"role": "user", "content": prompt}]
        prompt = tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    bos = tokenizer.bos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids = [bos] + ids
    return ids


def tokenize_pairs(
    ds: datasets.Dataset,
    tokenizer,
    max_length: int,
    max_prompt_length: int,
    split: str,
    chat_template: bool = False,
    on_bad_row: str = "skip",
) -> tuple[datasets.Dataset, dict]:
    """Token ids for prompt, chosen and rejected. Prompts get exactly one BOS (if the tokenizer has
    one); responses end in EOS and are truncated to fit ``max_length``. Bad rows (counted; skipped or an
    error per ``on_bad_row``): a prompt longer than ``max_prompt_length``, and a pair whose two responses are
    the same tokens once truncated (nothing left to prefer)."""
    eos = tokenizer.eos_token_id

    def encode(row):
        p = encode_prompt(tokenizer, row["prompt"], chat_template, row.get("messages") or "")
        budget = max_length - len(p)
        out = {"prompt_input_ids": p}
        for key in ("chosen", "rejected"):
            r = tokenizer(row[key], add_special_tokens=False)["input_ids"]
            if eos is not None:
                r = r + [eos]
            out[f"{key}_input_ids"] = r[: max(budget, 0)]
        return out

    ds = ds.map(encode, desc=f"tokenize {split}")
    columns = ds.select_columns(["prompt_input_ids", "chosen_input_ids", "rejected_input_ids"])
    reasons = [
        "prompt_too_long"
        if len(r["prompt_input_ids"]) > max_prompt_length
        else "identical_after_truncation"
        if r["chosen_input_ids"] == r["rejected_input_ids"]
        else None
        for r in columns
    ]
    return _drop_bad(ds, reasons, split, on_bad_row)


@dataclass(kw_only=True)
class PreferenceData:
    """The pipeline options every data source has; sources subclass it and implement ``__call__``.

    ``flip``: fraction of training pairs whose labels are swapped (label-noise experiments);
    ``flip_marker``: appended to a flipped prompt (None: no marker); ``on_bad_row``: skip | error;
    ``chat_template``: wrap prompts in the tokenizer's chat template; ``seed``: the data's own seed (the
    train/eval split, the choice of y_l, the flipped pairs), separate from the training seed so that
    seed-to-seed spread can be training variance alone."""

    seed: int = 0
    flip: float = 0.0
    flip_marker: str | None = "[FLIP]"
    on_bad_row: str = "skip"
    chat_template: bool = False
    name: str = field(default="")

    def __post_init__(self):
        require_number("data.seed", self.seed, "an integer", integer=True)
        require_number("flip", self.flip, "a number in [0, 1] (fraction of training pairs flipped)", _unit)
        check_choice("data.on_bad_row", self.on_bad_row, ("skip", "error"))

    def __call__(self) -> datasets.DatasetDict:
        raise NotImplementedError

    def pairs(self) -> tuple[datasets.DatasetDict, dict]:
        """The text stages, before any tokenizer or model: raw pairs -> bad rows -> eval held out from train
        -> label flips (train only). A split left empty is an error here."""
        raw = self()
        stats, out = {}, {}
        for split in ("train", "eval"):
            require_rows(raw[split], split, f"in the source ({self.name or type(self).__name__})")
            out[split], s = check_rows(raw[split], split, self.on_bad_row)
            stats.update(s)
            require_rows(out[split], split, "left once the bad rows were skipped")
        out["eval"], s = hold_out(out["train"], out["eval"], self.on_bad_row)
        stats.update(s)
        if self.flip > 0:
            out["train"] = flip_labels(out["train"], self.flip, seed=self.seed, marker=self.flip_marker)
        return datasets.DatasetDict(out), stats

    def tokenize(self, pairs: datasets.DatasetDict, tokenizer, max_length: int, max_prompt_length: int):
        """The token stage of :meth:`pairs`' output: ``(train, eval, stats)``."""
        stats, out = {}, {}
        for split in ("train", "eval"):
            out[split], s = tokenize_pairs(
                pairs[split],
                tokenizer,
                max_length,
                max_prompt_length,
                split,
                chat_template=self.chat_template,
                on_bad_row=self.on_bad_row,
            )
            stats.update(s)
            require_rows(
                out[split],
                split,
                f"left after tokenizing (trainer.max_length={max_length}, max_prompt_length={max_prompt_length})",
            )
        stats.update({"data/train_pairs": len(out["train"]), "data/eval_pairs": len(out["eval"])})
        return out["train"], out["eval"], stats

    def build(self, tokenizer, max_length: int, max_prompt_length: int):
        """The whole pipeline: ``(train, eval, stats)``."""
        pairs, stats = self.pairs()
        train, eval_ds, token_stats = self.tokenize(pairs, tokenizer, max_length, max_prompt_length)
        return train, eval_ds, {**stats, **token_stats}


def _unit(x) -> bool:
    return 0.0 <= x <= 1.0


@dataclass
class PairCollator:
    """Stacks chosen (rows 0..B-1) and rejected (rows B..2B-1) into one right-padded batch so a
    single forward scores both, and marks what the model needs to find:

    * ``response_mask[i, t]``: token t of row i is a response token (its log-prob is scored; the LPC posterior
      reads these positions, and the prior the real tokens before them: ``lpc.policy.prompt_mask``).
    """

    pad_token_id: int

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        seqs, prompt_lens = [], []
        for key in ("chosen", "rejected"):
            for r in rows:
                seqs.append(r["prompt_input_ids"] + r[f"{key}_input_ids"])
                prompt_lens.append(len(r["prompt_input_ids"]))
        width = max(len(s) for s in seqs)
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        response_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
        for i, (s, p) in enumerate(zip(seqs, prompt_lens)):
            input_ids[i, : len(s)] = torch.tensor(s)
            attention_mask[i, : len(s)] = 1
            response_mask[i, p : len(s)] = True
        batch = {"input_ids": input_ids, "attention_mask": attention_mask, "response_mask": response_mask}
        if "type" in rows[0]:
            batch["type"] = torch.tensor([r["type"] for r in rows])
        if "ref_chosen_logps" in rows[0]:  # precomputed reference log-probs (lpc.training.reference), same row order
            batch["ref_logps"] = torch.tensor(
                [r["ref_chosen_logps"] for r in rows] + [r["ref_rejected_logps"] for r in rows], dtype=torch.float32
            )
        return batch
