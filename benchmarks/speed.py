"""Step time and peak memory: DPO vs LPC, ours vs TRL's DPOTrainer, on-the-fly vs precomputed reference.

    python benchmarks/speed.py [--steps N] [--warmup W] [--models tiny,smollm2] [--out docs/speed.md]

Every configuration runs in its own subprocess (``--one NAME``) so its peak memory is its own:
peak RSS (``ru_maxrss``, includes ~0.4 GB of imports) and the growth of RSS over the timed steps.
A step is one optimizer step on one global batch (forward + backward + AdamW), timed after
``--warmup`` steps; the table gives the median of ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

BATCH, MAX_LEN, MAX_PROMPT = 8, 64, 24
COMMON = [
    f"trainer.batch_size={BATCH}",
    f"trainer.max_length={MAX_LEN}",
    f"trainer.max_prompt_length={MAX_PROMPT}",
    "data.n_train=256",
    "data.n_eval=16",
    "trainer.eval_batch_size=16",
    "trainer.gradient_accumulation_steps=1",
]


def configs(models: list[str]) -> dict[str, dict]:
    out = {}
    for m in models:
        base = COMMON + [f"model={m}", "trainer=cpu"]
        out[f"{m}/dpo"] = {"kind": "ours", "overrides": base + ["trainer.reference_logps=on_the_fly"]}
        out[f"{m}/lpc-dpo"] = {
            "kind": "ours",
            "overrides": base + ["trainer.reference_logps=on_the_fly", "latent=discrete", "codebook=32"],
        }
        out[f"{m}/dpo-precomputed"] = {"kind": "ours", "overrides": base + ["trainer.reference_logps=precompute"]}
        out[f"{m}/trl-dpo"] = {"kind": "trl", "overrides": base + ["trainer.reference_logps=on_the_fly"]}
    return out


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def compose(overrides):
    from hydra import compose as hc
    from hydra import initialize_config_dir

    from lpc.conf import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return hc(config_name="config", overrides=overrides)


def fresh_reference_cache(tmp: Path) -> None:
    """Point LPC_CACHE_DIR at ``tmp`` so the reference log-probs are computed, not read from an earlier run's
    cache, while the converted models and tokenizers are still shared (linked) from the usual cache."""
    from lpc.backbones import default_cache_dir

    shared = default_cache_dir()
    cache = tmp / "cache"
    cache.mkdir()
    for sub in ("models", "tokenizers"):
        (shared / sub).mkdir(parents=True, exist_ok=True)
        (cache / sub).symlink_to(shared / sub)
    os.environ["LPC_CACHE_DIR"] = str(cache)


def time_ours(cfg, steps: int, warmup: int, tmp: Path) -> dict:
    from lpc.run import build_trainer

    if cfg.trainer.reference_logps == "precompute":
        fresh_reference_cache(tmp)
    t0 = time.perf_counter()
    trainer, _, _ = build_trainer(cfg, tmp)  # exactly as lpc-train builds it (precompute included)
    setup_s = time.perf_counter() - t0
    latent = trainer.model.latent
    rss0 = rss_mb()
    times = []
    for _ in range(warmup + steps):
        t0 = time.perf_counter()
        trainer.train_step()  # one optimizer step, exactly as PreferenceTrainer.train runs it
        times.append(time.perf_counter() - t0)
    return {
        "step_s": statistics.median(times[warmup:]),
        "setup_s": setup_s,
        "rss_growth_mb": rss_mb() - rss0,
        "params": sum(p.numel() for p in trainer.model.lm.parameters()),
        "latent_params": sum(p.numel() for p in latent.parameters()) if latent is not None else 0,
    }


def time_trl(cfg, steps: int, warmup: int, tmp: Path) -> dict:
    try:
        import trl
        from transformers import TrainerCallback
    except ImportError as err:
        raise SystemExit(f"TRL is not installed: pip install -e '.[bench]' ({err})") from None
    import torch
    from hydra.utils import instantiate

    from lpc.run import build_datasets

    torch.manual_seed(0)
    lm, tok = instantiate(cfg.model)
    train, _, _ = build_datasets(cfg, tok)  # the same pairs; TRL tokenizes the strings itself
    train = train.select_columns(["prompt", "chosen", "rejected"])
    times, marks = [], {}

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            marks["t"] = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            times.append(time.perf_counter() - marks["t"])
            if len(times) == warmup:
                marks["rss0"] = rss_mb()

    args = trl.DPOConfig(
        output_dir=str(tmp / "trl"),
        per_device_train_batch_size=BATCH,
        max_steps=warmup + steps,
        learning_rate=float(cfg.trainer.lr),
        beta=float(cfg.algo.beta),
        max_length=MAX_LEN,
        report_to=[],
        logging_steps=10**6,
        save_strategy="no",
        use_cpu=True,
        gradient_accumulation_steps=1,
        dataloader_num_workers=0,
        bf16=False,
        precompute_ref_log_probs=False,
        seed=0,
    )
    if hasattr(args, "max_prompt_length"):
        args.max_prompt_length = MAX_PROMPT
    import copy

    lm.config._name_or_path = "tiny-lpc"  # TRL derives ids from it; the reference is passed, never loaded
    trainer = trl.DPOTrainer(
        model=lm, ref_model=copy.deepcopy(lm), args=args, train_dataset=train, processing_class=tok
    )
    trainer.add_callback(Timer())
    trainer.train()
    return {
        "step_s": statistics.median(times[warmup:]),
        "rss_growth_mb": rss_mb() - marks.get("rss0", rss_mb()),
        "params": sum(p.numel() for p in lm.parameters()),
        "trl_version": trl.__version__,
    }


def run_one(name: str, steps: int, warmup: int) -> None:
    import tempfile

    import torch

    spec = configs([name.split("/")[0]])[name]
    cfg = compose(spec["overrides"])
    with tempfile.TemporaryDirectory() as tmp:
        fn = time_trl if spec["kind"] == "trl" else time_ours
        res = fn(cfg, steps, warmup, Path(tmp))
    res.update({"name": name, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads()})
    print("BENCH " + json.dumps(res))


def fmt_ratio(a, b, target):
    r = a / b
    return f"{r:.2f} (target <= {target}: {'met' if r <= target else 'NOT met'})"


def git_commit() -> str:
    """The checkout's commit, with ``-dirty`` when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO).returncode != 0
    return head.stdout.strip() + ("-dirty" if dirty else "")


def write_report(results: dict, out: Path, command: str, models, steps, warmup) -> None:
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (benchmarks/speed.py); numbers from one run on the machine below.",
        "",
        f"Command: `{command}`",
        "",
        f"Commit: `{git_commit()}` (the code measured)",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
        f"load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        f"Setup: batch {BATCH} pairs, max_length {MAX_LEN}, fp32, CPU, 1 process; median of {steps} steps after "
        f"{warmup} warm-up steps; each configuration in its own process. Peak RSS includes imports "
        f"(~0.4 GB); 'RSS growth' is the increase during the timed steps.",
        "",
        "| configuration | step (s) | peak RSS (MB) | RSS growth (MB) | params | latent params |",
        "|---|---|---|---|---|---|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | |")
            continue
        lines.append(
            f"| {name} | {r['step_s']:.4f} | {r['peak_rss_mb']:.0f} | {r['rss_growth_mb']:.0f} | "
            f"{r.get('params', 0):,} | {r.get('latent_params', 0):,} |"
        )
    lines += ["", "## Ratios against the targets", ""]
    for m in models:
        g = {k.split("/")[1]: v for k, v in results.items() if k.startswith(m + "/") and "error" not in v}
        if "dpo" not in g:
            continue
        d = g["dpo"]
        if "lpc-dpo" in g:
            lines.append(
                f"- {m}: LPC/DPO step time {fmt_ratio(g['lpc-dpo']['step_s'], d['step_s'], 1.05)}; "
                f"peak RSS {fmt_ratio(g['lpc-dpo']['peak_rss_mb'], d['peak_rss_mb'], 1.05)}"
            )
        if "trl-dpo" in g:
            lines.append(
                f"- {m}: ours/TRL DPO step time {fmt_ratio(d['step_s'], g['trl-dpo']['step_s'], 0.8)} "
                f"(TRL {g['trl-dpo'].get('trl_version')})"
            )
        if "dpo-precomputed" in g:
            p = g["dpo-precomputed"]
            lines.append(
                f"- {m}: precomputed/on-the-fly reference step time {fmt_ratio(p['step_s'], d['step_s'], 0.7)}; "
                f"peak RSS {p['peak_rss_mb'] / d['peak_rss_mb']:.2f}; setup {p['setup_s']:.1f} s, including the "
                f"one-off precompute for {256 + 16} pairs (cached, shared by a sweep), against {d['setup_s']:.1f} s"
            )
    lines += ["", "Timings on a shared or loaded machine are noisy; rerun on a quiet one for final numbers.", ""]
    out.parent.mkdir(parents=True, exist_ok=True)
    from lpc.files import atomic_write_text

    atomic_write_text(out, "\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    ap.add_argument("--out", default=str(REPO / "docs" / "speed.md"))
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        run_one(a.one, a.steps, a.warmup)
        return
    models = a.models.split(",")
    names = [n for n in configs(models) if not a.only or n in a.only.split(",")]
    results = {}
    for name in names:
        t0 = time.time()
        proc = subprocess.run(
            [sys.executable, __file__, "--one", name, "--steps", str(a.steps), "--warmup", str(a.warmup)],
            capture_output=True,
            text=True,
            cwd=REPO,
        )
        line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
        if proc.returncode != 0 or not line:
            results[name] = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
        else:
            results[name] = json.loads(line[-1][6:])
        print(f"{name}: {results[name]} ({time.time() - t0:.0f} s)", flush=True)
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    write_report(results, Path(a.out), command.strip(), models, a.steps, a.warmup)
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
