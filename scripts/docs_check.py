"""`make docs-check`: regenerate the cheap figures quoted in README.md and docs/, compare them with the text.

Each check finds a claim in a document, measures the same quantity with the code, and fails with the document,
the claimed and the measured value when they differ:

* README.md: ``eval/pref_accuracy`` of ``make train`` (the default run, trained here: ~20 s on 2 idle cores) lies
  in the interval the README states, ``eval/pref_accuracy in [LOW, HIGH]``: the prediction interval that
  ``scripts/accuracy_spread.py`` prints from runs over seeds and CPU kernel settings (another machine's kernels
  round differently and train another model, so one machine's four digits are not a claim another can check);
* README.md and docs/: "0.65M-parameter" (the tiny Llama's parameter count), docs/benchmarks.md's parameter columns
  (tiny and SmolLM2-135M, built here, and the LPC latent's parameters at K = 32);
* docs/synthetic-benchmark.md: the share of labels the generator's Bradley-Terry noise flips at the documented
  temperature, the runs each group of the synthetic benchmark makes (``sweep.groups`` of
  conf/experiment/synthetic_benchmark.yaml, as lpc-sweep lists them), their total and the runs lpc-steer analyses;
* docs/experiments.md: the jobs ``lpc-sweep experiment=NAME [scale=paper] --dry-run`` lists, per experiment.
* README.md's config tree table: a row for every config group (directory) of conf/, and the codebook row names
  exactly the options of conf/codebook/.

``--root DIR`` reads the documents from another checkout (the tests use an edited copy); ``--only NAME[,NAME]``
runs some checks; ``--measured KEY=VALUE`` supplies a measurement instead of making it (tests only, e.g.
``default_accuracy=0.9355``). Exit status 1 when a claim does not match, 0 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "src") not in sys.path:
    sys.path.insert(0, str(REPO / "src"))
for _k, _v in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_k, _v)
os.environ.setdefault("WANDB_MODE", "disabled")


@dataclass
class Result:
    doc: str
    what: str
    claimed: str
    measured: str
    within: bool | None = None  # an interval claim: whether the measurement lies in it (else: equal strings)

    @property
    def ok(self) -> bool:
        return self.claimed == self.measured if self.within is None else self.within

    def __str__(self) -> str:
        verdict = "ok  " if self.ok else "FAIL"
        return f"{verdict} {self.doc}: {self.what}: claimed {self.claimed}, measured {self.measured}"


# ---------------------------------------------------------------------- measurements
def compose(overrides: list[str]):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lpc.conf import CONF_DIR

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def default_accuracy() -> str:
    """``make train``'s final held-out accuracy: ``src/train.py`` with no overrides, as the Makefile runs it."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(
            [sys.executable, str(REPO / "src" / "train.py"), f"hydra.run.dir={tmp}"],
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"the default training run failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
        return f"{json.loads((Path(tmp) / 'metrics.json').read_text())['eval/pref_accuracy']:.4f}"


def model_parameters(model: str) -> str:
    """``"N,M"``: the parameters of ``model=NAME``'s language model and of the discrete latent at K = 32 on it."""
    from hydra.utils import instantiate

    cfg = compose([f"model={model}", "codebook=32"])
    lm, _ = instantiate(cfg.model)
    latent = instantiate(cfg.latent, hidden_size=lm.config.hidden_size)
    return f"{lm.num_parameters()},{sum(p.numel() for p in latent.parameters())}"


def flip_rate(temperature: float) -> float:
    """Share of the benchmark's training labels (experiment=synthetic_benchmark, seed 0) that the
    Bradley-Terry noise at ``temperature`` turns against the labeller's own reward."""
    from hydra.utils import instantiate

    cfg = compose(["experiment=synthetic_benchmark", f"data.label_noise={temperature}"])
    gen = instantiate(cfg.data)
    train = gen()["train"]
    return sum(train["noisy_label"]) / len(train)


def sweep_jobs(experiment: str, scale: str) -> int:
    """The jobs ``lpc-sweep experiment=NAME scale=SCALE --dry-run`` lists."""
    from lpc.experiments import sweep

    with tempfile.TemporaryDirectory() as tmp:
        opts, extra = sweep.parse_args([f"experiment={experiment}", f"scale={scale}", "--sweep-dir", tmp])
        return len(sweep.plan(opts, extra)["jobs"])


def makefile_variables(text: str) -> dict[str, str]:
    """``NAME ?= value`` / ``NAME := value`` / ``NAME = value`` lines of a Makefile (one line each)."""
    out = {}
    for m in re.finditer(r"^([A-Z_]+)\s*(?:\?=|:=|=)\s*(.*)$", text, re.MULTILINE):
        out.setdefault(m.group(1), m.group(2).strip())
    return out


# ---------------------------------------------------------------------- the synthetic benchmark's runs
def synthetic_groups(experiment: str = "synthetic_benchmark") -> dict[str, int]:
    """Runs per group of an experiment, as ``lpc-sweep experiment=NAME --dry-run`` lists them, and under
    ``"steered"`` the runs ``sweep.steer`` selects."""
    from lpc.experiments import spec, sweep

    with tempfile.TemporaryDirectory() as tmp:
        opts, extra = sweep.parse_args([f"experiment={experiment}", "--sweep-dir", tmp])
        p = sweep.plan(opts, extra)
    counts: dict[str, int] = {}
    for j in p["jobs"]:
        counts[j["group"]] = counts.get(j["group"], 0) + 1
    match = (p["steer"] or {}).get("match")
    counts["steered"] = sum(spec.matches(j, match) for j in p["jobs"]) if match else 0
    return counts


# ---------------------------------------------------------------------- checks
class Checker:
    def __init__(self, root: Path, measured: dict[str, str] | None = None):
        self.root, self.measured, self.results = root, dict(measured or {}), []

    def measure(self, key: str, fn, *args) -> str:
        if key not in self.measured:
            self.measured[key] = str(fn(*args))
        return self.measured[key]

    def add(self, doc: str, what: str, claimed, measured, within: bool | None = None) -> None:
        self.results.append(Result(doc, what, str(claimed), str(measured), within))

    def read(self, rel: str) -> str:
        return (self.root / rel).read_text()

    def readme_accuracy(self) -> None:
        """Every ``eval/pref_accuracy in [LOW, HIGH]`` of the README holds this machine's measurement; a bare
        ``eval/pref_accuracy=X`` (one machine's figure) is not a claim it can check and fails."""
        text = self.read("README.md")
        what = "make train's eval/pref_accuracy"
        claims = re.findall(r"eval/pref_accuracy in \[(\d\.\d+), (\d\.\d+)\]", text)
        if not claims:
            self.add("README.md", what, "nothing", "an interval to check (eval/pref_accuracy in [LOW, HIGH])")
        for bare in re.findall(r"eval/pref_accuracy=(\d\.\d+)", text):
            self.add(
                "README.md", what, bare, "an interval, not one machine's figure (eval/pref_accuracy in [LOW, HIGH])"
            )
        for low, high in claims:
            measured = self.measure("default_accuracy", default_accuracy)
            within = float(low) <= float(measured) <= float(high)
            self.add("README.md", what, f"[{low}, {high}]", measured, within)

    def parameters(self) -> None:
        tiny, tiny_latent = (int(x) for x in self.measure("params:tiny", model_parameters, "tiny").split(","))
        tiny_m = f"{tiny / 1e6:.2f}M"
        for rel in ["README.md", *sorted(str(p.relative_to(self.root)) for p in (self.root / "docs").glob("*.md"))]:
            text = self.read(rel)
            for c in re.findall(r"(\d+\.\d+M)-parameter|tiny Llama \((\d+\.\d+M) parameters", text):
                self.add(rel, "the tiny Llama's parameters", c[0] or c[1], tiny_m)
        speed = self.read("docs/benchmarks.md")
        m = re.search(r"heads add (\d+\.\d+M) parameters to SmolLM2-135M \((\d+\.\d+)%\)", speed)
        if m:
            lm, lat = (int(x) for x in self.measure("params:smollm2", model_parameters, "smollm2").split(","))
            self.add("docs/benchmarks.md", "the latent's parameters on SmolLM2", m.group(1), f"{lat / 1e6:.2f}M")
            self.add("docs/benchmarks.md", "the latent's share on SmolLM2", f"{m.group(2)}%", f"{100 * lat / lm:.1f}%")
        for c in re.findall(r"tiny model the heads are (\d+)% of the\s+parameters", speed):
            self.add(
                "docs/benchmarks.md",
                "the latent's share on the tiny model",
                f"{c}%",
                f"{100 * tiny_latent / tiny:.0f}%",
            )
        rows = re.findall(r"^\| (\w+)/([\w-]+) \|.*\| ([\d,]+) \| ([\d,]+) \|$", speed, re.MULTILINE)
        counts = {"tiny": (tiny, tiny_latent)}
        for model, config, params, latent in rows:
            if model not in counts:
                counts[model] = tuple(
                    int(x) for x in self.measure(f"params:{model}", model_parameters, model).split(",")
                )
            lm_params, latent_params = counts[model]
            self.add("docs/benchmarks.md", f"{model}/{config} params", params, f"{lm_params:,}")
            expected_latent = latent_params if config.startswith("lpc") else 0
            self.add("docs/benchmarks.md", f"{model}/{config} latent params", latent, f"{expected_latent:,}")

    def flip_rate(self) -> None:
        rel = "docs/synthetic-benchmark.md"
        for t, lo, hi in re.findall(r"T = ([\d.]+) flips (\d+)-(\d+)% of the labels", self.read(rel)):
            rate = float(self.measure(f"flip_rate:{t}", flip_rate, float(t)))
            measured = f"{lo}-{hi}%" if int(lo) <= round(100 * rate) <= int(hi) else f"{100 * rate:.1f}%"
            self.add(rel, f"labels flipped at T = {t}", f"{lo}-{hi}%", measured)

    def synthetic_runs(self) -> None:
        rel = "docs/synthetic-benchmark.md"
        text = self.read(rel)
        counts = json.loads(self.measure("synthetic_groups", lambda: json.dumps(synthetic_groups())))
        steered = counts.pop("steered")
        for group, runs in counts.items():
            m = re.search(rf"^\| `{re.escape(group)}` \|.*\| (\d+) \|$", text, re.MULTILINE)
            self.add(rel, f"runs of group {group}", m.group(1) if m else "no row", runs)
        total = re.findall(r"make benchmark-synthetic\s+# (\d+) runs and the steering of (\d+)", text)
        if not total:
            self.add(rel, "runs of make benchmark-synthetic", "nothing", "'make benchmark-synthetic  # N runs and ...'")
        for runs, steer in total:
            self.add(rel, "runs of make benchmark-synthetic", runs, sum(counts.values()))
            self.add(rel, "runs lpc-steer analyses", steer, steered)

    def sweep_jobs(self) -> None:
        rel = "docs/experiments.md"
        rows = re.findall(
            r"^\| `reproduce-(\w+)` \| [^|]+ \| [^|]+ \| ([^|]+) \| ([^|]+) \|$", self.read(rel), re.MULTILINE
        )
        if not rows:
            self.add(rel, "the job counts table", "nothing", "a table to check")
        for experiment, cpu, paper in rows:
            for scale, cell in (("cpu", cpu), ("paper", paper)):
                m = re.search(r"=\s*(\d+)", cell) or re.search(r"(\d+)", cell)
                jobs = self.measure(f"jobs:{experiment}:{scale}", sweep_jobs, experiment, scale)
                self.add(rel, f"jobs of experiment={experiment} scale={scale}", m.group(1) if m else cell.strip(), jobs)

    def config_tree(self) -> None:
        """README's config tree table has a row for every group of conf/, and its codebook row names the options."""
        from lpc.conf import CONF_DIR

        text, conf = self.read("README.md"), Path(CONF_DIR)
        rows = dict(re.findall(r"^\| `(\w+)` \| ([^|]+) \|", text, re.MULTILINE))
        for group in sorted(p.name for p in conf.iterdir() if p.is_dir()):
            if group not in ("hydra", "local", "__pycache__"):
                self.add("README.md", f"config group {group}", "a row" if group in rows else "no row", "a row")
        claimed = sorted(re.findall(r"`(\w+)`", rows.get("codebook", "")))
        self.add(
            "README.md",
            "codebook options",
            ",".join(claimed),
            ",".join(sorted(p.stem for p in (conf / "codebook").glob("*.yaml"))),
        )


CHECKS = {
    "config-tree": Checker.config_tree,
    "accuracy": Checker.readme_accuracy,
    "parameters": Checker.parameters,
    "flip-rate": Checker.flip_rate,
    "synthetic-runs": Checker.synthetic_runs,
    "jobs": Checker.sweep_jobs,
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(REPO), help="the checkout whose README.md and docs/ are checked")
    ap.add_argument("--only", default="", help=f"comma-separated checks of {', '.join(CHECKS)} (default: all)")
    ap.add_argument("--measured", action="append", default=[], metavar="KEY=VALUE", help="skip one measurement")
    args = ap.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(CHECKS)
    unknown = [n for n in names if n not in CHECKS]
    if unknown:
        ap.error(f"unknown check(s) {unknown}; choose from {list(CHECKS)}")
    checker = Checker(Path(args.root), dict(kv.split("=", 1) for kv in args.measured))
    for name in names:
        CHECKS[name](checker)
    for r in checker.results:
        print(r)
    failed = [r for r in checker.results if not r.ok]
    print(f"docs-check: {len(checker.results) - len(failed)} of {len(checker.results)} figures match")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
