r"""The pretrained tier's steering table: each code's type reward next to its fluency (docs/synthetic-benchmark.md).

    python scripts/steering_pretrained.py RUN_OR_SWEEP... --out DIR
        [--prompts 32] [--samples 4] [--max-new-tokens 16] [--seed 0] [--jobs 2]

    e.g. OMP_NUM_THREADS=1 python scripts/steering_pretrained.py outputs/sweeps/synthetic_pretrained-cpu \
             --prompts 16 --jobs 2 --out docs/assets/lpc-mechanisms/pretrained

RUN_OR_SWEEP: run directories, or sweep directories (each completed run) of ``experiment=synthetic_pretrained``
(``lpc-sweep experiment=synthetic_pretrained``, ``make benchmark-pretrained``). For every LPC-DPO run and every
code k of its codebook, plus z = 0:

* the type reward, measured as ``lpc-steer`` measures it (:mod:`lpc.evaluation.steering`, the same prompts, sampling
  and scoring): ``samples`` sampled responses of ``max_new_tokens`` to each of ``prompts`` untagged prompts in the
  run's chat template, with z fixed to the code, each scored by every type's ground-truth reward;
* the fluency: the per-token NLL of the LM-integrity probe's plain text (:class:`lpc.evaluation.integrity.LMProbe`)
  under that code, over the same LM with z = 0 and over the reference (the base model), and the repeated-3-gram rate
  of the sampled responses (``integrity.repeat_rate``, over their tokens).

One shortcut, exact: codes start at 0 (``latent.codebook_init=zeros``) and the codes the posterior never picked keep
one shared vector (0, or with ``latent.center=usage`` minus the used codes' usage-weighted mean), so identical vectors
are generated once. A zero vector adds nothing to the LM head's input and its generations are z = 0's, token for
token: the first all-zero code is generated anyway to check that equality (the JSON records it). Also per run, as ``lpc-steer`` reports them: the best code per type (chosen on the first half of
the prompts, its rewards on the second half) and the prior's code for prompts tagged with each type's source.
A run without a latent (DPO) and the base model give the z = 0 row of a policy without a latent.

Writes ``steering.json`` (every row) and ``steering.md`` into ``--out``; each run's own result is kept in
``RUN/analysis/steering_pretrained.json`` (a rerun with the same sizes reuses it). ``--jobs``: runs measured at
once, each in its own process (set OMP_NUM_THREADS=1 on a shared CPU).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CACHE = "steering_pretrained.json"


def _sizes(args) -> dict:
    return {"prompts": args.prompts, "samples": args.samples, "max_new_tokens": args.max_new_tokens, "seed": args.seed}


def _rewards(texts: list[list[str]], n_types: int, conflict: float, half: int) -> dict:
    """Per prompt-half and type: the responses' rewards; the mean ± 95% interval over all responses."""
    from lpc.data.synthetic import type_rewards
    from lpc.evaluation.steering import _mean_ci

    halves = []
    for part in (texts[:half], texts[half:]):
        per_type = [[] for _ in range(n_types)]
        for responses in part:
            for text in responses:
                for m, r in enumerate(type_rewards(text, n_types, conflict)):
                    per_type[m].append(r)
        halves.append(per_type)
    return {
        "all": [_mean_ci(halves[0][m] + halves[1][m]) for m in range(n_types)],
        "select": [sum(v) / len(v) for v in halves[0]],
        "report": [_mean_ci(v) for v in halves[1]],
    }


def _repeat(tokenizer, texts: list[list[str]]) -> float:
    from lpc.evaluation.integrity import repeat_rate

    rates = [repeat_rate(tokenizer(t, add_special_tokens=False)["input_ids"]) for rs in texts for t in rs]
    return sum(rates) / len(rates)


def measure_run(run: Path, sizes: dict) -> dict:
    """Every row of one run (LPC: each code and z = 0; DPO: z = 0)."""
    import torch

    from lpc.evaluation.integrity import LMProbe
    from lpc.evaluation.steering import SteeringError, generate_with_z, prior_code, steering_prompts
    from lpc.training.checkpoint import load_checkpoint

    model, tokenizer, cfg = load_checkpoint(run)
    model.eval()
    if cfg is None or cfg.data.get("name") != "synthetic":
        raise SteeringError(f"{run} was not trained on data=synthetic: no ground-truth type rewards to score with")
    chat = bool(cfg.data.get("chat_template", False))
    n_types, conflict = int(cfg.data.n_types), float(cfg.data.conflict)
    prompts = steering_prompts(sizes["prompts"], sizes["seed"])
    half = len(prompts) // 2
    latent = model.latent

    def generate(z):
        start = time.time()
        texts = generate_with_z(
            model, tokenizer, prompts, z, sizes["samples"], sizes["max_new_tokens"], 1.0, sizes["seed"], chat
        )
        return texts, time.time() - start

    out = {"run": _label(run), "seed": int(cfg.get("seed", 0)), "chat_template": chat, "rows": {}, "seconds": {}}
    out.update(n_types=n_types, conflict=conflict)
    texts0, out["seconds"]["z = 0"] = generate(None)
    row0 = {
        **_rewards(texts0, n_types, conflict, half),
        "repeat_rate": _repeat(tokenizer, texts0),
        "example": texts0[0][0],
    }
    out["rows"]["z = 0"] = row0
    probe = LMProbe(tokenizer, chat)
    if latent is None or latent.num_codes == 0:
        out["method"] = "DPO"
        out["rows"]["z = 0"]["text_nll"] = probe.nll(model.lm, {"zero": None})["zero"]
        return out
    out["method"] = "LPC-DPO"
    codes = {k: latent.code_vector(k).detach() for k in range(latent.num_codes)}
    nll = probe.nll(model.lm, {"zero": None, **{f"code {k}": v for k, v in codes.items()}}, latent)
    row0["text_nll"] = nll["zero"]
    out["text_nll_prior"] = nll["prior"]
    # Identical vectors give identical generations: generate each distinct vector once.
    distinct: list[tuple[torch.Tensor, list[int]]] = []
    for k, v in codes.items():
        for u, ks in distinct:
            if torch.equal(u, v):
                ks.append(k)
                break
        else:
            distinct.append((v, [k]))
    for v, ks in distinct:
        if not v.any():
            texts, secs = generate(v)  # the zero code, generated once to check it writes what z = 0 writes
            out["zero_codes"] = ks
            out["zero_code_equals_z0"] = texts == texts0
            continue
        texts, secs = generate(v)
        row = {**_rewards(texts, n_types, conflict, half), "repeat_rate": _repeat(tokenizer, texts)}
        row.update(text_nll=nll[f"code {ks[0]}"], norm=float(v.norm()), codes=ks, example=texts[0][0])
        out["rows"][f"code {ks[0]}"] = row
        out["seconds"][f"code {ks[0]}"] = secs
    sources = list(cfg.data.get("sources") or []) or [f"source_{m}" for m in range(n_types)]
    out["prior_code"] = {src: prior_code(model, tokenizer, [f"[{src}] {p}" for p in prompts], chat) for src in sources}
    out["hidden_norm"] = _hidden_norm(model, tokenizer, prompts, chat)
    return out


def _label(run: Path) -> str:
    """The run as the committed table names it: relative to the working directory, else its last two parts (no
    absolute path of the machine that measured it)."""
    try:
        return str(run.resolve().relative_to(Path.cwd().resolve()))
    except ValueError:
        return str(Path(*run.resolve().parts[-2:]))


def _hidden_norm(model, tokenizer, prompts, chat) -> float:
    """Mean norm of the LM head's input at the prompts' last token: the scale a code is added to."""
    import torch

    from lpc.data import encode_prompt
    from lpc.policy import hidden_states

    norms = []
    with torch.no_grad():
        for p in prompts:
            ids = torch.tensor([encode_prompt(tokenizer, p, chat)])
            norms.append(
                float(hidden_states(model.lm, {"input_ids": ids, "attention_mask": torch.ones_like(ids)})[0, -1].norm())
            )
    return sum(norms) / len(norms)


def _one(run: Path, sizes: dict) -> dict:
    """``run``'s rows, from its cache when measured at the same sizes."""
    from lpc.files import atomic_write_json

    run_dir = run.parent if run.name == "final" else run
    cache = run_dir / "analysis" / CACHE
    if cache.exists():
        kept = json.loads(cache.read_text())
        if kept.get("sizes") == sizes:
            return kept
    result = {**measure_run(run, sizes), "sizes": sizes}
    atomic_write_json(cache, result)
    return result


def _order(key: str) -> int:
    """z = 0 first, then the codes by index (the cached JSON has its keys sorted as text)."""
    return -1 if key == "z = 0" else int(key.split()[1])


def _fmt(mu_ci) -> str:
    return f"{mu_ci[0]:+.3f} ± {mu_ci[1]:.3f}"


def markdown(results: list[dict], base: dict | None, sizes: dict) -> str:
    lines = [
        f"Each row: {sizes['prompts']} untagged prompts x {sizes['samples']} sampled responses (temperature 1) of at "
        f"most {sizes['max_new_tokens']} new tokens, in the chat template, z fixed to the row's code; type reward: the "
        "mean ground-truth reward of the responses ± 95% interval (type 1's reward is minus type 0's); text NLL: "
        "per-token NLL of the LM-integrity probe's plain answers under that z, over z = 0 and over the base model; "
        "repeat: the responses' repeated-3-gram rate; ‖code‖ over the mean norm of the LM head's input.",
        "",
        "| run | z | codes | ‖code‖ / ‖h‖ | type 0 reward | type 1 reward | text NLL / z = 0 | text NLL / base | repeat |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ref = base["rows"]["z = 0"]["text_nll"] if base else None
    if base:
        r = base["rows"]["z = 0"]
        lines.append(
            f"| base SmolLM2 | no z | - | - | {_fmt(r['all'][0])} | {_fmt(r['all'][1])} | - | 1.000 | "
            f"{r['repeat_rate']:.3f} |"
        )
    for res in results:
        name = f"{res['method']} seed {res['seed']}"
        zero = res["rows"]["z = 0"]
        for key in sorted(res["rows"], key=_order):
            r = res["rows"][key]
            if key == "z = 0":
                label, codes, norm = "z = 0", "-", "0"
                if res["method"] != "DPO":
                    n = len(res.get("zero_codes", []))
                    codes = f"{n} never trained (= z = 0)" if n else "-"
            else:
                picked = [s for s, k in res["prior_code"].items() if k in r["codes"]]
                label = key + (f" (the prior's, for {', '.join(f'[{s}]' for s in picked)})" if picked else "")
                codes = ", ".join(map(str, r["codes"]))
                norm = f"{r['norm'] / res['hidden_norm']:.4f}"
            base_ratio = f"{r['text_nll'] / ref:.3f}" if ref else "-"
            lines.append(
                f"| {name} | {label} | {codes} | {norm} | {_fmt(r['all'][0])} | {_fmt(r['all'][1])} | "
                f"{r['text_nll'] / zero['text_nll']:.3f} | {base_ratio} | {r['repeat_rate']:.3f} |"
            )
    lines += ["", "Summary per run:", "", summary(results, base)]
    return "\n".join(lines) + "\n"


def _above(a, b) -> bool:
    """a's mean above b's beyond both 95% intervals."""
    return a[0] - a[1] > b[0] + b[1]


def summary(results: list[dict], base: dict | None) -> str:
    """One line per run: the prior's code, the spread of the trained codes' type reward and fluency, how many codes
    move type 0's reward off z = 0's beyond both intervals, and lpc-steer's best code per type (chosen on the first
    half of the prompts, its reward on the second)."""
    lines = [
        "| run | type 0 reward at z = 0 | the prior's code: type 0 reward, text NLL / z = 0 | trained codes | "
        "their type 0 reward (min to max) | codes above / below z = 0 in type 0 reward | their text NLL / z = 0 "
        "(min to max; over 1.05) | their repeat rate (max) | best code for type 0 / type 1 (other half) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    if base:
        lines.append(f"| base SmolLM2 | {_fmt(base['rows']['z = 0']['all'][0])} | - | - | - | - | - | - | - |")
    for res in results:
        zero = res["rows"]["z = 0"]
        name = f"{res['method']} seed {res['seed']}"
        if res["method"] == "DPO":
            lines.append(f"| {name} | {_fmt(zero['all'][0])} | - | - | - | - | - | - | - |")
            continue
        trained = {k: r for k, r in res["rows"].items() if k != "z = 0"}
        prior = sorted({k for k in res["prior_code"].values()})
        prior_cells = []
        for k in prior:
            r = next((r for r in trained.values() if k in r["codes"]), zero)
            prior_cells.append(f"code {k}: {_fmt(r['all'][0])}, {r['text_nll'] / zero['text_nll']:.3f}")
        t0 = [r["all"][0][0] for r in trained.values()]
        up = sum(_above(r["all"][0], zero["all"][0]) for r in trained.values())
        down = sum(_above(zero["all"][0], r["all"][0]) for r in trained.values())
        ratios = [r["text_nll"] / zero["text_nll"] for r in trained.values()]
        over = sum(x > 1.05 for x in ratios)
        best = []
        for m in range(len(zero["all"])):
            k = max(res["rows"], key=lambda n: res["rows"][n]["select"][m])
            best.append(f"{k}: {_fmt(res['rows'][k]['report'][m])}")
        lines.append(
            f"| {name} | {_fmt(zero['all'][0])} | {'; '.join(prior_cells)} | {len(trained)} | "
            f"{min(t0):+.3f} to {max(t0):+.3f} | {up} / {down} | {min(ratios):.3f} to {max(ratios):.3f}; {over} | "
            f"{max(r['repeat_rate'] for r in trained.values()):.3f} | {' / '.join(best)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="*", type=Path, help="run or sweep directories (LPC-DPO and DPO runs)")
    parser.add_argument("--out", type=Path, required=True, help="directory for steering.json and steering.md")
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=1, help="runs measured at once, one process each")
    parser.add_argument("--one", type=Path, help=argparse.SUPPRESS)  # a worker: measure this run (cached) and exit
    args = parser.parse_args(argv)
    sizes = _sizes(args)
    if args.one:
        _one(args.one, sizes)
        return 0
    from lpc.evaluation import runs_of

    runs = [r for p in args.runs for r in runs_of(p)]
    if not runs:
        print(
            "error: no RUN_OR_SWEEP given: pass run or sweep directories of experiment=synthetic_pretrained",
            file=sys.stderr,
        )
        return 2
    if missing := [str(r) for r in runs if not (r / "final").is_dir() and not (r / "config.json").exists()]:
        print(f"error: no final checkpoint in {', '.join(missing)}", file=sys.stderr)
        return 2
    worker = [sys.executable, __file__, "--out", str(args.out)]
    worker += [f"--prompts={args.prompts}", f"--samples={args.samples}", f"--max-new-tokens={args.max_new_tokens}"]
    worker += [f"--seed={args.seed}"]
    pending, running = list(runs), []
    while pending or running:
        while pending and len(running) < max(args.jobs, 1):
            run = pending.pop(0)
            running.append((run, subprocess.Popen(worker + ["--one", str(run)])))
        time.sleep(2)
        for run, proc in list(running):
            if proc.poll() is not None:
                running.remove((run, proc))
                if proc.returncode != 0:
                    print(f"error: measuring {run} failed (exit {proc.returncode})", file=sys.stderr)
                    return 1
    results = [_one(r, sizes) for r in runs]  # all cached now
    first = results[0]  # every run of the tier has the same data: its types, conflict and chat template
    base = base_row(sizes, first["n_types"], first["conflict"], first["chat_template"])
    lpc = sorted((r for r in results if r["method"] != "DPO"), key=lambda r: r["seed"])
    dpo = sorted((r for r in results if r["method"] == "DPO"), key=lambda r: r["seed"])
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "steering.json").write_text(
        json.dumps({"sizes": sizes, "base": base, "runs": dpo + lpc}, indent=1) + "\n"
    )
    table = markdown(dpo + lpc, base, sizes)
    (args.out / "steering.md").write_text(table)
    print(table)
    return 0


def base_row(sizes: dict, n_types: int, conflict: float, chat: bool) -> dict:
    """The base SmolLM2 (every run's reference), z = 0: its rewards and its NLL of the probe's text."""
    from lpc.backbones import smollm2
    from lpc.evaluation.integrity import LMProbe
    from lpc.evaluation.steering import generate_with_z, steering_prompts

    lm, tokenizer = smollm2()
    lm.eval()
    model = type("Base", (), {"lm": lm, "latent": None})()
    prompts = steering_prompts(sizes["prompts"], sizes["seed"])
    texts = generate_with_z(
        model, tokenizer, prompts, None, sizes["samples"], sizes["max_new_tokens"], 1.0, sizes["seed"], chat
    )
    row = {**_rewards(texts, n_types, conflict, len(prompts) // 2), "repeat_rate": _repeat(tokenizer, texts)}
    row.update(example=texts[0][0], text_nll=LMProbe(tokenizer, chat).nll(lm, {"zero": None})["zero"])
    return {"rows": {"z = 0": row}}


if __name__ == "__main__":
    sys.exit(main())
