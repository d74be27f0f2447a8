"""The config tree composes for every option, and every bad input fails fast with a clear error."""

import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra.utils import get_object
from omegaconf import OmegaConf

from conftest import CONF_DIR, FIXTURES, REPO, SRC, compose, run_train
from lpc.config import ConfigError, validate

CONF = Path(CONF_DIR)


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


def test_cfg_job_prints_the_composed_config():
    cmd = [sys.executable, str(SRC / "train.py"), "model=mistral7b", "algo=simpo", "codebook=64", "--cfg", "job"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    cfg = OmegaConf.create(proc.stdout)
    assert cfg.model.name_or_path == "mistralai/Mistral-7B-v0.1"
    assert cfg.algo.name == "simpo" and cfg.algo.beta == 2.0 and cfg.algo.gamma == 1.0
    assert cfg.codebook == 64 and cfg.flip == 0.0
    assert cfg.trainer.precision == "bf16"  # a hub model selects the GPU trainer recipe
    assert {"trainer", "model", "algo", "latent", "data", "logger"} <= set(cfg)


def test_issue_options_exist():
    assert {"tiny", "smollm2", "mistral7b", "llama3_8b", "llama3_8b_instruct"} <= set(options("model"))
    assert {"dpo", "simpo", "ipo"} <= set(options("algo"))
    assert {"none"} <= set(options("latent"))
    assert {"synthetic", "ultrafeedback", "ultrafeedback_binarized", "jsonl"} <= set(options("data"))
    assert {"wandb", "none"} <= set(options("logger"))


EXTRA = {"data=jsonl": [f"data.train_file={FIXTURES / 'pairs.jsonl'}"]}


@pytest.mark.parametrize(
    "override", [f"{g}={o}" for g in ("model", "algo", "data", "latent", "logger", "trainer") for o in options(g)]
)
def test_every_option_composes_and_validates(override):
    cfg = compose([override, *EXTRA.get(override, [])])
    validate(cfg)
    group, option = override.split("=")
    if group != "trainer":
        assert cfg[group].name == option
    for node in (cfg.model, cfg.algo, cfg.data, cfg.latent):
        if "_target_" in node:
            assert callable(get_object(node._target_))  # the class or function the option builds exists
    assert OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves


def test_algos_instantiate_with_their_hyperparameters():
    from hydra.utils import instantiate

    assert instantiate(compose(["algo=dpo", "algo.beta=0.3"]).algo).beta == 0.3
    simpo = instantiate(compose(["algo=simpo"]).algo)
    assert (simpo.beta, simpo.gamma, simpo.needs_reference) == (2.0, 1.0, False)
    ipo = instantiate(compose(["algo=ipo", "algo.length_normalize=false"]).algo)
    assert (ipo.tau, ipo.average_logps) == (0.1, False)


# --------------------------------------------------------------------------- bad input
# Each runs the real entry point; LPC_CACHE_DIR points at a directory that loading the tiny model
# would create (its tokenizer cache), so its absence shows the run stopped before any model loaded.

BAD = [
    # (overrides, text the error must contain)
    (["model=nope"], "model/nope"),
    (["algo=nope"], "algo/nope"),
    (["data=nope"], "data/nope"),
    (["latent=nope"], "latent/nope"),
    (["codebook=0"], "codebook=0"),
    (["codebook=-3"], "codebook=-3"),
    (["flip=1.5"], "flip=1.5"),
    (["flip=-0.1"], "flip=-0.1"),
    (["algo.beta=0"], "algo.beta=0"),
    (["algo=simpo", "algo.beta=-1"], "algo.beta=-1"),
    (["algo=ipo", "algo.tau=0"], "algo.tau=0"),
    (["trainer.max_length=1"], "trainer.max_length=1"),
    (["data=jsonl", "data.train_file=/nope.jsonl"], "data.train_file='/nope.jsonl'"),
    (["data=jsonl"], "data.train_file"),  # no file given at all
]


@pytest.mark.parametrize("overrides,message", BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_fails_fast_with_the_key(overrides, message, tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    start = time.time()
    proc = run_train(overrides, run_dir, env={"LPC_CACHE_DIR": str(cache)}, check=False, timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert message in out, out[-2000:]
    if proc.returncode == 2:  # our validation (Hydra's own composition errors exit with 1)
        assert "is not allowed" in out
    else:
        assert "Available options" in out
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "final").exists()
    assert not (run_dir / "checkpoints").exists()
    assert not cache.exists(), "a model or tokenizer was loaded before the config error"
    assert time.time() - start < 60


def test_validate_raises_config_error_in_process():
    with pytest.raises(ConfigError, match=r"flip=2 is not allowed: a number in \[0, 1\]"):
        validate(compose(["flip=2"]))
    with pytest.raises(ConfigError, match="codebook"):
        validate(compose(["codebook=0"]))


def test_missing_hub_model_offline_fails_at_once(tmp_path):
    run_dir = tmp_path / "run"
    start = time.time()
    proc = run_train(["model=mistral7b", "trainer=cpu"], run_dir, env={"HF_HUB_OFFLINE": "1"}, check=False, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0
    assert "mistralai/Mistral-7B-v0.1" in out and "not in the local Hugging Face cache" in out, out[-2000:]
    assert "HF_HUB_OFFLINE" in out
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "final").exists()
    assert time.time() - start < 100
