"""Real preference data: raw UltraFeedback, UltraFeedback-binarized, or a local JSONL file.

Each builder returns a ``DatasetDict`` with ``train`` and ``eval`` splits of rows
``{prompt, chosen, rejected, source}`` (strings), the schema the rest of the
pipeline expects. Hub names load through ``datasets.load_dataset``; a local file
or directory in the hub's own schema works the same way (that is what the tests
use, from ``tests/fixtures``).
"""

from __future__ import annotations

import glob
import os
import random
from dataclasses import dataclass

import datasets

from lpc.data import PreferenceData

RATING_KEYS = ("overall_score", "fine-grained_score", "helpfulness", "honesty", "truthfulness", "instruction_following")


FILE_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}


def _load_files(files: list[str]) -> datasets.Dataset:
    ext = files[0].rsplit(".", 1)[-1]
    builder = FILE_BUILDERS.get(ext)
    if builder is None:
        raise ValueError(f"unsupported data file type {files[0]!r} (use .jsonl, .json, .parquet or .csv)")
    return datasets.load_dataset(builder, data_files={"train": files}, split="train")


def _split_files(path: str, split: str) -> list[str]:
    """A local directory's files of one split: ``<split>.jsonl`` (or .json/.parquet/.csv), or the hub's
    own layout ``data/<split>-00000-of-00001.parquet``. Split names like ``train_prefs`` are matched
    exactly (``load_dataset(dir)`` would only know train/test/validation)."""
    for pattern in [f"{split}.{ext}" for ext in FILE_BUILDERS] + [f"{split}-*.parquet", f"data/{split}-*.parquet"]:
        files = sorted(glob.glob(os.path.join(glob.escape(path), pattern)))
        if files:
            return files
    return []


def _load(path: str, split: str | None = None, **kwargs) -> datasets.Dataset:
    """``load_dataset`` for a hub name, a local data file, a local directory with one file per split
    (see :func:`_split_files`) or a ``save_to_disk`` directory."""
    path = os.path.expanduser(path)
    if os.path.isfile(path):
        return _load_files([path])
    if os.path.isdir(path):
        if os.path.exists(os.path.join(path, "dataset_info.json")) or os.path.exists(
            os.path.join(path, "dataset_dict.json")
        ):
            ds = datasets.load_from_disk(path)
            return ds[split] if isinstance(ds, datasets.DatasetDict) else ds
        files = _split_files(path, split or "train")
        if not files:
            raise FileNotFoundError(
                f"{path} has no file for split {split!r} (expected {split}.jsonl, "
                f"{split}.parquet or data/{split}-*.parquet)"
            )
        return _load_files(files)
    return datasets.load_dataset(path, split=split, **kwargs)


def _split(ds: datasets.Dataset, eval_size: int | float, seed: int) -> datasets.DatasetDict:
    parts = ds.train_test_split(test_size=eval_size, seed=seed, shuffle=True)
    return datasets.DatasetDict({"train": parts["train"], "eval": parts["test"]})


def completion_rating(completion: dict, rating: str) -> float | None:
    """A completion's score under ``rating``; None when the annotators gave none ("N/A")."""
    if rating in ("overall_score", "fine-grained_score"):
        value = completion.get(rating)
    else:
        value = ((completion.get("annotations") or {}).get(rating) or {}).get("Rating")
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def ultrafeedback_pair(row: dict, rating: str, rng: random.Random, rejected: str = "random") -> dict:
    """y_w = the best-rated completion, y_l = a random other one (or the worst), as in the paper."""
    scored = [(completion_rating(c, rating), c["response"]) for c in row["completions"]]
    scored = [(s, r) for s, r in scored if s is not None and r]
    empty = {"prompt": row.get("instruction"), "chosen": None, "rejected": None, "source": row.get("source", "")}
    if len(scored) < 2:
        return empty
    best = max(s for s, _ in scored)
    winners = [r for s, r in scored if s == best]
    losers = [(s, r) for s, r in scored if s < best]
    if not losers:  # every completion tied: no preference to learn
        return empty
    if rejected == "random":
        y_l = rng.choice(losers)[1]
    elif rejected == "worst":
        y_l = min(losers, key=lambda t: t[0])[1]
    else:
        raise ValueError(f"data.rejected must be 'random' or 'worst', got {rejected!r}")
    return {"prompt": row["instruction"], "chosen": winners[0], "rejected": y_l, "source": row.get("source", "")}


def mixed_pair(row: dict, ratings: list[str], rng: random.Random, rejected: str = "random") -> dict:
    """A pair labelled by one rating drawn uniformly from ``ratings``; ``rating`` names it."""
    rating = rng.choice(ratings)
    return {**ultrafeedback_pair(row, rating, rng, rejected), "rating": rating}


@dataclass
class UltraFeedback(PreferenceData):
    """Raw ``openbmb/UltraFeedback`` (63,967 prompts, 4 completions each) turned into pairs."""

    path: str = "openbmb/UltraFeedback"
    split: str = "train"
    rating: str = "overall_score"
    rejected: str = "random"
    eval_size: float | int = 0.02
    max_rows: int | None = None
    name: str = "ultrafeedback"
    # rating="mixed": each prompt's pair is built under ONE of these ratings, chosen with equal
    # probability (the rebuttal's mixed-preference data); the row's `rating` column records which.
    mixed_ratings: tuple[str, ...] | list[str] = ("helpfulness", "honesty")

    def __post_init__(self):
        super().__post_init__()
        if self.rating not in RATING_KEYS + ("mixed",):
            raise ValueError(f"data.rating must be one of {RATING_KEYS + ('mixed',)}, got {self.rating!r}")
        if self.rating == "mixed":
            bad = [r for r in self.mixed_ratings if r not in RATING_KEYS]
            if len(self.mixed_ratings) < 2 or bad:
                raise ValueError(
                    f"data.mixed_ratings must list >= 2 of {RATING_KEYS}, got {list(self.mixed_ratings)!r}"
                )

    def __call__(self) -> datasets.DatasetDict:
        raw = _load(self.path, self.split)
        if self.max_rows:
            raw = raw.select(range(min(self.max_rows, len(raw))))
        rng = random.Random(self.seed)
        # Not a datasets.map: the random y_l choice must follow row order under one RNG.
        if self.rating == "mixed":
            rows = [mixed_pair(r, list(self.mixed_ratings), rng, self.rejected) for r in raw]
        else:
            rows = [ultrafeedback_pair(r, self.rating, rng, self.rejected) for r in raw]
        ds = datasets.Dataset.from_list(rows)
        return _split(ds, self.eval_size, self.seed)


def _last_assistant(messages) -> str | None:
    if isinstance(messages, str):
        return messages
    for m in reversed(messages or []):
        if m.get("role") == "assistant":
            return m.get("content")
    return None


@dataclass
class UltraFeedbackBinarized(PreferenceData):
    """``HuggingFaceH4/ultrafeedback_binarized`` (chosen/rejected as message lists)."""

    path: str = "HuggingFaceH4/ultrafeedback_binarized"
    train_split: str = "train_prefs"
    eval_split: str = "test_prefs"
    max_rows: int | None = None
    name: str = "ultrafeedback_binarized"

    def _convert(self, ds: datasets.Dataset) -> datasets.Dataset:
        if self.max_rows:
            ds = ds.select(range(min(self.max_rows, len(ds))))
        return ds.map(
            lambda r: {
                "prompt": r["prompt"],
                "chosen": _last_assistant(r["chosen"]),
                "rejected": _last_assistant(r["rejected"]),
                "source": r.get("source", "") or "",
            },
            remove_columns=ds.column_names,
        )

    def __call__(self) -> datasets.DatasetDict:
        return datasets.DatasetDict(
            {
                "train": self._convert(_load(self.path, self.train_split)),
                "eval": self._convert(_load(self.path, self.eval_split)),
            }
        )


@dataclass
class JsonlPreferences(PreferenceData):
    """A local file (JSONL/JSON/Parquet/CSV) with ``prompt``, ``chosen``, ``rejected`` columns."""

    train_file: str = ""
    eval_file: str | None = None
    eval_size: float | int = 0.05
    name: str = "jsonl"

    def __call__(self) -> datasets.DatasetDict:
        train = _load(self.train_file)
        if self.eval_file:
            return datasets.DatasetDict({"train": train, "eval": _load(self.eval_file)})
        return _split(train, self.eval_size, self.seed)
