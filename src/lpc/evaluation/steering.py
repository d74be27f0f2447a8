"""Type-steered generation: does a code make the policy write what one annotator type wants?

    lpc-steer RUN [prompts=32] [samples=4] [max_new_tokens=16] [seed=0] [temperature=1.0]

RUN is a run directory (its ``final/``, a checkpoint directory; a sweep directory: each completed run) of an LPC
model trained on ``data=synthetic``, whose generator gives every type's ground-truth reward of any text
(``lpc.data.synthetic.type_rewards``). For every code k, the policy generates ``samples`` responses to each of ``prompts`` untagged prompts
with z = e_k (so only the code, not a source tag, can steer it), and every response is scored by every
type's reward. A working LPC has codes that specialise: code k raises type m's reward. DPO has no code
and cannot be steered at all; its row is the model with z = 0 (and the prior's z, for reference).

The best code per type is chosen on the first half of the prompts and its rewards are reported on the
second half, so picking the best of K codes does not select noise. Writes ``steering.json`` and
``steering.md`` into ``RUN/analysis/`` and prints the table.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lpc.data import encode_prompt
from lpc.data.synthetic import TOPICS, VERBS, type_rewards
from lpc.errors import SteeringError  # noqa: F401  (raised here; defined with the others)
from lpc.evaluation import runs_of
from lpc.evaluation.generate import new_tokens
from lpc.evaluation.options import option, parse_command, usage, wants_help
from lpc.policy import hidden_states
from lpc.training.checkpoint import load_checkpoint
from lpc.training.rundir import RunDir

PROMPT_GRID = [f"Please {v} {t}." for t in TOPICS for v in VERBS]  # every untagged prompt the generator makes
PROMPTS_ALLOWED = f"an integer in [2, {len(PROMPT_GRID)}]"


@dataclass(frozen=True)
class SteeringOptions:
    """The options of ``lpc-steer``: ``prompts`` untagged prompts x ``samples`` responses of ``max_new_tokens``."""

    prompts: int = option(
        32,
        "untagged prompts (half choose each type's best code, half report it)",
        PROMPTS_ALLOWED,
        lambda v: 2 <= v <= len(PROMPT_GRID),
    )
    samples: int = option(4, "sampled responses per prompt and code", "an integer >= 1", lambda v: v >= 1)
    max_new_tokens: int = option(16, "tokens per response", "an integer >= 1", lambda v: v >= 1)
    seed: int = option(0, "the prompts' order and the sampling", "an integer >= 0", lambda v: v >= 0)
    temperature: float = option(1.0, "sampling temperature", "a number > 0", lambda v: v > 0)


def steering_prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct untagged prompts in the generator's format, in a seeded order."""
    g = torch.Generator().manual_seed(seed)
    if not 2 <= n <= len(PROMPT_GRID):
        raise SteeringError(f"prompts={n} is not allowed: {PROMPTS_ALLOWED}")
    return [PROMPT_GRID[i] for i in torch.randperm(len(PROMPT_GRID), generator=g)[:n].tolist()]


@torch.no_grad()
def generate_with_z(
    model,
    tokenizer,
    prompts: list[str],
    z: torch.Tensor | None,
    samples: int,
    max_new_tokens: int,
    temperature: float,
    seed: int,
    chat_template: bool = False,
) -> list[list[str]]:
    """``samples`` sampled continuations of each prompt with a fixed z (``(d,)`` or None), batched by
    prompt length so no padding enters the prompt (the prior and the policy see training's positions).
    ``chat_template``: wrap each prompt in the tokenizer's chat template, as a run trained in one saw it."""
    device = next(model.lm.parameters()).device
    encoded = [encode_prompt(tokenizer, p, chat_template) for p in prompts]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    texts: list[list[str]] = [[] for _ in prompts]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, idx in sorted(by_len.items()):
            ids = torch.tensor([encoded[i] for i in idx for _ in range(samples)], device=device)
            new = new_tokens(model, tokenizer, ids, z, max_new_tokens, False, temperature, 1.0)
            for row, i in enumerate(j for j in idx for _ in range(samples)):
                texts[i].append(tokenizer.decode(new[row], skip_special_tokens=True))
    return texts


def _mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its normal-approximation 95% interval."""
    n = len(values)
    mean = sum(values) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, 1.96 * sd / math.sqrt(n) if n > 1 else 0.0


@torch.no_grad()
def prior_code(model, tokenizer, prompts: list[str], chat_template: bool = False) -> int:
    """The code the prior picks most often (argmax) for these prompts."""
    votes: dict[int, int] = {}
    for p in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, p, chat_template)], device=next(model.lm.parameters()).device)
        every = torch.ones_like(ids)
        h = model.latent.pooled(hidden_states(model.lm, {"input_ids": ids, "attention_mask": every}), every)
        k = int(model.latent.prior_probs(h).argmax(-1))
        votes[k] = votes.get(k, 0) + 1
    return max(votes, key=votes.get)


def steering_table(
    model,
    tokenizer,
    n_types: int,
    conflict: float,
    opts: SteeringOptions = SteeringOptions(),
    sources: list[str] | None = None,
    chat_template: bool = False,
) -> dict:
    """Per code (and for z = 0): each type's mean reward on both prompt halves; per type: the code chosen
    on the first half and its rewards on the second, and the code the prior picks for prompts tagged with
    the type's source (what a user gets by tagging a prompt). ``chat_template``: prompts in the tokenizer's
    chat template (a run trained with ``data.chat_template=true``)."""
    latent = model.latent
    if latent is None or latent.num_codes == 0:
        raise SteeringError(
            "type-steered generation needs an LPC run whose latent is made of codes (a discrete latent)"
        )
    model.eval()
    texts_prompts = steering_prompts(opts.prompts, opts.seed)
    half = len(texts_prompts) // 2

    def rewards(z):
        gen = generate_with_z(
            model,
            tokenizer,
            texts_prompts,
            z,
            opts.samples,
            opts.max_new_tokens,
            opts.temperature,
            opts.seed,
            chat_template,
        )
        # per prompt-half and type: the responses' rewards
        out = []
        for part in (gen[:half], gen[half:]):
            per_type = [[] for _ in range(n_types)]
            for responses in part:
                for text in responses:
                    for m, r in enumerate(type_rewards(text, n_types, conflict)):
                        per_type[m].append(r)
            out.append(per_type)
        return out

    rows = {}
    for k in range(latent.num_codes):
        rows[f"code {k}"] = rewards(latent.code_vector(k).detach())
    rows["z = 0"] = rewards(None)
    result = {
        "n_types": n_types,
        "conflict": conflict,
        "prompts": len(texts_prompts),
        "samples": opts.samples,
        "rows": {},
        "best_code": {},
    }
    for name, (select, report) in rows.items():
        result["rows"][name] = {"select": [sum(v) / len(v) for v in select], "report": [_mean_ci(v) for v in report]}
    codes = [n for n in rows if n.startswith("code ")]
    for m in range(n_types):
        best = max(codes, key=lambda n: result["rows"][n]["select"][m])
        result["best_code"][m] = {"code": int(best.split()[1]), "report": result["rows"][best]["report"]}
    sources = list(sources or [f"source_{m}" for m in range(n_types)])
    result["prior_code"] = {}
    for m, src in enumerate(sources):
        k = prior_code(model, tokenizer, [f"[{src}] {p}" for p in texts_prompts], chat_template)
        result["prior_code"][m] = {"source": src, "code": k, "report": result["rows"][f"code {k}"]["report"]}
    return result


def markdown(result: dict) -> str:
    n = result["n_types"]
    lines = [
        f"Held-out half: {result['prompts'] - result['prompts'] // 2} untagged prompts x {result['samples']} "
        f"samples per row; mean ground-truth reward ± 95% interval.",
        "",
        "| generated with | " + " | ".join(f"type {m} reward" for m in range(n)) + " |",
        "|---|" + "---|" * n,
    ]
    for m, b in result["best_code"].items():
        cells = " | ".join(f"{mu:+.3f} ± {ci:.3f}" for mu, ci in b["report"])
        lines.append(f"| best code for type {m} (code {b['code']}, chosen on the other half) | {cells} |")
    for b in result.get("prior_code", {}).values():
        cells = " | ".join(f"{mu:+.3f} ± {ci:.3f}" for mu, ci in b["report"])
        lines.append(f"| the prior's code for `[{b['source']}]` prompts (code {b['code']}) | {cells} |")
    cells = " | ".join(f"{mu:+.3f} ± {ci:.3f}" for mu, ci in result["rows"]["z = 0"]["report"])
    lines.append(f"| z = 0 (no code: what DPO's policy can do) | {cells} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or wants_help(argv):
        print(usage(SteeringOptions, __doc__, "lpc-steer"))
        return 0 if argv else 2
    try:
        path, opts = parse_command(argv, SteeringOptions, SteeringError)
    except SteeringError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for run in runs_of(path):  # a sweep directory: every completed run
        try:
            table = steer_run(run, opts)
        except (SteeringError, FileNotFoundError) as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(table)
    return 0


def steer_run(path: Path, opts: SteeringOptions) -> str:
    """The steering table of one run, written to its analysis/ folder; returns it as markdown."""
    run = RunDir.of(path)
    model, tokenizer, cfg = load_checkpoint(run.require_model())
    if cfg is None or cfg.data.get("name") != "synthetic":
        raise SteeringError(f"{path} was not trained on data=synthetic: no ground-truth type rewards to score with")
    sources = list(cfg.data.get("sources") or []) or None
    chat = bool(cfg.data.get("chat_template", False))  # SmolLM2's tier trains in its chat template
    result = steering_table(model, tokenizer, cfg.data.n_types, float(cfg.data.conflict), opts, sources, chat)
    table = markdown(result)
    run.write_analysis("steering.json", result)
    run.write_analysis("steering.md", table)
    return table


if __name__ == "__main__":
    sys.exit(main())
