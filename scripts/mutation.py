"""`make mutation`: mutmut on the core of the method, then the score that docs/testing.md reports.

Runs ``mutmut run`` (configured in pyproject.toml's [tool.mutmut]: the mutated files and the fast tests) on the
functions in SCOPE below, then reads ``mutmut results --all true`` and prints

    killed / (mutants - equivalent)

where the equivalent mutants are the ones docs/testing.md's table marks "equivalent". It fails (exit 1) below
--min-score (default 90%) or when a mutant in scope was not checked. ``--report-only`` reads the results of
the last run without running mutmut again; ``--survivors`` lists the mutants in scope that no test kills and
that docs/testing.md does not call equivalent.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
MUTMUT = Path(sys.executable).with_name("mutmut")
TESTING_MD = REPO / "docs" / "testing.md"

# The functions mutated, as mutmut names them (module.x_function or module.xǁClassǁmethod). Whole modules
# for the method's core; for the trainer, only its loss and evaluation paths (not the loop, checkpoints or
# logging); for the data, the row checks and the label flips. docs/testing.md says why each part is in or out.
_T = "lpc.training.trainer.xǁPreferenceTrainerǁ"
_D = "lpc.latent.xǁDiscreteLatentǁ"
_C = "lpc.latent.xǁContinuousLatentǁ"
SCOPE = [
    "lpc.losses.*",
    # the latent module: everything except the constructors' argument checks (config errors, tested end to
    # end through lpc-train in subprocesses, which mutmut cannot link to a function)
    *[f"lpc.latent.x_{f}__mutmut_*" for f in ("mixing_weight", "annealed_temperature", "kl_warmup_weight")],
    *[f"lpc.latent.x_{f}__mutmut_*" for f in ("categorical_kl", "gaussian_kl", "pool_states", "combine_states")],
    *[f"lpc.latent.xǁLatentǁ{f}__mutmut_*" for f in ("combine", "g", "kl_weight_at", "gated")],
    *[f"lpc.latent.xǁLatentǁ{f}__mutmut_*" for f in ("prior_features", "posterior_features", "pooled")],
    "lpc.latent.xǁCenteredInputǁforward__mutmut_*",
    *[f"{_D}{f}__mutmut_*" for f in ("calibrate", "code_vector", "tau", "_draw", "prior_z", "prior_logits")],
    *[f"{_D}{f}__mutmut_*" for f in ("codes", "_prior_z_of", "prior_probs", "forward")],
    *[f"{_C}{f}__mutmut_*" for f in ("calibrate", "_params", "_sample", "scale", "prior_z", "forward")],
    "lpc.latent.xǁLatentOutputǁanalysis__mutmut_*",
    # modeling: how z enters the scored log-probs
    *[f"lpc.policy.x_{f}__mutmut_*" for f in ("hidden_states", "encode", "response_logps", "prompt_mask")],
    "lpc.policy.x_expected_hidden_norm__mutmut_*",
    *[f"lpc.policy.xǁPreferenceModelǁ{f}__mutmut_*" for f in ("latent_inputs", "encode", "score", "forward")],
    # the trainer's loss and evaluation paths
    *[f"{_T}{f}__mutmut_*" for f in ("_reference_logps", "_algo_output", "compute_loss", "evaluate")],
    # the analysis: every metric and the end-of-training hook (not the two plots)
    *[
        f"lpc.evaluation.analysis.x_{f}__mutmut_*"
        for f in (
            "preference_accuracy",
            "accuracy_by_group",
            "entropy",
            "nmi",
            "purity",
            "chance_baseline",
            "latent_diagnostics",
            "code_usage",
            "mean_prior_entropy",
            "_numpy",
            "latent_report",
            "final_analysis",
        )
    ],
    # the LM-integrity probe's verdict (lm/damaged and the figures it reads) and its helpers; not the NLL and greedy
    # decoding loops, which test_integrity checks against a hand-written forward but which cost a tiny LM per mutant
    *[
        f"lpc.evaluation.integrity.x_{f}__mutmut_*"
        for f in ("repeat_rate", "codes_to_probe", "eval_text_nll", "prompt_codes_nll", "prompt_codes_flag")
    ],
    "lpc.evaluation.integrity.xǁLMProbeǁmeasure__mutmut_*",
    # the data checks and the label flips
    *[f"lpc.data.x_{f}__mutmut_*" for f in ("bad_row_reason", "check_rows", "_drop_bad", "flip_labels")],
]

KILLED = {"killed", "timeout", "segfault", "caught by type check"}
LINE = re.compile(r"^\s*(\S+__mutmut_\d+): (.+?)\s*$")
EQUIVALENT_ROW = re.compile(r"^\|\s*`?(lpc\.\S+__mutmut_\d+)`?\s*\|\s*equivalent", re.IGNORECASE)


def in_scope(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in SCOPE)


def results() -> dict[str, str]:
    out = subprocess.run([str(MUTMUT), "results", "--all", "true"], cwd=REPO, capture_output=True, text=True)
    if out.returncode != 0:
        sys.exit(f"mutmut results failed:\n{out.stderr[-2000:]}")
    status = {}
    for line in out.stdout.splitlines():
        m = LINE.match(line)
        if m and in_scope(m.group(1)):
            status[m.group(1)] = m.group(2)
    return status


def equivalent_mutants(path: Path = TESTING_MD) -> set[str]:
    """The mutants docs/testing.md's table marks equivalent (rows ``| lpc....__mutmut_N | equivalent: why |``)."""
    if not path.exists():
        return set()
    return {m.group(1) for line in path.read_text().splitlines() if (m := EQUIVALENT_ROW.match(line))}


def score(status: dict[str, str], equivalent: set[str]) -> dict:
    counts = Counter(status.values())
    killed = sum(1 for s in status.values() if s in KILLED)
    equiv = {n for n in equivalent if n in status and status[n] not in KILLED}
    total = len(status) - len(equiv)
    survivors = sorted(n for n, s in status.items() if s not in KILLED and n not in equiv)
    return {
        "killed": killed,
        "total": total,
        "equivalent": len(equiv),
        "mutants": len(status),
        "score": killed / total if total else float("nan"),
        "counts": dict(counts),
        "survivors": survivors,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--max-children", type=int, default=2, help="mutmut's parallel workers (default 2)")
    ap.add_argument("--min-score", type=float, default=0.90)
    ap.add_argument("--report-only", action="store_true", help="score the last run, do not run mutmut")
    ap.add_argument("--survivors", action="store_true", help="list the surviving non-equivalent mutants")
    args = ap.parse_args(argv)
    start = time.monotonic()
    if not args.report_only:
        proc = subprocess.run([str(MUTMUT), "run", "--max-children", str(args.max_children), *SCOPE], cwd=REPO)
        if proc.returncode != 0:
            print(f"mutmut run failed ({proc.returncode})", file=sys.stderr)
            return proc.returncode
    status = results()
    s = score(status, equivalent_mutants())
    if args.survivors:
        for name in s["survivors"]:
            print(f"{name}: {status[name]}")
    print(
        f"mutation score: {s['killed']} killed / {s['total']} mutants = {100 * s['score']:.1f}% "
        f"({s['mutants']} mutated in scope, {s['equivalent']} equivalent excluded; {s['counts']})"
    )
    if not args.report_only:
        print(f"make mutation took {time.monotonic() - start:.0f} s")
    unchecked = [n for n, st in status.items() if st == "not checked"]
    if unchecked:
        print(f"{len(unchecked)} mutants in scope were not checked, e.g. {unchecked[0]}", file=sys.stderr)
        return 1
    if not s["score"] >= args.min_score:
        print(f"below the required {100 * args.min_score:.0f}%", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
