"""From a data source's raw pairs to padded training batches.

Pipeline: ``source() -> check_rows -> flip_labels (train only) -> tokenize_pairs -> PairCollator``.
Every source (synthetic, UltraFeedback, binarized, JSONL) is a :class:`PreferenceData`: calling it
returns a ``DatasetDict(train=..., eval=...)`` with string columns prompt/chosen/rejected, and its
:meth:`PreferenceData.build` runs the whole pipeline with the pipeline options it shares with every
other source (``flip``, ``flip_marker``, ``on_bad_row``, ``chat_template``). The ``data`` config node
instantiates one such object.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

import datasets
import torch

from lpc.errors import DataError  # noqa: F401  (raised here; defined with the others)

log = logging.getLogger(__name__)

REQUIRED_COLUMNS = ("prompt", "chosen", "rejected")


def bad_row_reason(row: dict) -> str | None:
    for key in REQUIRED_COLUMNS:
        value = row.get(key)
        if value is None:
            return f"missing_{key}"
        if not isinstance(value, str) or not value.strip():
            return f"empty_{key}"
    if row["chosen"].strip() == row["rejected"].strip():
        return "identical_chosen_rejected"
    return None


def _drop_bad(
    ds: datasets.Dataset, reasons: list[str | None], split: str, on_bad_row: str
) -> tuple[datasets.Dataset, dict]:
    counts = Counter(r for r in reasons if r is not None)
    if not counts:
        return ds, {}
    summary = ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))
    if on_bad_row == "error":
        raise DataError(f"{split} split has bad rows ({summary}); fix the data or set data.on_bad_row=skip")
    log.warning("%s split: skipped %d of %d rows (%s)", split, sum(counts.values()), len(ds), summary)
    keep = [i for i, r in enumerate(reasons) if r is None]
    return ds.select(keep), {f"data/skipped_{split}/{k}": v for k, v in counts.items()}


def check_rows(ds: datasets.Dataset, split: str, on_bad_row: str = "skip") -> tuple[datasets.Dataset, dict]:
    """Error on missing columns; count rows with a missing/empty field or identical responses,
    then skip them with a warning (``on_bad_row=skip``) or raise (``on_bad_row=error``)."""
    missing = [c for c in REQUIRED_COLUMNS if c not in ds.column_names]
    if missing:
        raise DataError(
            f"{split} split has no column(s) {missing}; every row needs prompt, chosen and rejected "
            f"(columns found: {ds.column_names})"
        )
    reasons = [bad_row_reason(r) for r in ds.select_columns(list(REQUIRED_COLUMNS))]
    return _drop_bad(ds, reasons, split, on_bad_row)


def flip_labels(ds: datasets.Dataset, fraction: float, seed: int, marker: str | None) -> datasets.Dataset:
    """Swap chosen/rejected on exactly ``round(fraction * len)`` pairs chosen with ``seed``;
    append ``marker`` (e.g. ``[FLIP]``) to their prompts so the prior can notice them."""
    n_flip = round(fraction * len(ds))
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    flipped = set(order[:n_flip])

    def swap(row, idx):
        if idx not in flipped:
            return {"flipped": False}
        prompt = f"{row['prompt']} {marker}" if marker else row["prompt"]
        return {"prompt": prompt, "chosen": row["rejected"], "rejected": row["chosen"], "flipped": True}

    return ds.map(swap, with_indices=True, desc="flip labels")


def encode_prompt(tokenizer, prompt: str, chat_template: bool = False) -> list[int]:
    """A prompt's token ids as training sees them (and generation must too): optionally wrapped in the
    tokenizer's chat template, then exactly one BOS at the start (if the tokenizer has one)."""
    if chat_template:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
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
    one); responses end in EOS and are truncated to fit ``max_length``. A prompt longer than
    ``max_prompt_length`` is a bad row (counted; skipped or an error per ``on_bad_row``)."""
    eos = tokenizer.eos_token_id

    def encode(row):
        p = encode_prompt(tokenizer, row["prompt"], chat_template)
        budget = max_length - len(p)
        out = {"prompt_input_ids": p}
        for key in ("chosen", "rejected"):
            r = tokenizer(row[key], add_special_tokens=False)["input_ids"]
            if eos is not None:
                r = r + [eos]
            out[f"{key}_input_ids"] = r[: max(budget, 0)]
        return out

    ds = ds.map(encode, desc=f"tokenize {split}")
    reasons = ["prompt_too_long" if len(p) > max_prompt_length else None for p in ds["prompt_input_ids"]]
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
        from lpc.errors import check_choice, require

        require(
            isinstance(self.flip, (int, float)) and 0.0 <= self.flip <= 1.0,
            "flip",
            self.flip,
            "a number in [0, 1] (fraction of training pairs flipped)",
        )
        check_choice("data.on_bad_row", self.on_bad_row, ("skip", "error"))

    def __call__(self) -> datasets.DatasetDict:
        raise NotImplementedError

    def build(self, tokenizer, max_length: int, max_prompt_length: int):
        """Raw pairs -> bad-row check -> label flips (train only) -> token ids: ``(train, eval, stats)``."""
        raw = self()
        stats, out = {}, {}
        for split in ("train", "eval"):
            ds, s = check_rows(raw[split], split, self.on_bad_row)
            stats.update(s)
            if split == "train" and self.flip > 0:
                ds = flip_labels(ds, self.flip, seed=self.seed, marker=self.flip_marker)
            ds, s = tokenize_pairs(
                ds,
                tokenizer,
                max_length,
                max_prompt_length,
                split,
                chat_template=self.chat_template,
                on_bad_row=self.on_bad_row,
            )
            stats.update(s)
            out[split] = ds
        stats.update({"data/train_pairs": len(out["train"]), "data/eval_pairs": len(out["eval"])})
        return out["train"], out["eval"], stats


@dataclass
class PairCollator:
    """Stacks chosen (rows 0..B-1) and rejected (rows B..2B-1) into one right-padded batch so a
    single forward scores both, and marks what the model needs to find:

    * ``response_mask[i, t]``: token t of row i is a response token (its log-prob is scored);
    * ``prompt_last[i]``: index of the last prompt token (h_x for the LPC prior);
    * ``seq_last[i]``: index of the last token (h_{x,y} for the LPC posterior).
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
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "response_mask": response_mask,
            "prompt_last": torch.tensor(prompt_lens) - 1,
            "seq_last": attention_mask.sum(1) - 1,
        }
        if "type" in rows[0]:
            batch["type"] = torch.tensor([r["type"] for r in rows])
        if "ref_chosen_logps" in rows[0]:  # precomputed reference log-probs (lpc.training.reference), same row order
            batch["ref_logps"] = torch.tensor(
                [r["ref_chosen_logps"] for r in rows] + [r["ref_rejected_logps"] for r in rows], dtype=torch.float32
            )
        return batch
