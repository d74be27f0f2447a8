"""benchmarks/speed.py: one configuration measured in its own process, as ``make bench`` runs it."""

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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
    # codebook 32 x 128, prior MLP 128->128->32, posterior MLP 256->128->32 (weights + biases)
    assert r["params"] == 654_208
    assert r["latent_params"] == 32 * 128 + (128 * 128 + 128 + 128 * 32 + 32) + (256 * 128 + 128 + 128 * 32 + 32)
    assert 0 < r["step_s"] < 30 and r["setup_s"] > 0 and r["peak_rss_mb"] > 100
