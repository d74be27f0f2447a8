"""make docs-check (scripts/docs_check.py) and the expensive tables' provenance: docs/synthetic-benchmark.md's
and docs/benchmarks.md's headers must match the experiment definition, the Makefile settings and the config that
would make them today."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, compose


def load_docs_check():
    if "docs_check" not in sys.modules:
        spec = importlib.util.spec_from_file_location("docs_check", REPO / "scripts" / "docs_check.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules["docs_check"] = mod  # its dataclass looks itself up there
        spec.loader.exec_module(mod)
    return sys.modules["docs_check"]


def copy_docs(tmp_path):
    """README.md, docs/ and the Makefile in a temporary checkout (never edit the real ones)."""
    root = tmp_path / "checkout"
    root.mkdir()
    shutil.copy(REPO / "README.md", root / "README.md")
    shutil.copy(REPO / "Makefile", root / "Makefile")
    shutil.copytree(REPO / "docs", root / "docs")
    return root


ACCURACY_INTERVAL = r"eval/pref_accuracy in \[(\d\.\d+), (\d\.\d+)\]"
WHAT = "FAIL README.md: make train's eval/pref_accuracy"


def readme_interval() -> tuple[str, str]:
    """The README's one claim about make train's accuracy: the interval scripts/accuracy_spread.py measured over
    seeds and CPU kernel settings (one machine's four digits are not a claim another machine can check)."""
    (claim,) = set(re.findall(ACCURACY_INTERVAL, (REPO / "README.md").read_text()))
    return claim


def test_the_readme_accuracy_is_an_interval_a_measurement_inside_passes_and_one_outside_fails(tmp_path, capsys):
    """The comparison, with the measurement supplied (the slow test below measures it)."""
    docs_check = load_docs_check()
    root = copy_docs(tmp_path)
    low, high = readme_interval()
    assert float(low) < float(high)

    def check(measured: str) -> int:
        return docs_check.main(
            ["--root", str(root), "--only", "accuracy", "--measured", f"default_accuracy={measured}"]
        )

    middle = f"{(float(low) + float(high)) / 2:.4f}"
    assert [check(low), check(middle), check(high)] == [0, 0, 0]
    capsys.readouterr()
    # one eval pair of make train's 1,024 below and above the interval: a machine measuring either fails
    below, above = f"{float(low) - 1 / 1024:.4f}", f"{float(high) + 1 / 1024:.4f}"
    assert [check(below), check(above)] == [1, 1]
    out = capsys.readouterr().out
    for measured in (below, above):
        assert f"{WHAT}: claimed [{low}, {high}], measured {measured}" in out
    # a README that quotes one machine's figure again fails, whatever this machine measures
    readme = root / "README.md"
    readme.write_text(
        readme.read_text().replace(f"[{low}, {high}]", f"[{low}, {high}] (here eval/pref_accuracy=0.8594)")
    )
    assert check(middle) == 1
    assert f"{WHAT}: claimed 0.8594, measured an interval, not one machine's figure" in capsys.readouterr().out


@pytest.mark.slow
def test_make_docs_check_trains_the_default_and_fails_on_an_edited_readme(tmp_path):
    """The real thing: the script trains the default run (~1-2 min). A README whose interval lies below the real
    one is refused, naming the measurement; that measurement lies in the real interval (on this machine, under
    any ATEN_CPU_CAPABILITY)."""
    root = copy_docs(tmp_path)
    low, high = readme_interval()
    wrong = f"[{float(low) - 0.2:.4f}, {float(low) - 0.1:.4f}]"  # disjoint from the measured range
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace(f"in [{low}, {high}]", f"in {wrong}"))
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), str(REPO / "scripts" / "docs_check.py"), "--root", str(root)]
        + ["--only", "accuracy"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    m = re.search(rf"{re.escape(f'{WHAT}: claimed {wrong}, measured ')}(\d\.\d+)", proc.stdout)
    assert m, proc.stdout
    assert float(low) <= float(m.group(1)) <= float(high)  # the real claim holds here


def test_every_other_cheap_figure_matches_and_an_edit_to_each_fails(tmp_path, capsys):
    """Parameter counts, the flip rate at T = 0.1, the benchmark's runs and the sweeps' job counts: all match
    today; a copy with one figure of each kind edited fails on exactly those."""
    docs_check = load_docs_check()
    root = copy_docs(tmp_path)
    checks = "parameters,flip-rate,synthetic-runs,jobs"
    assert docs_check.main(["--root", str(root), "--only", checks]) == 0
    edits = {
        "docs/experiments.md": ("x 3 x 2 x 5 = 90 runs", "x 3 x 2 x 5 = 80 runs"),
        "docs/benchmarks.md": ("| 654,208 | 78,144 |", "| 654,208 | 78,145 |"),
        "docs/synthetic-benchmark.md": ("T = 0.1 flips 10-11% of the labels", "T = 0.1 flips 19-21% of the labels"),
        "README.md": ("~0.65M-parameter", "~0.75M-parameter"),
    }
    for rel, (old, new) in edits.items():
        path = root / rel
        assert old in path.read_text(), (rel, old)
        path.write_text(path.read_text().replace(old, new, 1))
    capsys.readouterr()
    assert docs_check.main(["--root", str(root), "--only", checks]) == 1
    fails = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("FAIL")]
    assert fails == [
        "FAIL README.md: the tiny Llama's parameters: claimed 0.75M, measured 0.65M",
        "FAIL docs/benchmarks.md: tiny/lpc-dpo latent params: claimed 78,145, measured 78,144",
        "FAIL docs/synthetic-benchmark.md: labels flipped at T = 0.1: claimed 19-21%, measured 10.0%",
        "FAIL docs/experiments.md: jobs of experiment=table1 scale=paper: claimed 80, measured 90",
    ]


def test_synthetic_benchmark_runs_per_group_by_hand():
    """The runs docs-check counts, against conf/experiment/synthetic_benchmark.yaml read by hand: 10 seeds times
    3 methods (conflict 1, tag shown), 2 methods (the other settings) or 1 (the two ablations); lpc-steer on the
    10 LPC-DPO runs of the headline setting."""
    counts = load_docs_check().synthetic_groups()
    assert counts == {
        "conflict1-visible": 30,
        "conflict0-visible": 20,
        "flip-marker": 20,
        "flip-nomarker": 20,
        "conflict1-weak-tag": 20,
        "ablation-former-defaults": 10,
        "ablation-lr10": 10,
        "conflict1-visible-1200steps": 20,
        "steered": 10,
    }


def test_a_group_or_total_the_doc_miscounts_fails(tmp_path, capsys):
    """docs/synthetic-benchmark.md's group table and steering count against the experiment's runs: one group's row
    and the steered count edited fail on exactly those."""
    docs_check = load_docs_check()
    root = copy_docs(tmp_path)
    doc = root / "docs" / "synthetic-benchmark.md"
    text = doc.read_text()
    for old, new in (("| 30 |", "| 31 |"), ("the steering of 10 of them", "the steering of 20 of them")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    doc.write_text(text)
    assert docs_check.main(["--root", str(root), "--only", "synthetic-runs"]) == 1
    fails = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("FAIL")]
    assert fails == [
        "FAIL docs/synthetic-benchmark.md: runs of group conflict1-visible: claimed 31, measured 30",
        "FAIL docs/synthetic-benchmark.md: runs lpc-steer analyses: claimed 20, measured 10",
    ]


# ---------------------------------------------------------------------- expensive tables: provenance
def synthetic_spec() -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(compose(["experiment=synthetic_benchmark"]).sweep, resolve=True)


def synthetic_titles() -> dict[str, str]:
    """Per group of the benchmark, the title its table would carry if the benchmark ran today (its config composed;
    the data setting does not depend on the method or the seed)."""
    from lpc.experiments import spec
    from lpc.experiments.synthetic import data_setting, setting_title

    titles = {}
    for group, part in spec.groups(synthetic_spec()).items():
        first = [f"{k}={spec.fmt(v[0])}" for k, v in part["grid"].items()]
        cfg = compose(["experiment=synthetic_benchmark", *part["overrides"], *first])
        titles[group] = setting_title(data_setting(cfg))
    return titles


def test_synthetic_benchmark_tables_match_the_generator_config_of_today():
    """Every group of the synthetic benchmark has its table, under the title its composed config gives (n_types,
    conflict, tag, noise, flips, steps), with as many seeds per row as the experiment's grid; the doc names the
    commits that made the runs. Changing conf/experiment/synthetic_benchmark.yaml without rerunning the benchmark
    fails here."""
    doc = (REPO / "docs" / "synthetic-benchmark.md").read_text()
    recorded = (REPO / "experiments" / "synthetic_benchmark" / "results" / "benchmark.md").read_text()
    titles = synthetic_titles()
    assert len(titles) == 8 and len(set(titles.values())) == 6  # the ablations share the headline's data setting
    for group, title in titles.items():
        assert f"**{title}**" in doc, (group, title)
        assert f"**{title}**" in recorded, (group, title)
    doc_titles = set(re.findall(r"^\*\*(\d+ types, .+ steps)\*\*$", doc, re.MULTILINE))
    assert doc_titles == set(titles.values())  # no table from a setting the benchmark no longer runs
    seeds = len(synthetic_spec()["grid"]["seed"])
    rows = re.findall(r"^\| ((?:LPC-)?DPO[^|]*) \| (\d+) \|", doc, re.MULTILINE)
    assert len(rows) == 15 and {int(n) for _, n in rows} == {seeds}
    assert recorded.startswith("150 completed runs, made by `make benchmark-synthetic`")
    for commit in re.findall(r"at commit ([0-9a-f]{7,})|at ([0-9a-f]{7,}) \(", doc):
        sha = commit[0] or commit[1]
        assert subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=REPO).returncode == 0, sha


def test_speed_table_carries_its_commit_and_the_makefiles_command():
    """docs/benchmarks.md: the command is `make bench`'s (BENCH_ARGS), the batch and length are benchmarks/speed.py's,
    the configurations are the script's, and the commit that recorded the numbers is named. Changing BENCH_ARGS
    or the script's settings without rerunning `make bench` fails here."""
    docs_check = load_docs_check()
    doc = (REPO / "docs" / "benchmarks.md").read_text()
    bench_args = docs_check.makefile_variables((REPO / "Makefile").read_text())["BENCH_ARGS"]
    assert f"Command: `python benchmarks/speed.py {bench_args}`" in doc
    models = re.search(r"--models (\S+)", bench_args).group(1).split(",")
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import speed
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    assert f"Setup: batch {speed.BATCH} pairs, max_length {speed.MAX_LEN}, fp32, CPU" in doc
    assert re.findall(r"^\| ([\w-]+/[\w-]+) \|", doc, re.MULTILINE) == list(speed.configs(models))
    sha = re.search(r"^Commit: `?([0-9a-f]{7,})`?", doc, re.MULTILINE).group(1)
    assert subprocess.run(["git", "cat-file", "-e", f"{sha}^{{commit}}"], cwd=REPO).returncode == 0


def test_accuracy_spread_reports_the_range_over_seeds_and_kernels_by_hand():
    """scripts/accuracy_spread.py's table and summary (what the README quotes) on hand-made runs."""
    spec = importlib.util.spec_from_file_location("accuracy_spread", REPO / "scripts" / "accuracy_spread.py")
    spread = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(spread)
    accs = {(0, "native"): 0.86, (0, "avx2"): 0.90, (1, "native"): 0.93, (1, "avx2"): 0.95}
    runs = [
        {"seed": s, "capability": c, "accuracy": a, "process_s": 60.0, "cpu_s": 100.0} for (s, c), a in accs.items()
    ]
    assert spread.capability_env("native").get("ATEN_CPU_CAPABILITY") is None
    assert spread.capability_env("avx2")["ATEN_CPU_CAPABILITY"] == "avx2"
    md = spread.report(runs, [0, 1], ["native", "avx2"], {"native": "AVX512", "avx2": "AVX2"}, "python x.py")
    assert "| seed | native (AVX512) | avx2 (AVX2) | range |" in md
    assert "| 0 | 0.8600 | 0.9000 | 0.0400 |" in md and "| 1 | 0.9300 | 0.9500 | 0.0200 |" in md
    # mean 0.91, sample sd sqrt(((0.05)^2 + (0.01)^2 + (0.02)^2 + (0.04)^2) / 3) = sqrt(0.0046 / 3) = 0.0392
    assert "over 2 seed(s) x 2 kernel setting(s): 0.8600-0.9500, mean 0.9100 +- 0.0392 (sd)" in md
    # one more run: 0.91 +- t(0.995, 3 df) = 5.8409 x 0.039158 x sqrt(1 + 1/4) = 0.2557, clipped at 1, rounded outward
    assert "one more run (another seed or machine): eval/pref_accuracy in [0.65, 1.00] (exact 0.6543-1.0000" in md
