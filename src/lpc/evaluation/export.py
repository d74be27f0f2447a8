"""Generate answers for AlpacaEval 2 and MT-bench, in the files those tools read.

    lpc-export CHECKPOINT format=alpaca_eval [questions=PATH] [out=PATH] [model_id=NAME]
    lpc-export CHECKPOINT format=mt_bench    [questions=PATH] [out=PATH] [model_id=NAME]

* ``alpaca_eval``: questions are alpaca_eval's evaluation set (a JSON list, or JSONL, of rows
  ``{instruction, output, generator, dataset}``; only ``instruction`` and ``dataset`` are read). Writes
  ``model_outputs.json``: a JSON list of ``{instruction, output, generator, dataset}``, what
  ``alpaca_eval --model_outputs model_outputs.json`` reads. Default out: ``<run>/eval/alpaca_eval/model_outputs.json``.
* ``mt_bench``: questions are FastChat's ``data/mt_bench/question.jsonl`` (rows ``{question_id, category,
  turns}``). Writes FastChat's ``model_answer/<model_id>.jsonl`` rows ``{question_id, answer_id, model_id,
  choices: [{index: 0, turns: [...]}], tstamp}``; turn 2 is generated with turn 1 and its answer in the
  conversation. Default out: ``<run>/eval/mt_bench/model_answer/<model_id>.jsonl`` (copy it to FastChat's
  ``data/mt_bench/model_answer/`` and run its judge).

CHECKPOINT may also be a sweep directory: one file per completed run, at each run's default ``out``.
Without ``questions=``, tiny question files shipped in ``lpc/evaluation/questions/`` are used (for a
smoke test). Every prompt is the conversation in the tokenizer's chat template with exactly one BOS
(``lpc.data.encode_prompt``); LPC checkpoints generate with z from the prior of that prompt (``lpc.evaluation.generate``).
"""

from __future__ import annotations

import json
import logging
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from lpc.errors import ExportError  # noqa: F401  (raised here; defined with the others)
from lpc.evaluation import QUESTIONS_DIR, runs_of
from lpc.evaluation.options import option, parse_command, usage, wants_help
from lpc.files import atomic_write_text
from lpc.progress import quiet_library_bars, tracked
from lpc.training.checkpoint import load_checkpoint
from lpc.training.rundir import RunDir

log = logging.getLogger(__name__)
FORMATS = ("alpaca_eval", "mt_bench")
DEFAULT_QUESTIONS = {
    "alpaca_eval": QUESTIONS_DIR / "alpaca_eval_tiny.json",
    "mt_bench": QUESTIONS_DIR / "mt_bench_tiny.jsonl",
}


@dataclass
class ExportConfig:
    """The options of ``lpc-export``."""

    format: str = option("alpaca_eval", "the answers file to write", choices=FORMATS)
    questions: str | None = option(None, "the questions file; null: the tiny set shipped in lpc/evaluation/questions/")
    out: str | None = option(None, "the answers file; null: under the run's eval/ (one per run of a sweep)")
    model_id: str | None = option(None, "AlpacaEval's generator, FastChat's model_id; null: the run's name")
    max_new_tokens: int = option(512, "tokens per answer", "an integer >= 1", lambda v: v >= 1)
    greedy: bool = option(True, "greedy decoding (false: sampling at temperature, top_p)")
    temperature: float = option(0.7, "sampling temperature, when greedy=false", "a number > 0", lambda v: v > 0)
    top_p: float = option(1.0, "nucleus sampling, when greedy=false", "a number in (0, 1]", lambda v: 0 < v <= 1)
    seed: int = option(0, "the sampling seed", "an integer >= 0", lambda v: v >= 0)
    limit: int | None = option(None, "the first N questions only; null: all", "an integer >= 1", lambda v: v >= 1)
    device: str | None = option(None, "null: cuda if available, else cpu")


def load_questions(path: Path, fmt: str) -> list[dict]:
    """Rows of a JSON list or a JSONL file, checked against the format's schema."""
    text = Path(path).read_text()
    rows = (
        json.loads(text)
        if text.lstrip().startswith("[")
        else [json.loads(ln) for ln in text.splitlines() if ln.strip()]
    )
    need = {"alpaca_eval": ("instruction",), "mt_bench": ("question_id", "turns")}[fmt]
    for i, row in enumerate(rows):
        missing = [k for k in need if k not in row]
        if missing:
            raise ExportError(f"questions={path}: row {i} has no {missing} (format={fmt} needs {list(need)})")
        if fmt == "mt_bench" and not (isinstance(row["turns"], list) and row["turns"]):
            raise ExportError(f"questions={path}: row {i}: turns must be a non-empty list of strings")
    return rows


def chat_prompt(tokenizer, messages: list[dict]) -> str:
    """The conversation rendered by the tokenizer's chat template, ready for the assistant's answer."""
    if not getattr(tokenizer, "chat_template", None):
        raise ExportError(
            "this checkpoint's tokenizer has no chat template; AlpacaEval/MT-bench answers need one "
            "(set tokenizer.chat_template in the checkpoint's tokenizer_config.json)"
        )
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    """The token ids the model sees for ``messages``: chat template, then exactly one BOS."""
    from lpc.data import encode_prompt

    return encode_prompt(tokenizer, chat_prompt(tokenizer, messages))


def answer(model, tokenizer, messages: list[dict], cfg: ExportConfig) -> str:
    from lpc.evaluation.generate import generate

    gen = generate(
        model,
        tokenizer,
        [chat_prompt(tokenizer, messages)],
        max_new_tokens=cfg.max_new_tokens,
        seed=cfg.seed,
        temperature=cfg.temperature,
        top_p=cfg.top_p,
        greedy=cfg.greedy,
        chat_template=False,
    )  # already rendered; generate() encodes with encode_prompt (one BOS)
    return gen[0].text.strip()


def export_alpaca_eval(model, tokenizer, rows: list[dict], model_id: str, cfg: ExportConfig) -> list[dict]:
    return [
        {
            "instruction": r["instruction"],
            "output": answer(model, tokenizer, [{"role": "user", "content": r["instruction"]}], cfg),
            "generator": model_id,
            "dataset": r.get("dataset", ""),
        }
        for r in tracked(rows, "alpaca_eval answers", log)
    ]


def export_mt_bench(model, tokenizer, rows: list[dict], model_id: str, cfg: ExportConfig) -> list[dict]:
    out = []
    for r in tracked(rows, "mt_bench answers", log):
        messages, turns = [], []
        for turn in r["turns"]:
            messages.append({"role": "user", "content": turn})
            turns.append(answer(model, tokenizer, messages, cfg))
            messages.append({"role": "assistant", "content": turns[-1]})
        out.append(
            {
                "question_id": r["question_id"],
                "answer_id": uuid.uuid4().hex,
                "model_id": model_id,
                "choices": [{"index": 0, "turns": turns}],
                "tstamp": time.time(),
            }
        )
    return out


def export(checkpoint, cfg: ExportConfig, model=None, tokenizer=None) -> Path:
    """Write the answers file for ``cfg.format``; returns its path."""
    if cfg.format not in FORMATS:
        raise ExportError(f"format={cfg.format!r} is not allowed: one of {FORMATS}")
    run = RunDir.of(checkpoint)
    run_dir, model_dir = run.path, run.require_model()
    questions = Path(cfg.questions) if cfg.questions else DEFAULT_QUESTIONS[cfg.format]
    if not questions.exists():
        raise ExportError(f"questions={questions}: no such file")
    rows = load_questions(questions, cfg.format)[: cfg.limit]
    model_id = cfg.model_id or run.name
    if model is None:
        import torch

        device = cfg.device or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer, _ = load_checkpoint(model_dir, device=device)
    chat_prompt(tokenizer, [{"role": "user", "content": "x"}])  # fail before generating if there is no template
    if cfg.format == "alpaca_eval":
        out = Path(cfg.out) if cfg.out else run_dir / "eval" / "alpaca_eval" / "model_outputs.json"
        atomic_write_text(out, json.dumps(export_alpaca_eval(model, tokenizer, rows, model_id, cfg), indent=2) + "\n")
    else:
        out = Path(cfg.out) if cfg.out else run_dir / "eval" / "mt_bench" / "model_answer" / f"{model_id}.jsonl"
        answers = export_mt_bench(model, tokenizer, rows, model_id, cfg)
        atomic_write_text(out, "".join(json.dumps(a) + "\n" for a in answers))
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or wants_help(argv):
        print(usage(ExportConfig, __doc__, "lpc-export", run="CHECKPOINT"))
        return 0 if argv else 2
    logging.basicConfig(level=logging.INFO, format="[%(levelname)s] %(name)s: %(message)s")  # progress lines
    quiet_library_bars()
    try:
        path, cfg = parse_command(argv, ExportConfig, ExportError, run="CHECKPOINT")
        runs = runs_of(path)  # a sweep directory: one answers file per completed run
        if len(runs) > 1 and cfg.out:
            raise ExportError(f"out={cfg.out}: a sweep has {len(runs)} runs; leave out= unset (one file per run)")
        paths = [export(run, cfg) for run in runs]
    except (ExportError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for path in paths:
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
