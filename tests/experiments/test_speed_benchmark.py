"""benchmarks/speed.py: one configuration measured in its own process, as ``make bench`` runs it."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_one(name: str) -> dict:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "speed.py"), "--one", name, "--steps", "2", "--warmup", "1"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (line,) = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH ")]
    return json.loads(line[len("BENCH ") :])


def test_lpc_configuration_times_the_trainer_lpc_train_builds():
    r = run_one("tiny/lpc-dpo")
    assert r["name"] == "tiny/lpc-dpo"
    # the tiny Llama of conf/model/tiny.yaml, and a discrete latent of 32 codes at its hidden size 128:
    # codebook 32 x 128, prior MLP 128->128->32, posterior MLP 384->128->32 (it reads [h_w; h_l; h_w - h_l]; weights
    # + biases); the head inputs' running means (buffers) are not parameters
    assert r["params"] == 654_208
    assert r["latent_params"] == 32 * 128 + (128 * 128 + 128 + 128 * 32 + 32) + (384 * 128 + 128 + 128 * 32 + 32)
    assert 0 < r["step_s"] < 30 and r["setup_s"] > 0 and r["peak_rss_mb"] > 100
    # tokens: 8 pairs of at most 64 tokens, chosen and rejected (the synthetic rows are 20-40 tokens each)
    assert 8 * 2 * 10 < r["tokens_per_step"] <= 8 * 2 * 64 and r["tokens_per_s"] > 0
    phases = r["phases_s"]
    assert set(phases) == {
        "backbone forward", "latent heads", "LM head and log-probs", "reference (forward or cache)", "loss",
        "backward", "optimizer (clip, step, zero_grad)", "step",
    }  # fmt: skip
    assert all(v > 0 for v in phases.values())
    assert sum(v for k, v in phases.items() if k != "step") <= phases["step"]  # disjoint parts of one step
    # where it ran: this CPU and the kernels torch picks in this environment (ATEN_CPU_CAPABILITY lowers them)
    import torch

    assert r["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert r["aten_cpu_capability"] == os.environ.get("ATEN_CPU_CAPABILITY")
    assert r["cpu_model"].strip()
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    names = {ln.split(":", 1)[1].strip() for ln in cpuinfo if ln.startswith("model name")}
    assert not names or r["cpu_model"] in names


def bench_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("speed", REPO / "benchmarks" / "speed.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ratio_interval_pairs_the_rounds():
    speed = bench_module()
    assert speed.ratio_interval([2.0] * 4, [1.0] * 4) == pytest.approx((2.0, 2.0, 2.0))
    # a drift that hits both sides of every round (interleaving) leaves the paired ratio exact
    assert speed.ratio_interval([1.0, 2.0, 3.0], [0.5, 1.0, 1.5]) == pytest.approx((2.0, 2.0, 2.0))
    # by hand: logs of 1.1 and 0.9 have mean -0.00527, sd 0.14190; t(0.975, 1 df) = 12.706
    point, low, high = speed.ratio_interval([1.1, 0.9], [1.0, 1.0])
    assert point == pytest.approx(math.sqrt(0.99)) and math.log(high / point) == pytest.approx(
        12.7062 * 0.14190 / math.sqrt(2), rel=1e-3
    )
    assert [speed.verdict(0.98, 1.02, 1.03), speed.verdict(1.04, 1.1, 1.03), speed.verdict(1.0, 1.05, 1.03)] == [
        "met", "NOT met", "undecided (the interval straddles the target)"
    ]  # fmt: skip


def test_summary_and_report_from_rounds(tmp_path):
    speed = bench_module()
    row = {"peak_rss_mb": 500.0, "params": 10, "latent_params": 0, "setup_s": 1.0, "tokens_per_s": 100.0}
    row |= {"cpu_model": "Some CPU 9000", "cpu_capability": "AVX2"}
    phases = {p: 0.001 for p in speed.PHASES} | {"step": 0.01}
    results = {
        "tiny/dpo": [row | {"step_s": s, "phases_s": phases} for s in (1.0, 2.0, 1.0)],
        "tiny/lpc-dpo": [row | {"step_s": s, "phases_s": phases, "latent_params": 5} for s in (1.1, 2.0, 1.2)],
        "tiny/trl-dpo": [{"step_s": s, "peak_rss_mb": 600.0, "params": 10} for s in (2.0, 4.0, 2.0)],
        "tiny/dpo-precomputed": [{"error": "boom"}] * 3,
    }
    summary = speed.summarize(results, ["tiny"])
    ratios = {q["ratio"]: q for q in summary["ratios"]}
    assert set(ratios) == {"LPC/DPO", "ours/TRL DPO"}  # no ratio from a failed configuration
    assert ratios["LPC/DPO"]["value"] == pytest.approx(1.32 ** (1 / 3)) and ratios["LPC/DPO"]["rounds"] == 3
    assert ratios["ours/TRL DPO"]["value"] == pytest.approx(0.5) and ratios["ours/TRL DPO"]["low"] == pytest.approx(0.5)
    assert summary["table"]["tiny/dpo"]["step_s"] == 1.0  # the median over rounds
    speed.paper_scale_rows = lambda: []  # the planner's section is tested in test_plan
    out = tmp_path / "benchmarks.md"
    speed.write_report(summary, out, "python benchmarks/speed.py --rounds 3", ["tiny"], 3, 8, 2)
    md = out.read_text()
    assert "| tiny | LPC/DPO | 1.097 | [" in md and "| tiny/dpo-precomputed | failed: boom" in md
    assert "| tiny/trl-dpo | 3 | 2.0000 | 50 | 600 | 10 | 0 |" in md  # TRL's tokens/s: ours' tokens, TRL's time
    assert "## Where a step's time goes: tiny" in md and "| latent heads | 1.0 | 1.0 | +0.0 |" in md
    assert "\nCPU: Some CPU 9000, torch kernels AVX2.\n" in md  # from the rounds, not from the machine writing it
    # rounds recorded before the CPU was: the report says so rather than naming this machine's
    old = {name: [{k: v for k, v in r.items() if not k.startswith("cpu_")} for r in rs] for name, rs in results.items()}
    speed.write_report(speed.summarize(old, ["tiny"]), out, "python benchmarks/speed.py", ["tiny"], 3, 8, 2)
    assert "\nCPU: not recorded in these rounds" in out.read_text()


def test_readings_and_the_previous_run_come_from_the_numbers():
    speed = bench_module()
    dpo = {p: 0.010 for p in speed.PHASES} | {"latent heads": 0.0, "step": 0.100}
    lpc = dpo | {"latent heads": 0.002, "LM head and log-probs": 0.011, "backbone forward": 0.0105}
    pre = dpo | {"reference (forward or cache)": 0.001, "step": 0.091}
    lpc_row = {"phases_s": lpc, "params": 1000, "latent_params": 10}
    table = {"m/dpo": {"phases_s": dpo}, "m/lpc-dpo": lpc_row, "m/dpo-precomputed": {"phases_s": pre}}
    lpc_line, pre_line = speed.readings(table, ["m"])
    # own work: 2 ms of heads + 1 ms more at the LM head = 3% of 100 ms; the unchanged forwards differ by 0.5 ms
    assert "is 3.00% of DPO's step" in lpc_line and "(backbone, reference) differ by +0.5 ms" in lpc_line
    assert "the mean step differs by +0.0 ms (+0.0%)" in lpc_line and "(1.0% more parameters)" in lpc_line
    assert "the rest (data, per-step metrics, Python) by -3.5 ms" in lpc_line  # 0 - (2 + 1 + 0.5)
    assert "a visible part of a short step" in lpc_line  # 3% of the step is the latent's own work
    assert "the reference forward is 10% of the on-the-fly step" in pre_line and "at best 0.90" in pre_line
    rows = {"peak_rss_mb": 1.0}
    previous = {"m/dpo": [rows | {"step_s": 1.0}] * 3, "m/lpc-dpo": [rows | {"step_s": 1.2}] * 3}
    now = [{"model": "m", "ratio": "LPC/DPO", "value": 1.0, "low": 0.95, "high": 1.05}]
    (line,) = [ln for ln in speed.comparison(previous, now, ["m"]) if ln.startswith("| m |")]
    assert line == "| m | LPC/DPO | 1.200 [1.200, 1.200] | 1.000 [0.950, 1.050] | NO |"
