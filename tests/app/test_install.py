"""The package works installed (not editable): its configs, accelerate files and published numbers ship
as package data, and the entry point runs from any directory (issue: no Path(__file__).parents[2])."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO


@pytest.mark.slow  # builds and installs the package: ~30 s
def test_installed_package_trains_from_another_directory(tmp_path):
    target = tmp_path / "site"
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(target)]
    subprocess.run([*pip, str(REPO)], check=True, capture_output=True, text=True, timeout=600)
    installed = target / "lpc"
    for rel in (
        "conf/config.yaml",
        "conf/model/tiny.yaml",
        "training/accelerate/zero3.yaml",
        "conf/experiment/table1.yaml",  # an experiment with its published numbers (lpc-report reads them)
        "evaluation/tasks/gsm8k_local.yaml",
    ):
        assert (installed / rel).is_file(), rel
    work = tmp_path / "elsewhere"
    work.mkdir()
    # The installed copy first on the path, the source checkout nowhere (PYTHONPATH wins over the editable .pth).
    env = {**os.environ, "PYTHONPATH": str(target)}
    proc = subprocess.run(
        [
            str(target / "bin" / "lpc-train"),  # the console script, as `pip install .` puts it on PATH
            "trainer.max_steps=5",
            "trainer.save_every=0",
            "data.n_train=96",
            "data.n_eval=16",
            "hydra.run.dir=run",
        ],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "eval/pref_accuracy=" in proc.stdout
    assert (work / "run" / "metrics.json").is_file()
    # and the code that ran was the installed copy
    where = subprocess.run(
        [sys.executable, "-c", "import lpc; print(lpc.__file__)"],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(target))


def test_the_build_lists_every_package_and_maps_the_config_tree():
    """pyproject.toml names its packages (find() would not see top-level conf/): a new package under src/lpc
    must be added there, or the wheel would lack it; lpc.conf is the repository's conf/, mapped at build time."""
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+

    from setuptools import find_packages

    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert sorted(tool["packages"]) == sorted([*find_packages(str(REPO / "src")), "lpc.conf"])
    assert tool["package-dir"] == {"": "src", "lpc.conf": "conf"}
    assert not (REPO / "src" / "lpc" / "conf").exists()  # one copy of the config tree
    from lpc.conf import CONF_DIR

    assert Path(CONF_DIR) == REPO / "conf"


def test_conf_local_of_the_working_directory_joins_the_launcher(tmp_path):
    """lpc-train run in another directory merges that directory's conf/local/slurm.yaml (git-ignored cluster
    defaults, docs/slurm.md) into hydra/launcher=slurm; the command line still wins over it."""
    (tmp_path / "conf" / "local").mkdir(parents=True)
    (tmp_path / "conf" / "local" / "slurm.yaml").write_text("partition: from_conf_local\n")
    cmd = [sys.executable, "-m", "lpc.train", "hydra/launcher=slurm"]
    show = ["--cfg", "hydra", "--package", "hydra.launcher"]
    shown = subprocess.run([*cmd, *show], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr[-2000:]
    assert "partition: from_conf_local" in shown.stdout
    cli = subprocess.run([*cmd, "hydra.launcher.partition=gpu", *show], cwd=tmp_path, capture_output=True, text=True)
    assert "partition: gpu" in cli.stdout, cli.stderr[-2000:]
