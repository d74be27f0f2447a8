"""make docs-check (scripts/docs_check.py) and the expensive tables' provenance: docs/synthetic-benchmark.md's
and docs/benchmarks.md's headers must match the Makefile settings and the config that would make them today."""

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


def readme_accuracy() -> str:
    (claim,) = set(re.findall(r"eval/pref_accuracy=(\d\.\d+)", (REPO / "README.md").read_text()))
    return claim


def test_a_wrong_readme_accuracy_fails_naming_the_doc_the_claim_and_the_measurement(tmp_path, capsys):
    """The comparison, with the measurement supplied (the slow test below measures it)."""
    docs_check = load_docs_check()
    root = copy_docs(tmp_path)
    claim = readme_accuracy()
    measured = ["--measured", f"default_accuracy={claim}"]
    assert docs_check.main(["--root", str(root), "--only", "accuracy", *measured]) == 0
    readme = root / "README.md"
    readme.write_text(readme.read_text().replace(f"eval/pref_accuracy={claim}", "eval/pref_accuracy=0.9258"))
    assert docs_check.main(["--root", str(root), "--only", "accuracy", *measured]) == 1
    out = capsys.readouterr().out
    assert f"FAIL README.md: make train's eval/pref_accuracy: claimed 0.9258, measured {claim}" in out


@pytest.mark.slow
def test_make_docs_check_trains_the_default_and_fails_on_an_edited_readme(tmp_path):
    """The real thing: the script trains the default run (~1-2 min) and refuses a README edited to 0.9258."""
    root = copy_docs(tmp_path)
    readme = root / "README.md"
    readme.write_text(
        readme.read_text().replace(f"eval/pref_accuracy={readme_accuracy()}", "eval/pref_accuracy=0.9258")
    )
    proc = subprocess.run(
        [str(REPO / ".venv" / "bin" / "python"), str(REPO / "scripts" / "docs_check.py"), "--root", str(root)]
        + ["--only", "accuracy"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    assert f"claimed 0.9258, measured {readme_accuracy()}" in proc.stdout


def test_every_other_cheap_figure_matches_and_an_edit_to_each_fails(tmp_path, capsys):
    """Parameter counts, the flip rate at T = 0.1, the benchmark's runs and the sweeps' job counts: all match
    today; a copy with one figure of each kind edited fails on exactly those."""
    docs_check = load_docs_check()
    root = copy_docs(tmp_path)
    checks = "parameters,flip-rate,synthetic-runs,jobs"
    assert docs_check.main(["--root", str(root), "--only", checks]) == 0
    edits = {
        "docs/experiments.md": ("x 3 x 2 x 5 = 90 runs", "x 3 x 2 x 5 = 80 runs"),
        "docs/benchmarks.md": ("| 654,208 | 61,760 |", "| 654,208 | 61,761 |"),
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
        "FAIL docs/benchmarks.md: tiny/lpc-dpo latent params: claimed 61,761, measured 61,760",
        "FAIL docs/synthetic-benchmark.md: labels flipped at T = 0.1: claimed 19-21%, measured 10.0%",
        "FAIL docs/experiments.md: jobs of experiment=table1 scale=paper: claimed 80, measured 90",
    ]


def test_synthetic_benchmark_makefile_runs_by_hand():
    """The Makefile parser against the targets read by hand: synthetic-main is 3 methods + 2 methods, each over
    the 10 seeds of SEEDS = range(0,10)."""
    docs_check = load_docs_check()
    sweeps = docs_check.synthetic_sweeps(REPO / "Makefile")
    assert docs_check.n_seeds(REPO / "Makefile") == 10
    assert sweeps["synthetic-main"] == [
        ["data.conflict=1.0", "data.visibility=always", "latent=none,discrete,continuous"],
        ["data.conflict=0.0", "data.visibility=always", "latent=none,discrete"],
    ]
    assert [docs_check.runs_of(s, 10) for s in sweeps["synthetic-main"]] == [30, 20]
    assert sweeps["synthetic-steering"] == []


# ---------------------------------------------------------------------- expensive tables: provenance
def synthetic_titles() -> dict[str, str]:
    """Per Makefile sweep, the title its table would carry if the benchmark ran today (its config composed)."""
    from lpc.experiments.synthetic import data_setting, setting_title

    docs_check = load_docs_check()
    titles = {}
    for target, sweeps in docs_check.synthetic_sweeps(REPO / "Makefile").items():
        for overrides in sweeps:
            single = [o.split(",")[0] for o in overrides]  # the data setting does not depend on the method
            cfg = compose(["experiment=synthetic_benchmark", *single])
            titles[f"{target} {' '.join(overrides)}"] = setting_title(data_setting(cfg))
    return titles


def test_synthetic_benchmark_tables_match_the_generator_config_of_today():
    """Every sweep of make benchmark-synthetic has its table, under the title its composed config gives (n_types,
    conflict, tag, noise, flips, steps), with as many seeds per row as SEEDS; the doc names the command and the
    commits that made the runs. Changing conf/experiment/synthetic_benchmark.yaml or the Makefile's settings
    without rerunning the benchmark fails here."""
    docs_check = load_docs_check()
    doc = (REPO / "docs" / "synthetic-benchmark.md").read_text()
    asset = (REPO / "docs" / "assets" / "synthetic-benchmark" / "benchmark.md").read_text()
    titles = synthetic_titles()
    assert len(titles) == 9  # main 2, noise 2, weak tag + 2 ablations, longer 2
    for sweep, title in titles.items():
        assert f"**{title}**" in doc, (sweep, title)
        assert f"**{title}**" in asset, (sweep, title)
    doc_titles = set(re.findall(r"^\*\*(\d+ types, .+ steps)\*\*$", doc, re.MULTILINE))
    assert doc_titles == set(titles.values())  # no table from a setting the Makefile no longer runs
    seeds = docs_check.n_seeds(REPO / "Makefile")
    rows = re.findall(r"^\| ((?:LPC-)?DPO[^|]*) \| (\d+) \|", doc, re.MULTILINE)
    assert len(rows) == 15 and {int(n) for _, n in rows} == {seeds}
    assert asset.startswith("150 completed runs, made by `make benchmark-synthetic`")
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
