"""Real preference data: raw UltraFeedback, UltraFeedback-binarized, or a local JSONL file.

Each builder returns a ``DatasetDict`` with ``train`` and ``eval`` splits of rows
``{prompt, chosen, rejected, source}`` (strings), the schema the rest of the
pipeline expects. Hub names load through ``datasets.load_dataset``; a local file
or directory in the hub's own schema works the same way (that is what the tests
use, from ``tests/fixtures``).
"""

from __future__ import annotations

import glob
import json
import os
import random
from dataclasses import dataclass

import datasets

from lpc.data import PreferenceData, conversations_to_text
from lpc.errors import DataError, check_choice, require
from lpc.offline import hub_offline, hub_unreachable

RATING_KEYS = ("overall_score", "fine-grained_score", "helpfulness", "honesty", "truthfulness", "instruction_following")


FILE_BUILDERS = {"jsonl": "json", "json": "json", "parquet": "parquet", "csv": "csv"}


def _first_bad_json_line(path: str) -> str | None:
    """``"line N: <why>"`` for the first line of a JSONL file that is not a JSON object (N from 1)."""
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                return f"line {number}: {err.msg} (column {err.colno})"
            if not isinstance(row, dict):
                return f"line {number}: a JSON {type(row).__name__}, not an object with prompt/chosen/rejected"
    return None


def _load_files(files: list[str]) -> datasets.Dataset:
    """Local data files as one dataset with a ``row`` column: each row's 1-based number in the file (for a
    JSONL file without blank lines, its line number)."""
    ext = files[0].rsplit(".", 1)[-1]
    builder = FILE_BUILDERS.get(ext)
    if builder is None:
        raise DataError(f"unsupported data file type {files[0]!r} (use .jsonl, .json, .parquet or .csv)")
    for path in files:
        if os.path.getsize(path) == 0:
            raise DataError(f"{path} is empty: no preference pairs")
    try:
        ds = datasets.load_dataset(builder, data_files={"train": files}, split="train")
    except Exception as err:  # noqa: BLE001 - the library's error names neither the line nor the file
        bad = next(((f, why) for f in files if ext == "jsonl" for why in [_first_bad_json_line(f)] if why), None)
        if bad:
            raise DataError(f"{bad[0]}, {bad[1]}") from None
        raise DataError(f"cannot read {', '.join(files)} as {builder}: {err}") from err
    if "row" in ds.column_names:
        return ds
    return ds.add_column("row", list(range(1, len(ds) + 1)))  # (several files: numbered across them)


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
            raise DataError(
                f"{path} has no file for split {split or 'train'!r} (expected {split or 'train'}.jsonl, "
                f"{split or 'train'}.parquet or data/{split or 'train'}-*.parquet)"
            )
        return _load_files(files)
    offline = hub_offline("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")
    why = None if offline else hub_unreachable()
    if why:  # fail now, not after a minute of retries
        raise DataError(
            f"data.path={path!r} is neither a local file or directory nor reachable on the hub: {why}. "
            "Give a local copy, or set HF_DATASETS_OFFLINE=1 to read a copy in the datasets cache"
        )
    try:
        return datasets.load_dataset(path, split=split, **kwargs)
    except (ConnectionError, FileNotFoundError) as err:
        if not offline:
            raise
        raise DataError(
            f"data.path={path!r} is neither a local file or directory nor in the datasets cache, and the hub is "
            f"off (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE): download it on a networked machine or give a local copy "
            f"({err})"
        ) from None


def _split(ds: datasets.Dataset, eval_size: int | float, seed: int) -> datasets.DatasetDict:
    """A held-out eval split of ``eval_size`` rows (a fraction or a count), disjoint by row."""
    try:
        parts = ds.train_test_split(test_size=eval_size, seed=seed, shuffle=True)
    except ValueError as err:  # too few rows for this eval size (an empty source included)
        raise DataError(f"cannot split data.eval_size={eval_size!r} eval pairs off {len(ds)} rows: {err}") from None
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
    else:  # "worst" (UltraFeedback.__post_init__ allows nothing else)
        y_l = min(losers, key=lambda t: t[0])[1]
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
        check_choice("data.rating", self.rating, RATING_KEYS + ("mixed",))
        check_choice("data.rejected", self.rejected, ("random", "worst"))
        if self.rating == "mixed":
            ratings = list(self.mixed_ratings)
            ok = len(ratings) >= 2 and all(r in RATING_KEYS for r in ratings)
            require(ok, "data.mixed_ratings", ratings, f"a list of 2 or more of {RATING_KEYS}")

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
        ds = datasets.Dataset.from_list(rows) if rows else datasets.Dataset.from_dict({"prompt": []})
        ds = ds.add_column("row", raw["row"] if "row" in raw.column_names else list(range(1, len(raw) + 1)))
        return _split(ds, self.eval_size, self.seed)


@dataclass
class UltraFeedbackBinarized(PreferenceData):
    """``HuggingFaceH4/ultrafeedback_binarized`` (chosen/rejected as message lists)."""

    path: str = "HuggingFaceH4/ultrafeedback_binarized"
    train_split: str = "train_prefs"
    eval_split: str = "test_prefs"
    max_rows: int | None = None
    name: str = "ultrafeedback_binarized"

    def _convert(self, ds: datasets.Dataset) -> datasets.Dataset:
        """Message lists to text; a multi-turn conversation is the whole prompt (data.from_conversation)."""
        if self.max_rows:
            ds = ds.select(range(min(self.max_rows, len(ds))))
        if "row" not in ds.column_names:
            ds = ds.add_column("row", list(range(1, len(ds) + 1)))
        keep = [c for c in ("prompt", "chosen", "rejected", "source", "row") if c in ds.column_names]
        ds = conversations_to_text(ds.select_columns(keep))
        return ds if "source" in ds.column_names else ds.add_column("source", [""] * len(ds))

    def __post_init__(self):
        super().__post_init__()
        one_file = os.path.isfile(os.path.expanduser(self.path))  # it would be both splits: eval = train
        require(
            not one_file,
            "data.path",
            self.path,
            f"a directory or hub name with both the train split ({self.train_split}) and the held-out eval split "
            f"({self.eval_split}); one file would be both (data=jsonl takes data.train_file and data.eval_file)",
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
        """Rows as given, or in the conversational format (message lists, converted by
        ``lpc.data.from_conversation``); without ``eval_file`` an ``eval_size`` split is held out."""
        train = conversations_to_text(_load(self.train_file))
        if self.eval_file:
            return datasets.DatasetDict({"train": train, "eval": conversations_to_text(_load(self.eval_file))})
        return _split(train, self.eval_size, self.seed)
