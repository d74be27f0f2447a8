"""Type-steered generation: does a code make the policy write what one annotator type wants?

    lpc-steer RUN [prompts=32] [samples=4] [max_new_tokens=16] [seed=0]

RUN is a run directory (or its ``final/``; a sweep directory: each completed run) of an LPC model trained on
``data=synthetic``, whose
generator gives every type's ground-truth reward of any text (``lpc.data.synthetic.type_rewards``).
For every code k, the policy generates ``samples`` responses to each of ``prompts`` untagged prompts
with z = e_k (so only the code, not a source tag, can steer it), and every response is scored by every
type's reward. A working LPC has codes that specialise: code k raises type m's reward. DPO has no code
and cannot be steered at all; its row is the model with z = 0 (and the prior's z, for reference).

The best code per type is chosen on the first half of the prompts and its rewards are reported on the
second half, so picking the best of K codes does not select noise. Writes ``steering.json`` and
``steering.md`` into ``RUN/analysis/`` and prints the table.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from lpc.data import encode_prompt
from lpc.data.synthetic import TOPICS, VERBS, type_rewards
from lpc.errors import SteeringError  # noqa: F401  (raised here; defined with the others)
from lpc.evaluation import is_option, runs_of
from lpc.policy import conditioned_on


@dataclass(frozen=True)
class SteeringOptions:
    """What ``lpc-steer`` samples: ``prompts`` untagged prompts x ``samples`` responses of ``max_new_tokens``."""

    prompts: int = 32
    samples: int = 4
    max_new_tokens: int = 16
    seed: int = 0
    temperature: float = 1.0


def steering_prompts(n: int, seed: int) -> list[str]:
    """``n`` distinct untagged prompts in the generator's format, in a seeded order."""
    g = torch.Generator().manual_seed(seed)
    grid = [f"Please {v} {t}." for t in TOPICS for v in VERBS]
    if not 2 <= n <= len(grid):
        raise SteeringError(f"prompts={n} is not allowed: an integer in [2, {len(grid)}]")
    return [grid[i] for i in torch.randperm(len(grid), generator=g)[:n].tolist()]


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
    lm = model.lm
    device = next(lm.parameters()).device
    encoded = [encode_prompt(tokenizer, p, chat_template) for p in prompts]
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        by_len.setdefault(len(ids), []).append(i)
    texts: list[list[str]] = [[] for _ in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for _, idx in sorted(by_len.items()):
            ids = torch.tensor([encoded[i] for i in idx for _ in range(samples)], device=device)
            with conditioned_on(lm, z, at=getattr(model.latent, "z_injection", "head")):
                seq = lm.generate(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=True,
                    temperature=temperature,
                    top_k=0,
                    top_p=1.0,
                    pad_token_id=pad,
                    eos_token_id=tokenizer.eos_token_id,
                )
            for row, i in enumerate(j for j in idx for _ in range(samples)):
                texts[i].append(tokenizer.decode(seq[row, ids.shape[1] :], skip_special_tokens=True))
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
    from lpc.policy import hidden_states

    votes: dict[int, int] = {}
    for p in prompts:
        ids = torch.tensor([encode_prompt(tokenizer, p, chat_template)], device=next(model.lm.parameters()).device)
        h = hidden_states(model.lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[:, -1]
        k = int(model.latent.prior_logits(h).argmax(-1))
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
    if latent is None or not hasattr(latent, "codebook_size"):
        raise SteeringError("type-steered generation needs an LPC run with a discrete latent (a codebook)")
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
    for k in range(latent.codebook_size):
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


def _parse(argv: list[str]) -> tuple[Path, SteeringOptions]:
    positional = [a for a in argv if not is_option(a)]
    if len(positional) != 1:
        raise SteeringError(
            f"expected exactly one RUN (a run directory, its final/, or a sweep directory), got {positional}"
        )
    kinds = {f.name: f.type for f in dataclasses.fields(SteeringOptions)}
    opts = {}
    for arg in argv:
        if arg in positional:
            continue
        key, value = arg.split("=", 1)
        if key not in kinds:
            raise SteeringError(f"unknown argument {key!r}; allowed: {', '.join(kinds)}")
        kind = float if kinds[key] == "float" else int
        try:
            opts[key] = kind(value)
        except ValueError:
            raise SteeringError(f"{key}={value!r} is not allowed: a number") from None
        if opts[key] <= 0 and key != "seed":
            raise SteeringError(f"{key}={value!r} is not allowed: a number > 0")
    return Path(positional[0]), SteeringOptions(**opts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or any(a in ("-h", "--help") for a in argv):
        print(__doc__)
        return 0 if argv else 2
    try:
        path, opts = _parse(argv)
    except (SteeringError, FileNotFoundError) as err:
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


def steer_run(path: Path, opts: dict) -> str:
    """The steering table of one run, written to its analysis/ folder; returns it as markdown."""
    from lpc.files import atomic_write_json, atomic_write_text
    from lpc.training.checkpoint import load_checkpoint

    model, tokenizer, cfg = load_checkpoint(path)
    if cfg is None or cfg.data.get("name") != "synthetic":
        raise SteeringError(f"{path} was not trained on data=synthetic: no ground-truth type rewards to score with")
    sources = list(cfg.data.get("sources") or []) or None
    chat = bool(cfg.data.get("chat_template", False))  # SmolLM2's tier trains in its chat template
    result = steering_table(model, tokenizer, cfg.data.n_types, float(cfg.data.conflict), opts, sources, chat)
    run_dir = path.parent if path.name == "final" else path
    table = markdown(result)
    atomic_write_json(run_dir / "analysis" / "steering.json", result)
    atomic_write_text(run_dir / "analysis" / "steering.md", table)
    return table


if __name__ == "__main__":
    sys.exit(main())
