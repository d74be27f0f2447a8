"""Data of the local tasks: small hand-written JSONL files next to this module (``data/``).

The YAMLs name these functions as ``custom_dataset`` (lm-eval calls them instead of
``datasets.load_dataset``), so the tasks need no network and no path outside the package.
The row schemas are those of the hub datasets the tasks mirror (allenai/ai2_arc, openai/gsm8k,
truthfulqa/truthful_qa generation, cais/mmlu), so the prompts and metrics are the hub tasks' own.
"""

import json
from pathlib import Path

import datasets

# TruthfulQA's generation metrics (BLEU/ROUGE max/acc/diff) exactly as lm-eval's truthfulqa_gen computes them.
from lm_eval.tasks.truthfulqa.utils import process_docs_gen, process_results_gen  # noqa: F401

DATA = Path(__file__).resolve().parent / "data"


def _read_jsonl(name: str) -> list[dict]:
    with open(DATA / name) as f:
        return [json.loads(line) for line in f if line.strip()]


def _splits(**files: str) -> datasets.DatasetDict:
    return datasets.DatasetDict({split: datasets.Dataset.from_list(_read_jsonl(f)) for split, f in files.items()})


def arc_challenge(**_kwargs):
    return _splits(train="arc_challenge_train.jsonl", test="arc_challenge_test.jsonl")


def arc_easy(**_kwargs):
    return _splits(train="arc_easy_train.jsonl", test="arc_easy_test.jsonl")


def gsm8k(**_kwargs):
    return _splits(train="gsm8k_train.jsonl", test="gsm8k_test.jsonl")


def truthfulqa(**_kwargs):
    return _splits(validation="truthfulqa_validation.jsonl")


def mmlu(**_kwargs):
    return _splits(dev="mmlu_dev.jsonl", test="mmlu_test.jsonl")
