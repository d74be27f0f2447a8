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
    # the SimPO authors' Mistral-7B recipe (conf/recipe/mistral7b_simpo.yaml), not the generic SimPO default
    assert cfg.algo.name == "simpo" and cfg.algo.beta == 2.0 and cfg.algo.gamma == 1.6 and cfg.trainer.lr == 3e-7
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
    (["trainer.global_batch_size=100"], "trainer.global_batch_size=100 is not allowed with trainer.batch_size=16"),
    (
        ["trainer.global_batch_size=32", "trainer.gradient_accumulation_steps=1"],
        "trainer.gradient_accumulation_steps=1",
    ),
    (["trainer.global_batch_size=0"], "trainer.global_batch_size=0"),
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


def test_global_batch_derives_the_accumulation():
    from lpc.training.distributed import gradient_accumulation

    gpu = compose(["model=llama3_8b"]).trainer  # the paper recipe: 128 pairs, 2 per GPU
    assert (gpu.global_batch_size, gpu.batch_size, gpu.gradient_accumulation_steps) == (128, 2, None)
    assert [gradient_accumulation(gpu, world) for world in (8, 4, 16, 1)] == [8, 16, 4, 64]
    with pytest.raises(ConfigError, match=r"a multiple of batch_size x processes = 6 .*on 3 processes: none"):
        gradient_accumulation(gpu, 3)  # 128 pairs cannot be split over 3 GPUs
    with pytest.raises(ConfigError, match=r"batch_size=3 on 8 process\(es\).*= 24 .*on 8 processes: \[1, 2\]"):
        gradient_accumulation(OmegaConf.merge(gpu, {"batch_size": 3}), 8)
    cpu = compose([]).trainer  # no global batch: the accumulation as given
    assert cpu.global_batch_size is None and gradient_accumulation(cpu, 2) == cpu.gradient_accumulation_steps == 1


def test_paper_recipe_refused_before_loading_when_the_batch_does_not_divide(tmp_path):
    # 8 ranks (as torchrun or a SLURM job sets WORLD_SIZE) x micro-batch 3 cannot make 128 pairs: refused
    # before the (offline, uncached) Llama3-8B is even looked for
    proc = run_train(
        ["model=llama3_8b", "trainer.batch_size=3"], tmp_path / "run", env={"WORLD_SIZE": "8"}, check=False
    )
    out = proc.stdout + proc.stderr  # Hydra's logging goes to stdout
    assert proc.returncode == 2, out[-2000:]
    assert "trainer.global_batch_size=128 is not allowed with trainer.batch_size=3 on 8 process(es)" in out
    assert "Meta-Llama" not in out and not (tmp_path / "run" / "final").exists()


# (model, algo) -> (beta or tau, gamma, lr, length_normalize): conf/recipe/, each with its source in a comment
RECIPES = {
    ("mistral7b", "simpo"): (2.0, 1.6, 3e-7, None),  # SimPO training_configs/mistral-7b-base-simpo.yaml
    ("llama3_8b", "simpo"): (2.0, 1.0, 6e-7, None),  # .../llama-3-8b-base-simpo.yaml (gamma/beta 0.5)
    ("llama3_8b_instruct", "simpo"): (2.5, 1.375, 1e-6, None),  # .../llama-3-8b-instruct-simpo.yaml (0.55)
    ("llama3_8b", "dpo"): (0.1, None, 5e-7, None),  # OpenRLHF's DPO example
    ("mistral7b", "ipo"): (0.1, None, 5e-7, False),  # OpenRLHF sums the log-probs
    ("tiny", "simpo"): (2.0, 1.0, 2e-3, None),  # no recipe: the algo and trainer defaults
    ("tiny", "ipo"): (0.1, None, 2e-3, True),
}


@pytest.mark.parametrize("model,algo", sorted(RECIPES), ids=["-".join(k) for k in sorted(RECIPES)])
def test_per_model_recipes(model, algo):
    cfg = compose([f"model={model}", f"algo={algo}"])
    beta, gamma, lr, normalize = RECIPES[model, algo]
    assert (cfg.algo.get("beta", cfg.algo.get("tau")), cfg.algo.get("gamma"), cfg.trainer.lr) == (beta, gamma, lr)
    assert cfg.algo.get("length_normalize") == normalize
    # the command line wins over the recipe, and the paper scale (a sweep's jobs) picks the same recipe
    assert compose([f"model={model}", f"algo={algo}", "trainer.lr=1e-5"]).trainer.lr == 1e-5
    if model != "tiny":
        assert compose(["experiment=table1", "scale=paper", f"model={model}", f"algo={algo}"]).trainer.lr == lr


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
