"""Step time, tokens per second and peak memory: DPO vs LPC, ours vs TRL's DPOTrainer, on-the-fly vs precomputed
reference, with 95% intervals that hold up on a shared machine.

    python benchmarks/speed.py [--rounds R] [--steps N] [--warmup W] [--models tiny,smollm2] [--out docs/benchmarks.md]

Every configuration runs in a fresh subprocess (``--one NAME``), so its peak memory is its own (peak RSS,
``ru_maxrss``, includes ~0.4 GB of imports). A step is one optimizer step on one global batch (forward +
backward + AdamW); a process reports the median of ``--steps`` steps after ``--warmup``. The configurations
run interleaved: ``--rounds`` rounds, each running every configuration once, in forward order on even rounds
and reversed on odd ones, so a drift of the machine's speed lands on both sides of every ratio. A ratio is
the geometric mean over rounds of A / B within a round, with the 95% t interval of the per-round log ratios
(``ratio_interval`` says why not a bootstrap). Our configurations also time each phase of a step
(backbone forward, latent heads, LM head and log-probs, reference, loss, backward, optimizer) by wrapping
those methods of the built trainer with timers: the code measured is the code that trains. Each process also
records the CPU it ran on (``cpu_model``, /proc/cpuinfo's "model name") and the kernels torch ran
(``cpu_capability``: AVX512, AVX2 or DEFAULT, which ``ATEN_CPU_CAPABILITY`` can lower), and the report names them.
On SmolLM2 a LoRA run (``adapter=lora``: the frozen base, its reference the base with the adapter off) is compared with
full fine-tuning (``smollm2/dpo``): step time and peak memory, each a ratio over the rounds with its interval.
"""

from __future__ import annotations

import argparse
import json
import math
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


def configs(models: list[str], lora: bool = False) -> dict[str, dict]:
    """The configurations per model; ``lora`` adds LoRA against full fine-tuning (``--lora``: not yet in the recorded
    docs/benchmarks.md, whose rounds predate it)."""
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
        if lora and m in LORA_MODELS:  # against {m}/dpo: the same run with a LoRA adapter on the frozen LM (issue 24)
            out[f"{m}/lora-dpo"] = {
                "kind": "ours",
                "overrides": base + ["trainer.reference_logps=on_the_fly", "adapter=lora"],
            }
    return out


LORA_MODELS = ("smollm2",)
# (label, the per-round measurement): LoRA / full fine-tuning, each with its interval over the rounds
LORA_MEASURES = [("step time", "step_s"), ("peak memory (RSS)", "peak_rss_mb")]


def cpu_model() -> str:
    """The CPU's model name: /proc/cpuinfo's first "model name" (Linux x86), else ``platform.processor()``."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and ":" in line:
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """Where a measurement ran: the CPU model and the vectorised kernels torch chose on it (its capability,
    lowered by ATEN_CPU_CAPABILITY when that is set)."""
    import torch

    return {
        "cpu_model": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "aten_cpu_capability": os.environ.get("ATEN_CPU_CAPABILITY"),
    }


def recorded_cpus(table: dict) -> str:
    """The CPU model(s) and torch kernels the rows of a summary table were measured with, as the report states
    them; rounds recorded before benchmarks/speed.py wrote them say so instead of guessing."""
    seen = sorted({(r["cpu_model"], r.get("cpu_capability") or "?") for r in table.values() if r.get("cpu_model")})
    if not seen:
        return "not recorded in these rounds (benchmarks/speed.py did not record it yet when they ran)"
    return "; ".join(f"{model}, torch kernels {capability}" for model, capability in seen)


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
    cache.mkdir(exist_ok=True)
    for sub in ("models", "tokenizers"):
        (shared / sub).mkdir(parents=True, exist_ok=True)
        if not (cache / sub).exists():
            (cache / sub).symlink_to(shared / sub)
    os.environ["LPC_CACHE_DIR"] = str(cache)


def time_ours(cfg, steps: int, warmup: int, tmp: Path) -> dict:
    from lpc.run import build_trainer

    if cfg.trainer.reference_logps == "precompute":
        # one fresh cache per benchmark (the driver's), so the first round computes the reference log-probs
        # and later rounds read them: each round times the training step, and round 1 the one-off precompute
        fresh_reference_cache(Path(os.environ.get("LPC_BENCH_CACHE") or tmp))
    t0 = time.perf_counter()
    trainer, _, _ = build_trainer(cfg, tmp)  # exactly as lpc-train builds it (precompute included)
    setup_s = time.perf_counter() - t0
    latent = trainer.model.latent
    tokens = [step_tokens(trainer, i) for i in range(warmup, warmup + steps)]
    phases = PhaseTimers(trainer)
    rss0 = rss_mb()
    times = []
    for i in range(warmup + steps):
        if i == warmup:
            phases.reset()
        t0 = time.perf_counter()
        trainer.train_step()  # one optimizer step, exactly as PreferenceTrainer.train runs it
        times.append(time.perf_counter() - t0)
    step_s = statistics.median(times[warmup:])
    return {
        "step_s": step_s,
        "tokens_per_step": statistics.mean(tokens),
        "tokens_per_s": statistics.mean(tokens) / step_s,
        "phases_s": {k: v / steps for k, v in phases.totals.items()} | {"step": statistics.mean(times[warmup:])},
        "setup_s": setup_s,
        "rss_growth_mb": rss_mb() - rss0,
        "params": sum(p.numel() for p in trainer.model.lm.parameters()),
        "trainable_params": sum(p.numel() for p in trainer.model.parameters() if p.requires_grad),
        "latent_params": sum(p.numel() for p in latent.parameters()) if latent is not None else 0,
    }


def step_tokens(trainer, step: int) -> int:
    """Tokens a step processes: the non-padding tokens of its batches (prompt + response, chosen and rejected)."""
    return sum(int(b["attention_mask"].sum()) for b in trainer._micro_batches(step))


class PhaseTimers:
    """Wall time per phase of a step, from timers around the built trainer's own methods (CPU: synchronous)."""

    def __init__(self, trainer):
        import lpc.training.trainer as trainer_module

        self.totals: dict[str, float] = {}
        model, acc = trainer.model, trainer.accelerator
        self._wrap(model, "encode", "backbone forward")
        if model.latent is not None:
            self._wrap(model.latent, "forward", "latent heads")
        self._wrap(model, "score", "LM head and log-probs")
        self._wrap(trainer, "_reference_logps", "reference (forward or cache)")
        self._wrap(trainer, "_algo_output", "loss")
        self._wrap(trainer_module, "lpc_objective", "loss")
        self._wrap(acc, "backward", "backward")
        self._wrap(acc, "clip_grad_norm_", "optimizer (clip, step, zero_grad)")
        self._wrap(trainer.optimizer, "step", "optimizer (clip, step, zero_grad)")
        self._wrap(trainer.optimizer, "zero_grad", "optimizer (clip, step, zero_grad)")

    def _wrap(self, owner, attr: str, phase: str) -> None:
        inner = getattr(owner, attr)

        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                self.totals[phase] = self.totals.get(phase, 0.0) + time.perf_counter() - t0

        setattr(owner, attr, timed)

    def reset(self) -> None:
        self.totals = {}


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


def run_one(name: str, steps: int, warmup: int, threads: int) -> None:
    import tempfile

    import torch

    torch.set_num_threads(threads)
    spec = configs([name.split("/")[0]], lora=True)[name]
    cfg = compose(spec["overrides"])
    with tempfile.TemporaryDirectory() as tmp:
        fn = time_trl if spec["kind"] == "trl" else time_ours
        res = fn(cfg, steps, warmup, Path(tmp))
    res.update({"name": name, "peak_rss_mb": peak_rss_mb(), "threads": torch.get_num_threads(), **machine()})
    print("BENCH " + json.dumps(res))


# (label, numerator, denominator, target): each ratio of step times the benchmark reports, per model
RATIOS = [
    ("LPC/DPO", "lpc-dpo", "dpo", 1.03),
    ("ours/TRL DPO", "dpo", "trl-dpo", 0.8),
    ("precomputed/on-the-fly reference", "dpo-precomputed", "dpo", 0.7),
]
PHASES = [
    "backbone forward",
    "latent heads",
    "LM head and log-probs",
    "reference (forward or cache)",
    "loss",
    "backward",
    "optimizer (clip, step, zero_grad)",
]


def ratio_interval(a: list[float], b: list[float]) -> tuple[float, float, float]:
    """The ratio of a to b over paired rounds and its 95% interval: the geometric mean of the per-round ratios
    a[i] / b[i] and the t interval of their logs (lpc.stats, the project's one aggregation path). Why not a
    percentile bootstrap over rounds: with 4 rounds it has 256 distinct resamples and no small-sample
    correction, and two consecutive runs' bootstrap intervals of ours/TRL on SmolLM2 ([0.713, 0.733] and
    [0.750, 0.797]) did not overlap; the t interval's 3.18 standard errors at 3 degrees of freedom did."""
    from lpc.stats import summarize

    logs = summarize([math.log(x / y) for x, y in zip(a, b)])
    point = math.exp(logs.mean)
    if logs.ci95 is None:
        return point, float("nan"), float("nan")
    return point, math.exp(logs.mean - logs.ci95), math.exp(logs.mean + logs.ci95)


def verdict(low: float, high: float, target: float) -> str:
    if high <= target:
        return "met"
    if low > target:
        return "NOT met"
    return "undecided (the interval straddles the target)"


def git_commit() -> str:
    """The checkout's commit, with ``-dirty`` when tracked files differ from it."""
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
    if head.returncode != 0:
        return "unknown (not a git checkout)"
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=REPO).returncode != 0
    return head.stdout.strip() + ("-dirty" if dirty else "")


def summarize(results: dict[str, list[dict]], models: list[str]) -> dict:
    """Per configuration: median over rounds of step time, tokens/s, peak RSS, phases; per model: the ratios."""
    table, ratios = {}, []
    for name, runs in results.items():
        ok = [r for r in runs if "error" not in r]
        if not ok:
            table[name] = {"error": runs[-1].get("error", "no run")}
            continue
        row = {"rounds": len(ok), **{k: statistics.median(r[k] for r in ok) for k in ("step_s", "peak_rss_mb")}}
        row.update({k: ok[0].get(k) for k in ("params", "latent_params", "trl_version", "setup_s", "trainable_params")})
        row.update({k: ok[0][k] for k in ("cpu_model", "cpu_capability") if k in ok[0]})
        if "tokens_per_s" in ok[0]:
            row["tokens_per_s"] = statistics.median(r["tokens_per_s"] for r in ok)
        if "phases_s" in ok[0]:  # means over rounds, so the phases and "other" add up to the step
            row["phases_s"] = {k: statistics.mean(r["phases_s"].get(k, 0.0) for r in ok) for k in ok[0]["phases_s"]}
        table[name] = row
    for m in models:
        for label, num, den, target in RATIOS:
            a, b = results.get(f"{m}/{num}", []), results.get(f"{m}/{den}", [])
            pairs = [(x["step_s"], y["step_s"]) for x, y in zip(a, b) if "error" not in x and "error" not in y]
            if not pairs:
                continue
            point, low, high = ratio_interval([p[0] for p in pairs], [p[1] for p in pairs])
            ratios.append(
                {"model": m, "ratio": label, "value": point, "low": low, "high": high, "rounds": len(pairs),
                 "target": target, "verdict": verdict(low, high, target)}
            )  # fmt: skip
    lora = []  # LoRA against full fine-tuning, per measurement
    for m in models:
        a, b = results.get(f"{m}/lora-dpo", []), results.get(f"{m}/dpo", [])
        paired = [(x, y) for x, y in zip(a, b) if "error" not in x and "error" not in y]
        for label, key in LORA_MEASURES if paired else []:
            point, low, high = ratio_interval([x[key] for x, _ in paired], [y[key] for _, y in paired])
            lora.append(
                {"model": m, "measure": label, "lora": statistics.median(x[key] for x, _ in paired), "full":
                 statistics.median(y[key] for _, y in paired), "value": point, "low": low, "high": high,
                 "rounds": len(paired)}
            )  # fmt: skip
    return {"table": table, "ratios": ratios, "lora": lora}


PAPER_MODELS = ("mistral7b", "llama3_8b")
PAPER_HARDWARE = ("a100_80g_x8", "h100_80g_x8")


def paper_scale_rows(mfu: float = 0.4) -> list[dict]:
    """Estimates, not measurements: lpc-plan's FLOP count of a paper-scale LPC-DPO run (the recipe's sequence
    length and global batch, bf16, ZeRO-3, the reference precomputed) turned into tokens/s and GPU-hours at
    ``mfu`` of the GPU's dense bf16 peak."""
    from lpc.experiments.plan import plan

    rows = []
    for model in PAPER_MODELS:
        for hardware in PAPER_HARDWARE:
            cfg = compose([f"model={model}", "algo=dpo", "latent=discrete", "scale=paper", f"hardware={hardware}"])
            p = plan(cfg, mfu=mfu)
            seconds = p.gpu_hours * 3600 / p.world
            rows.append(
                {"model": model, "hardware": hardware, "gpus": p.world, "seq_len": p.seq_len, "global_batch":
                 p.global_batch, "tokens": p.tokens, "flops_per_token": p.flops / p.tokens, "peak_tflops":
                 p.peak_tflops, "mfu": p.mfu, "tokens_per_s_per_gpu": p.tokens / seconds / p.world,
                 "gpu_hours": p.gpu_hours, "wall_hours": p.wall_hours}
            )  # fmt: skip
    return rows


def paper_scale_section(rows: list[dict]) -> list[str]:
    lines = [
        "",
        "## Paper scale, on paper (estimates from the FLOP count, not measurements)",
        "",
        "One LPC-DPO run of the paper's recipe (61,135 training pairs, ultrafeedback_binarized's train_prefs and "
        "lpc-plan's default; one epoch, the recipe's "
        "global batch and sequence length, bf16, ZeRO-3 on one node of 8 GPUs, the reference log-probs "
        "precomputed once per model) as `lpc-plan` counts it: 6 N FLOPs per trained token plus the one-off "
        "2 N reference pass, at the stated MFU of the GPU's dense bf16 peak (A100 312, H100 989 TFLOP/s).",
        "",
        "| model | GPUs | seq len | global batch | tokens per run | FLOPs per token | MFU | tokens/s per GPU | "
        "GPU-hours per run | wall-clock (h) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['gpus']} x {r['hardware'].split('_')[0].upper()} | {r['seq_len']} | "
            f"{r['global_batch']} | {r['tokens']:.3g} | {r['flops_per_token']:.3g} | {r['mfu']:.2f} | "
            f"{r['tokens_per_s_per_gpu']:,.0f} | {r['gpu_hours']:.1f} | {r['wall_hours']:.2f} |"
        )
    lines += [
        "",
        "Published throughput to compare with: we found no public DPO throughput for full fine-tuning of a 7-8B "
        "model on 8 A100/H100 from TRL or OpenRLHF. OpenRLHF's report (Hu et al. 2024, arXiv:2405.11143) times "
        "PPO and its generation, not DPO; TRL's documentation gives no throughput table. The table is therefore "
        "our estimate alone; on a real node, `make smoke-gpu` (docs/gpu-checklist.md) runs 20 steps whose "
        "`train/wall_time_s` in metrics.json is the measurement to compare with.",
    ]
    return lines


def readings(table: dict, models: list[str]) -> list[str]:
    """What the phase table says about each ratio, computed from it (so a rerun rewrites it with its numbers)."""
    lines = []
    for m in models:
        dpo, lpc, pre = (table.get(f"{m}/{c}", {}).get("phases_s") for c in ("dpo", "lpc-dpo", "dpo-precomputed"))
        if dpo and lpc:
            head = lpc["LM head and log-probs"] - dpo["LM head and log-probs"]
            own = lpc["latent heads"] + head
            diff = {p: (lpc.get(p, 0.0) - dpo.get(p, 0.0)) * 1e3 for p in PHASES + ["step"]}
            forwards = diff["backbone forward"] + diff["reference (forward or cache)"]
            update = diff["backward"] + diff["optimizer (clip, step, zero_grad)"]
            other = diff["step"] - sum(diff[p] for p in PHASES)
            share = table[f"{m}/lpc-dpo"].get("latent_params", 0) / max(table[f"{m}/lpc-dpo"].get("params") or 1, 1)
            verdict_text = (
                "so the difference is not the latent's computation but variation between processes, which the "
                "interval carries; no change to the latent path can remove it"
                if own / dpo["step"] < 0.01
                else f"at this size the latent ({100 * share:.0f}% more parameters) and its per-step Python work "
                "are a visible part of a short step"
            )
            lines.append(
                f"- {m}, LPC/DPO: the mean step differs by {diff['step']:+.1f} ms "
                f"({100 * (lpc['step'] / dpo['step'] - 1):+.1f}%). LPC's own forward work, the latent heads "
                f"({lpc['latent heads'] * 1e3:.1f} ms) and z added at the LM head ({head * 1e3:+.1f} ms), is "
                f"{100 * own / dpo['step']:.2f}% of DPO's step. The forwards whose work LPC does not change "
                f"(backbone, reference) differ by {forwards:+.1f} ms; the backward and AdamW, which LPC changes only "
                f"by its heads ({100 * share:.1f}% more parameters), by {update:+.1f} ms; the rest (data, per-step "
                f"metrics, Python) by {other:+.1f} ms: {verdict_text}."
            )
        if dpo and pre:
            share = dpo["reference (forward or cache)"] / dpo["step"]
            lines.append(
                f"- {m}, precomputed/on-the-fly: the reference forward is {100 * share:.0f}% of the on-the-fly "
                f"step, so reading cached log-probs instead can give at best {1 - share:.2f} (the rest of the step, "
                f"backward and AdamW above all, is unchanged); the target 0.7 needs longer sequences, where the "
                f"forward's share grows, or a sharded run, where the saving is memory."
            )
    return lines


def comparison(previous: dict | None, ratios: list[dict], models: list[str]) -> list[str]:
    """Each ratio's interval in this run beside the previous run's (rounds kept in the --json file)."""
    if not previous:
        return []
    before = {(q["model"], q["ratio"]): q for q in summarize(previous, models)["ratios"]}
    lines = [
        "",
        "## Against the previous run",
        "",
        "The previous `make bench` on this machine (its rounds were in the `--json` file this run replaced):",
        "",
        "| model | ratio | previous | this run | intervals overlap |",
        "|---|---|---|---|---|",
    ]
    for q in ratios:
        b = before.get((q["model"], q["ratio"]))
        if b is None:
            continue
        overlap = b["low"] <= q["high"] and q["low"] <= b["high"]
        lines.append(
            f"| {q['model']} | {q['ratio']} | {b['value']:.3f} [{b['low']:.3f}, {b['high']:.3f}] | "
            f"{q['value']:.3f} [{q['low']:.3f}, {q['high']:.3f}] | {'yes' if overlap else 'NO'} |"
        )
    return lines


def lora_section(rows: list[dict], table: dict) -> list[str]:
    """LoRA (adapter=lora) against full fine-tuning of the same model: medians over rounds and the ratio's interval."""
    if not rows:
        return []
    lines = [
        "",
        "## LoRA against full fine-tuning (LoRA / full, with 95% intervals)",
        "",
        "`adapter=lora` (r 16 on the seven projections, the frozen base, the reference the base with the adapter off) "
        "against `dpo` (every weight trains, the reference a frozen copy), both with the reference on the fly. Peak "
        "memory is the process's peak RSS, imports included.",
        "",
        "| model | measure | LoRA | full | LoRA / full | 95% interval | rounds |",
        "|---|---|---|---|---|---|---|",
    ]
    for q in rows:
        unit = (lambda v: f"{v:.4f} s") if q["measure"] == "step time" else (lambda v: f"{v:,.0f} MB")
        lines.append(
            f"| {q['model']} | {q['measure']} | {unit(q['lora'])} | {unit(q['full'])} | {q['value']:.3f} | "
            f"[{q['low']:.3f}, {q['high']:.3f}] | {q['rounds']} |"
        )
    for m in sorted({q["model"] for q in rows}):
        lora, full = table.get(f"{m}/lora-dpo", {}), table.get(f"{m}/dpo", {})
        if lora.get("trainable_params") and full.get("trainable_params"):
            lines.append(
                f"\n{m}: {lora['trainable_params']:,} parameters train with LoRA (the adapter; no latent here), "
                f"{full['trainable_params']:,} in full fine-tuning."
            )
    return lines


def write_report(
    summary: dict, out: Path, command: str, models, rounds, steps, warmup, threads=1, previous=None
) -> None:
    table = summary["table"]
    lines = [
        "# Benchmarks",
        "",
        "Written by `make bench` (benchmarks/speed.py): every configuration in a fresh process, the compared",
        f"configurations interleaved over {rounds} rounds; a ratio is the geometric mean of the rounds' ratios with",
        "the 95% t interval of their logs (benchmarks/speed.py `ratio_interval`: a percentile bootstrap over 4 rounds",
        "came out too narrow to reproduce).",
        "",
        f"Command: `{command}`",
        "",
        f"Commit: `{git_commit()}` (the code measured)",
        "",
        f"Machine: {platform.platform()}, {os.cpu_count()} CPUs, python {platform.python_version()}; "
        f"load average at the end {os.getloadavg()[0]:.1f}.",
        "",
        f"CPU: {recorded_cpus(table)}.",
        "",
        f"Setup: batch {BATCH} pairs, max_length {MAX_LEN}, fp32, CPU, 1 process of {threads} torch thread(s); each "
        f"process times {steps} steps "
        f"after {warmup} warm-up steps and reports their median. The table gives the median over rounds; "
        f"peak RSS includes imports (~0.4 GB). Tokens: the non-padding tokens of a step's chosen and rejected "
        f"sequences (TRL's row: ours' tokens of the same pairs over TRL's step time).",
        "",
        "| configuration | rounds | step (s) | tokens/s | peak RSS (MB) | params | latent params |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in table.items():
        if "error" in r:
            lines.append(f"| {name} | failed: {r['error'][:80]} | | | | | |")
            continue
        tps = r.get("tokens_per_s")
        if tps is None and name.endswith("/trl-dpo"):
            ours = table.get(name.replace("/trl-dpo", "/dpo"), {})
            if ours.get("tokens_per_s"):
                tps = ours["tokens_per_s"] * ours["step_s"] / r["step_s"]
        lines.append(
            f"| {name} | {r['rounds']} | {r['step_s']:.4f} | {tps:,.0f} | {r['peak_rss_mb']:.0f} | "
            f"{r.get('params') or 0:,} | {r.get('latent_params') or 0:,} |"
            if tps is not None
            else f"| {name} | {r['rounds']} | {r['step_s']:.4f} | | {r['peak_rss_mb']:.0f} | {r.get('params') or 0:,} | |"
        )
    lines += [
        "",
        "## Ratios (step time), with 95% intervals",
        "",
        "| model | ratio | value | 95% interval | rounds | target | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for q in summary["ratios"]:
        lines.append(
            f"| {q['model']} | {q['ratio']} | {q['value']:.3f} | [{q['low']:.3f}, {q['high']:.3f}] | {q['rounds']} | "
            f"<= {q['target']} | {q['verdict']} |"
        )
    lines += lora_section(summary.get("lora") or [], table)
    for m in models:
        dpo, lpc = table.get(f"{m}/dpo", {}), table.get(f"{m}/lpc-dpo", {})
        if "phases_s" not in dpo or "phases_s" not in lpc:
            continue
        lines += [
            "",
            f"## Where a step's time goes: {m} (ms per step, mean over rounds)",
            "",
            "| phase | DPO | LPC-DPO | LPC - DPO |",
            "|---|---|---|---|",
        ]
        rows = PHASES + ["step"]
        for ph in rows:
            d, lv = dpo["phases_s"].get(ph, 0.0) * 1e3, lpc["phases_s"].get(ph, 0.0) * 1e3
            lines.append(f"| {ph if ph != 'step' else '**whole step** (mean)'} | {d:.1f} | {lv:.1f} | {lv - d:+.1f} |")
        other_d = dpo["phases_s"]["step"] - sum(dpo["phases_s"].get(p, 0.0) for p in PHASES)
        other_l = lpc["phases_s"]["step"] - sum(lpc["phases_s"].get(p, 0.0) for p in PHASES)
        lines.insert(-1, f"| other (data, metrics, Python) | {other_d * 1e3:.1f} | {other_l * 1e3:.1f} | "
                         f"{(other_l - other_d) * 1e3:+.1f} |")  # fmt: skip
    for m in models:
        p = table.get(f"{m}/dpo-precomputed", {})
        if p.get("setup_s") is not None and table.get(f"{m}/dpo", {}).get("setup_s") is not None:
            lines.append(
                f"\n{m}: setup (build, round 1) {p['setup_s']:.1f} s with the one-off reference precompute for "
                f"{256 + 16} pairs (cached, shared by a sweep), against {table[f'{m}/dpo']['setup_s']:.1f} s."
            )
    lines += ["", "## Reading", ""] + readings(table, models)
    lines += comparison(previous, summary["ratios"], models)
    lines += paper_scale_section(paper_scale_rows())
    lines.append("")
    out.parent.mkdir(parents=True, exist_ok=True)
    from lpc.files import atomic_write_text

    atomic_write_text(out, "\n".join(lines))


def main() -> None:
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds (each runs every configuration)")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--only", default="", help="comma-separated configuration names (default: all)")
    ap.add_argument("--lora", action="store_true", help="add LoRA against full fine-tuning (SmolLM2: smollm2/lora-dpo)")
    ap.add_argument("--out", default=str(REPO / "docs" / "benchmarks.md"))
    ap.add_argument(
        "--json", default="", help="write the raw per-round results here; the rounds found there before the run are "
        "the previous run, compared in the report",
    )  # fmt: skip
    ap.add_argument("--from-json", default="", help="write the report from these rounds instead of running")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch threads per process (default 1: a second process on a 2-core "
        "machine then slows a run less than two oversubscribed threads would)",
    )  # fmt: skip
    ap.add_argument("--one", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.one:
        run_one(a.one, a.steps, a.warmup, a.threads)
        return
    models = a.models.split(",")
    previous = json.loads(Path(a.json).read_text()) if a.json and Path(a.json).exists() else None
    if a.from_json:
        results = json.loads(Path(a.from_json).read_text())
        write_report(summarize(results, models), Path(a.out), f"python benchmarks/speed.py {' '.join(sys.argv[1:])}",
                     models, a.rounds, a.steps, a.warmup, a.threads, previous)  # fmt: skip
        print(f"wrote {a.out}")
        return
    names = [n for n in configs(models, lora=a.lora) if not a.only or n in a.only.split(",")]
    results: dict[str, list[dict]] = {n: [] for n in names}
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "LPC_BENCH_CACHE": cache}
        for r in range(a.rounds):
            for name in names if r % 2 == 0 else names[::-1]:  # A B C D, then D C B A: drift hits both sides
                t0 = time.time()
                cmd = [sys.executable, __file__, "--one", name, "--steps", str(a.steps), "--warmup", str(a.warmup),
                       "--threads", str(a.threads)]  # fmt: skip
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
                if proc.returncode != 0 or not line:
                    res = {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1]}
                else:
                    res = json.loads(line[-1][6:])
                results[name].append(res)
                print(f"round {r + 1}/{a.rounds} {name}: step {res.get('step_s', float('nan')):.4f} s "
                      f"({time.time() - t0:.0f} s)", flush=True)  # fmt: skip
    if a.json:
        from lpc.files import atomic_write_text

        atomic_write_text(Path(a.json), json.dumps(results, indent=1) + "\n")
    summary = summarize(results, models)
    command = "python benchmarks/speed.py " + " ".join(sys.argv[1:])
    write_report(summary, Path(a.out), command.strip(), models, a.rounds, a.steps, a.warmup, a.threads, previous)
    for q in summary["ratios"]:
        print(f"{q['model']} {q['ratio']}: {q['value']:.3f} [{q['low']:.3f}, {q['high']:.3f}] {q['verdict']}")
    print(f"CPU: {recorded_cpus(summary['table'])}")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
