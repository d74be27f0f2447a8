"""Shared test set-up: offline, W&B disabled, helpers to compose configs and run the entry point."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
if str(SRC) not in sys.path:
    sys.path.insert(0, str(SRC))
from lpc.conf import CONF_DIR  # noqa: E402  (the package's config tree)

FIXTURES = Path(__file__).resolve().parent / "fixtures"

# Never touch the network; never log to W&B online.
os.environ.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"})
os.environ.setdefault("WANDB_MODE", "disabled")


def _warm_up_for_mutation_testing() -> None:
    """`make mutation` (mutmut) forks one process per mutant from a server that has imported this file. The
    imports a test would otherwise pay in every fork (transformers' Llama, scikit-learn, matplotlib, accelerate:
    ~4 s of a 0.3 s test) are done here once; none of this code is mutated."""
    import accelerate  # noqa: F401
    import datasets  # noqa: F401
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot  # noqa: F401
    import sklearn.manifold  # noqa: F401
    import sklearn.metrics  # noqa: F401
    import transformers

    transformers.LlamaConfig, transformers.LlamaForCausalLM, transformers.PreTrainedTokenizerFast  # noqa: B018
    import lpc.backbones  # noqa: F401
    import lpc.run  # noqa: F401

    compose([])  # hydra's first compose parses the config tree
    # No torch operation here: a fork after torch's thread pool has started hangs in the child.
    gc.freeze()  # each fork's garbage collections skip these objects (pytest collects at exit: ~0.5 s each)


# Small, fast settings for a tiny training run (~5-10 s).
FAST = [
    "trainer.max_steps=40",
    "trainer.eval_every=0",
    "trainer.save_every=0",
    "trainer.log_every=10",
    "data.n_train=320",
    "data.n_eval=64",
]


def compose(overrides: list[str] | None = None):
    """The config `python src/train.py <overrides>` would run, without running it."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides or []))


def run_train(
    overrides: list[str],
    run_dir: Path | str,
    env: dict | None = None,
    check: bool = True,
    timeout: int = 600,
    script: list[str] | None = None,
) -> subprocess.CompletedProcess:
    """Run the real entry point in a subprocess (as a user would), in ``run_dir``; ``script`` replaces
    ``src/train.py`` (e.g. ``tests/crash_after.py N``)."""
    cmd = [sys.executable, *(script or [str(SRC / "train.py")]), *overrides, f"hydra.run.dir={run_dir}"]
    proc = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
        )
    return proc


def read_metrics(run_dir: Path | str) -> dict:
    return json.loads((Path(run_dir) / "metrics.json").read_text())


@pytest.fixture(scope="session")
def tiny_dpo_run(tmp_path_factory) -> Path:
    """A short DPO run of the tiny model on the synthetic data (shared by several tests)."""
    run_dir = tmp_path_factory.mktemp("tiny_dpo")
    run_train(FAST, run_dir)
    return run_dir


@pytest.fixture(scope="session")
def tiny_lpc_run(tmp_path_factory) -> Path:
    """A short LPC-DPO run (discrete, K=8) of the tiny model (shared by several tests)."""
    run_dir = tmp_path_factory.mktemp("tiny_lpc")
    run_train(FAST + ["latent=discrete", "codebook=8"], run_dir)
    return run_dir


# The synthetic benchmark's headline setting (docs/synthetic-benchmark.md): two opposite annotator types whose
# source tag the prompt shows, where the latent has something to offer; 600 steps, seed 0, the latent's defaults.
# Shuffling z cost 9.0, 5.5 and 16.0 points under the native, avx2 and default kernels (NMI 1.0, z / hidden norm
# 0.46-0.81; docs/method.md §7).
ACTING = ["experiment=synthetic_benchmark", "data.conflict=1.0", "data.visibility=always", "latent=discrete"]


@pytest.fixture(scope="session")
def tiny_lpc_acting_run(tmp_path_factory) -> Path:
    """An LPC-DPO run (K=32, the latent's defaults) where z should act; ~50 s."""
    run_dir = tmp_path_factory.mktemp("tiny_lpc_acting")
    # One thread, as make benchmark-synthetic runs it: the thread count changes the reduction order, and
    # over 600 steps that sends an LPC run down a visibly different trajectory.
    run_train(ACTING, run_dir, env={"OMP_NUM_THREADS": "1"})
    return run_dir


def pytest_collection_modifyitems(config, items):
    """Under mutmut: run a mutant's tests fastest first (mutmut stops at the first failure), by the durations
    its stats run recorded (mutants/mutmut-stats.json; mutmut runs pytest in mutants/)."""
    stats = Path("mutmut-stats.json")
    if "MUTANT_UNDER_TEST" not in os.environ or not stats.exists():
        return
    durations = json.loads(stats.read_text()).get("duration_by_test", {})
    items.sort(key=lambda item: durations.get(item.nodeid, 0.0))


# MUTANT_UNDER_TEST is set by mutmut only. pytest imports this file afresh in every session (every fork):
# warm up once, in the fork server.
if "MUTANT_UNDER_TEST" in os.environ and not os.environ.get("LPC_MUTATION_WARM"):
    _warm_up_for_mutation_testing()
    os.environ["LPC_MUTATION_WARM"] = "1"


# ------------------------------------------------ in-process trainers (method and training tests)
def make_trainer(overrides, run_dir, n_train=32, n_eval=16):
    """A PreferenceTrainer built from a composed config by ``lpc.run.build_trainer`` (in-process).

    z is made non-zero from the start unless a test sets these keys: the codes at the hidden state's norm
    (``latent.codebook_init=hidden``) behind an open gate (``latent.gate_init=1``: z is the code itself, exactly),
    uncentred (``latent.center=none``) and read by heads on the raw hidden states (``latent.head_input=raw``).
    These tests check what z does once it is not 0; that z starts at 0 is tests/method/test_policy_starts_at_reference.py's,
    and the centring's arithmetic is tests/method/test_latent_outputs.py's.
    """
    from lpc.run import build_trainer

    def unset(key):
        return not any(o.startswith(f"latent.{key}=") for o in overrides)

    if any(o.startswith("latent=") and o != "latent=none" for o in overrides):
        if "latent=discrete" in overrides and unset("codebook_init"):
            overrides = [*overrides, "latent.codebook_init=hidden"]
        if "latent=discrete" in overrides and unset("center"):
            overrides = [*overrides, "latent.center=none"]
        if unset("head_input"):
            overrides = [*overrides, "latent.head_input=raw"]
        if unset("gate_init"):
            overrides = [*overrides, "latent.gate_init=1.0"]

    # on_the_fly: the reference is a frozen model run next to the policy (precompute would load cached
    # log-probs instead and run no reference pass during training at all).
    cfg = compose(
        [
            f"data.n_train={n_train}",
            f"data.n_eval={n_eval}",
            "trainer.batch_size=4",
            "trainer.eval_every=0",
            "trainer.save_every=0",
            "trainer.reference_logps=on_the_fly",
            *overrides,
        ]
    )
    return build_trainer(cfg, run_dir)[0]


def first_batch(trainer):
    return next(trainer._micro_batches(0))


def evaluate_loaded(model, tokenizer, cfg, run_dir) -> dict:
    """The trainer's evaluation of a loaded policy on its run's eval set (with the run's reference)."""
    from accelerate import Accelerator
    from hydra.utils import instantiate

    from lpc.run import build_datasets, preference_trainer, with_reference_logps

    algo = instantiate(cfg.algo)
    train_ds, eval_ds, _ = build_datasets(cfg, tokenizer)
    accelerator, ref = Accelerator(cpu=True), None
    if algo.needs_reference:
        ref, _ = instantiate(cfg.model)  # the frozen initial model
        if cfg.trainer.get("reference_logps", "on_the_fly") == "precompute":  # as build_trainer does
            _, eval_ds, _ = with_reference_logps(cfg, ref, train_ds, eval_ds, accelerator, tokenizer)
            ref = None
    trainer = preference_trainer(cfg, model, ref, tokenizer, eval_ds, eval_ds, run_dir, accelerator)
    return trainer.evaluate()
