"""How much `make train`'s eval/pref_accuracy moves between machines: the default run over seeds and CPU kernels.

Another x86 CPU runs other vectorised kernels (AVX-512, AVX2, or none), whose float32 sums round differently;
300 steps of training carry those last-bit differences into another model. PyTorch picks the kernels from the
CPU, and ``ATEN_CPU_CAPABILITY=default|avx2|avx512`` makes it pick a lower set, so one machine can stand in for
the others. This script trains ``src/train.py`` (the default run, plus any overrides given) once per seed and
kernel setting, each in a fresh process with its own fresh ``LPC_CACHE_DIR`` (the tokenizer and the reference
log-probs computed under that setting, as a new machine would), and prints a Markdown table and the spread:

    python scripts/accuracy_spread.py                                  # seeds 0,1,2 x native,avx2,default
    python scripts/accuracy_spread.py --seeds 0 --capabilities native,avx2,default data.n_eval=512

``native`` leaves ATEN_CPU_CAPABILITY unset (this CPU's best kernels). It prints the observed range and the 99%
prediction interval of one more run (``spread``); the README quotes that interval (seed 0 is `make train`), and
``make docs-check`` checks one run on the machine it runs on against it.
``--json FILE`` keeps every run's numbers. The runs inherit OMP_NUM_THREADS (unset: torch's default threads).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OFFLINE = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    "WANDB_MODE": "disabled",
}


def capability_env(capability: str) -> dict[str, str]:
    """The environment of a run under ``capability``: ``native`` unsets ATEN_CPU_CAPABILITY."""
    env = {**OFFLINE, **os.environ}
    env.pop("ATEN_CPU_CAPABILITY", None)
    if capability != "native":
        env["ATEN_CPU_CAPABILITY"] = capability
    return env


def kernels(capability: str) -> str:
    """What torch reports for ``capability`` on this CPU (``AVX512``, ``AVX2``, ``DEFAULT``)."""
    code = "import torch; print(torch.backends.cpu.get_cpu_capability())"
    proc = subprocess.run([sys.executable, "-c", code], env=capability_env(capability), capture_output=True, text=True)
    return proc.stdout.strip() or "unknown"


def train(seed: int, capability: str, overrides: list[str], cache_dir: str) -> dict:
    """One run of ``src/train.py seed=SEED OVERRIDES`` under ``capability``: its metrics and wall time."""
    env = capability_env(capability) | {"LPC_CACHE_DIR": cache_dir}
    with tempfile.TemporaryDirectory() as run_dir:
        t0, cpu0 = time.time(), resource.getrusage(resource.RUSAGE_CHILDREN)
        proc = subprocess.run(
            [sys.executable, str(REPO / "src" / "train.py"), f"seed={seed}", *overrides, f"hydra.run.dir={run_dir}"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
        )
        wall, cpu1 = time.time() - t0, resource.getrusage(resource.RUSAGE_CHILDREN)
        if proc.returncode != 0:
            raise RuntimeError(f"seed={seed} under {capability} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        metrics = json.loads((Path(run_dir) / "metrics.json").read_text())
    return {
        "seed": seed,
        "capability": capability,
        "accuracy": metrics["eval/pref_accuracy"],
        "margin": metrics["eval/margin"],
        "process_s": round(wall, 1),
        "cpu_s": round(cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime, 1),
    }


def spread(runs: list[dict]) -> dict:
    """min, max, mean and sample sd of the runs' accuracies, and the 99% prediction interval of one more run:
    mean +- t(0.995, n - 1) sd sqrt(1 + 1/n), the runs taken as draws of one distribution (another seed or
    another CPU's rounding both send training down another path), clipped to [0, 1]. The observed min-max
    alone would miss a tenth run with probability 2/10; this interval is what the README claims."""
    from scipy import stats

    acc = [r["accuracy"] for r in runs]
    n, mean = len(acc), statistics.fmean(acc)
    sd = statistics.stdev(acc) if n > 1 else 0.0
    half = float(stats.t.ppf(0.995, n - 1)) * sd * math.sqrt(1 + 1 / n) if n > 1 else float("nan")
    return {
        "n": n,
        "min": min(acc),
        "max": max(acc),
        "mean": mean,
        "sd": sd,
        "low": max(0.0, mean - half),
        "high": min(1.0, mean + half),
    }


def report(runs: list[dict], seeds: list[int], capabilities: list[str], names: dict[str, str], command: str) -> str:
    by = {(r["seed"], r["capability"]): r for r in runs}
    lines = [
        f"Command: `{command}`",
        "",
        "| seed | " + " | ".join(f"{c} ({names[c]})" for c in capabilities) + " | range |",
        "|---|" + "---|" * (len(capabilities) + 1),
    ]
    for s in seeds:
        accs = [by[s, c]["accuracy"] for c in capabilities]
        lines.append(f"| {s} | " + " | ".join(f"{a:.4f}" for a in accs) + f" | {max(accs) - min(accs):.4f} |")
    total = spread(runs)
    lines += [
        "",
        f"eval/pref_accuracy over {len(seeds)} seed(s) x {len(capabilities)} kernel setting(s): "
        f"{total['min']:.4f}-{total['max']:.4f}, mean {total['mean']:.4f} +- {total['sd']:.4f} (sd)",
        f"99% prediction interval of one more run (another seed or machine): "
        f"eval/pref_accuracy in [{math.floor(total['low'] * 100) / 100:.2f}, {math.ceil(total['high'] * 100) / 100:.2f}]"
        f" (exact {total['low']:.4f}-{total['high']:.4f}, rounded outward)",
        f"per run: {min(r['process_s'] for r in runs):.0f}-{max(r['process_s'] for r in runs):.0f} s wall clock, "
        f"{min(r['cpu_s'] for r in runs):.0f}-{max(r['cpu_s'] for r in runs):.0f} s of CPU time",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (default 0,1,2; seed 0 is make train)")
    ap.add_argument("--capabilities", default="native,avx2,default", help="ATEN_CPU_CAPABILITY values; native: unset")
    ap.add_argument("--json", default="", help="also write every run's numbers here")
    ap.add_argument("overrides", nargs="*", help="Hydra overrides for src/train.py (default: none, make train's run)")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]
    capabilities = args.capabilities.split(",")
    names = {c: kernels(c) for c in capabilities}
    runs = []
    for c in capabilities:
        with tempfile.TemporaryDirectory() as cache_dir:  # a fresh machine: its own tokenizer and reference
            for s in seeds:
                runs.append(train(s, c, args.overrides, cache_dir))
                r = runs[-1]
                print(
                    f"seed={s} {c} ({names[c]}): eval/pref_accuracy={r['accuracy']:.4f} "
                    f"({r['process_s']:.0f} s, {r['cpu_s']:.0f} s CPU)",
                    flush=True,
                )
    command = " ".join(["python scripts/accuracy_spread.py", *(argv if argv is not None else sys.argv[1:])])
    if args.json:
        Path(args.json).write_text(json.dumps({"command": command, "kernels": names, "runs": runs}, indent=1) + "\n")
    print()
    print(report(runs, seeds, capabilities, names, command))
    return 0


if __name__ == "__main__":
    sys.exit(main())
