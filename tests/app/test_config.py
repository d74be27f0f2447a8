"""The config tree composes for every option, and every bad input fails fast with a clear error."""

import json
import os
import re
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
    # the card's command trains LPC-SimPO with 64 codes: codebook=K alone selects the discrete latent
    assert cfg.latent.name == "discrete" and cfg.latent._target_ == "lpc.latent.DiscreteLatent"
    assert cfg.latent.codebook_size == 64
    assert cfg.model.name_or_path == "mistralai/Mistral-7B-v0.1"
    # the SimPO authors' Mistral-7B recipe (conf/recipe/model/mistral7b_simpo.yaml), not the generic SimPO default
    assert cfg.algo.name == "simpo" and cfg.algo.beta == 2.0 and cfg.algo.gamma == 1.6 and cfg.trainer.lr == 3e-7
    assert cfg.flip == 0.0
    assert cfg.trainer.precision == "bf16"  # a hub model selects the GPU trainer recipe
    assert {"trainer", "model", "algo", "latent", "data", "logger"} <= set(cfg)


def test_codebook_composes_the_latent_from_python():
    """codebook is a config group: its options select the latent inside Hydra's composition, so compose() from
    Python gives what the command line gives (no rewriting of the overrides before Hydra sees them)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = hydra_compose("config", overrides=["codebook=64"])
    assert cfg.latent.name == "discrete" and cfg.latent._target_ == "lpc.latent.DiscreteLatent"
    assert cfg.latent.codebook_size == 64
    validate(cfg)
    for k in ("2", "4", "8", "16", "32", "64", "128", "256"):  # the paper's 8-256 and two CPU sizes
        assert compose([f"codebook={k}"]).latent.codebook_size == int(k)
    assert compose(["codebook=none"]).latent.name == "none"  # the baseline
    assert (compose(["codebook=8"]).codebook, compose(["codebook=none"]).codebook) == (8, "none")  # the record
    assert compose(["latent=discrete"]).latent.codebook_size == 32  # no codebook: the latent's own default
    assert compose(["latent=discrete", "latent.codebook_size=12"]).latent.codebook_size == 12  # any other K
    assert compose([]).latent.name == "none"
    seed = compose(["codebook=8", "seed=3"]).seed  # only a group's option turns an int into a name
    assert seed == 3 and isinstance(seed, int)
    # an experiment's latent gives way to the codebook a sweep's grid names
    assert compose(["experiment=codebook", "codebook=none"]).latent.name == "none"
    assert compose(["experiment=codebook", "codebook=8"]).latent.codebook_size == 8


CODEBOOK_CONFLICTS = {
    ("codebook=64", "latent=none"): "codebook=64 (latent.codebook_size=64) is not allowed with latent=none",
    ("codebook=8", "latent=continuous"): "codebook=8 (latent.codebook_size=8) is not allowed with latent=continuous",
    ("codebook=none", "latent=continuous"): "codebook=none (latent.codebook_size=None) is not allowed with latent=c",
    ("codebook=none", "latent=discrete"): "latent.codebook_size=None is not allowed: an integer >= 1",
}


@pytest.mark.parametrize("overrides", list(CODEBOOK_CONFLICTS), ids=" ".join)
def test_a_codebook_the_latent_ignores_is_a_config_error(overrides):
    with pytest.raises(ConfigError, match=re.escape(CODEBOOK_CONFLICTS[overrides])) as err:
        validate(compose(list(overrides)))
    assert "codebook=" in str(err.value)  # names the group, and what is allowed
    if "latent=discrete" not in overrides:
        assert "allowed: codebook=K alone (it selects latent=discrete)" in str(err.value)


def test_a_codebook_the_latent_ignores_exits_2_before_any_model_loads(tmp_path):
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    proc = run_train(["codebook=64", "latent=none"], run_dir, env={"LPC_CACHE_DIR": str(cache)}, check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    out = proc.stdout + proc.stderr  # Hydra logs the error to stdout
    assert "config error: codebook=64 (latent.codebook_size=64) is not allowed with latent=none" in out, out
    assert not cache.exists() and not (run_dir / "metrics.json").exists()


def test_a_size_without_an_option_names_the_options_and_the_key_for_any_k(tmp_path):
    proc = run_train(["codebook=12"], tmp_path / "run", check=False, timeout=60)
    assert proc.returncode == 1 and "Could not find 'codebook/12'" in proc.stderr, proc.stderr[-2000:]
    assert "Available options in 'codebook'" in proc.stderr
    help_text = run_train(["--help"], tmp_path / "help", timeout=60).stdout
    assert "any other K: latent=discrete latent.codebook_size=K" in help_text


@pytest.mark.slow  # two tiny training runs in one Hydra multirun: ~30 s
def test_one_multirun_trains_the_baseline_and_lpc(tmp_path):
    sweep_dir = tmp_path / "multirun"
    proc = run_train(
        ["-m", "codebook=none,8", "trainer.max_steps=2", "trainer.save_every=0", "trainer.eval_every=0",
         "data.n_train=32", "data.n_eval=16", f"hydra.sweep.dir={sweep_dir}"],
        tmp_path / "unused",
    )  # fmt: skip
    printed = [line for line in proc.stdout.splitlines() if line.startswith("eval/pref_accuracy=")]
    assert len(printed) == 2, proc.stdout[-2000:]  # one per job
    latents = {}
    for job in ("0", "1"):
        cfg = OmegaConf.load(sweep_dir / job / ".hydra" / "config.yaml")
        latents[job] = (cfg.latent.name, cfg.latent.get("codebook_size"))
        assert json.loads((sweep_dir / job / "metrics.json").read_text())["status"] == "completed"
    assert latents == {"0": ("none", None), "1": ("discrete", 8)}


def test_the_card_s_models_algorithms_data_and_loggers_are_options():
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
    (["codebook=0"], "codebook/0"),
    (["latent=discrete", "latent.codebook_size=0"], "latent.codebook_size=0"),
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
    # non-numeric values for numeric keys, and choices that used to be checked only after loading
    (["latent=discrete", "latent.kl_weight=abc"], "latent.kl_weight='abc' is not allowed: a number >= 0"),
    (["trainer.max_steps=abc"], "trainer.max_steps='abc' is not allowed: an integer"),
    (["trainer.lr=fast"], "trainer.lr='fast' is not allowed: a number > 0"),
    (["trainer.lr_scheduler=foo"], "trainer.lr_scheduler='foo' is not allowed: one of ('linear', 'cosine'"),
    (["data.visibility=foo"], "data.visibility='foo' is not allowed: one of ('always', 'never', 'sometimes')"),
    (["data=ultrafeedback", f"data.path={FIXTURES / 'ultrafeedback.jsonl'}", "data.rating=foo"],
     "data.rating='foo' is not allowed: one of ('overall_score'"),
    (["data.n_train=0"], "data.n_train=0 is not allowed: an integer >= 1"),
    (["data=jsonl", f"data.train_file={FIXTURES}"], "(a directory)"),
    ([f"model.cache_dir={FIXTURES / 'pairs.jsonl'}"], "model.cache_dir="),
    # one file as both splits of the binarized set would evaluate on the training rows
    (["data=ultrafeedback_binarized", f"data.path={FIXTURES / 'ultrafeedback_binarized' / 'train_prefs.jsonl'}"],
     "is not allowed: a directory or hub name with both the train split (train_prefs) and the held-out eval split"),
]  # fmt: skip


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


def bad_jsonl(tmp_path, name: str, lines: list) -> str:
    path = tmp_path / name
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return str(path)


GOOD = [{"prompt": f"Name thing {i}.", "chosen": f"good {i}", "rejected": f"bad {i}"} for i in range(40)]
# (name, {file name: rows}, extra overrides, text the error must contain); files land in tmp_path
DATA_BAD = [
    ("empty file", {"t.jsonl": []}, [], "t.jsonl is empty: no preference pairs"),
    ("bad JSON line, numbered from 1", {"t.jsonl": [GOOD[0], '{"prompt": "x", bad', GOOD[1]]}, [],
     "t.jsonl, line 2: Expecting property name enclosed in double quotes"),
    ("every row bad", {"t.jsonl": [{"prompt": "p", "chosen": "same", "rejected": "same"}] * 3}, [],
     "the train split has no pairs left once the bad rows were skipped"),
    ("eval left empty by the bad rows", {"t.jsonl": GOOD, "e.jsonl": [{"prompt": "p", "chosen": "", "rejected": "x"}]},
     ["data.eval_file=e.jsonl"], "the eval split has no pairs left once the bad rows were skipped"),
    ("eval file = train file", {"t.jsonl": GOOD}, ["data.eval_file=t.jsonl"],
     "all 40 eval pairs are also training pairs: the evaluation would measure the training set"),
    ("eval pairs that are training pairs (swapped), on_bad_row=error",
     {"t.jsonl": GOOD, "e.jsonl": [GOOD[5] | {"chosen": "bad 5", "rejected": "good 5"}, {**GOOD[0], "prompt": "new"}]},
     ["data.eval_file=e.jsonl", "data.on_bad_row=error"], "eval split has bad rows (1 also_in_train: row 1)"),
    ("numbers are not text, with row numbers", {"t.jsonl": GOOD[:3] + [{"prompt": "p", "chosen": 7, "rejected": "x"}]},
     ["data.on_bad_row=error"], "train split has bad rows (1 not_text_chosen: row 4)"),
    ("too few rows to split off an eval set", {"t.jsonl": GOOD[:1]}, [], "cannot split data.eval_size=0.05 eval pairs off 1 rows"),
]  # fmt: skip


@pytest.mark.parametrize("files,extra,message", [c[1:] for c in DATA_BAD], ids=[c[0] for c in DATA_BAD])
def test_bad_data_fails_before_any_model_loads(files, extra, message, tmp_path):
    for name, rows in files.items():
        bad_jsonl(tmp_path, name, rows)
    extra = [e.replace("=e.jsonl", f"={tmp_path / 'e.jsonl'}").replace("=t.jsonl", f"={tmp_path / 't.jsonl'}")
             for e in extra]  # fmt: skip
    run_dir, cache = tmp_path / "run", tmp_path / "cache"
    start = time.time()
    overrides = ["data=jsonl", f"data.train_file={tmp_path / 't.jsonl'}", *extra]
    proc = run_train(overrides, run_dir, env={"LPC_CACHE_DIR": str(cache)}, check=False, timeout=90)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert "data error: " in out and message in out, out[-2000:]
    assert "Traceback" not in out
    assert not cache.exists(), "a model or tokenizer was loaded before the data error"
    assert not (run_dir / ".hydra").exists() and not (run_dir / "metrics.json").exists()
    assert time.time() - start < 60


def test_pairs_identical_after_truncation_are_bad_rows(tmp_path):
    # the responses differ only past trainer.max_length: nothing is left to prefer once truncated
    long = " ".join(["word"] * 80)
    rows = GOOD + [{"prompt": "Name a long thing.", "chosen": long + " yes", "rejected": long + " no"}]
    train = bad_jsonl(tmp_path, "t.jsonl", rows)
    proc = run_train(["data=jsonl", f"data.train_file={train}", "data.eval_size=4", "data.on_bad_row=error"],
                     tmp_path / "run", check=False, timeout=120)  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-2000:]
    assert "data error: train split has bad rows (1 identical_after_truncation: row 41)" in out, out[-2000:]
    assert not (tmp_path / "run" / "metrics.json").exists()


# A hub model in one CPU process on the synthetic data (it selects the paper's 8-GPU node, UltraFeedback and the
# sharding that fits); its checkpoints would not fit this disk: allowed, the model is what these tests look for.
ONE_CPU_PROCESS = ["trainer=cpu", "hardware=cpu", "data=synthetic", "trainer.allow_misfit=true"]


def test_hub_unreachable_fails_at_once_without_the_offline_switches(tmp_path):
    # No HF_HUB_OFFLINE and a hub that cannot be reached (a closed local port stands in for no network):
    # one probe, then a clear error, instead of a minute of retries.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env |= {"HF_ENDPOINT": "http://127.0.0.1:9", "LPC_CACHE_DIR": str(tmp_path / "cache")}
    for overrides, message in [
        (["model=mistral7b", *ONE_CPU_PROCESS],
         "model unavailable: model.name_or_path='mistralai/Mistral-7B-v0.1' is not in the local Hugging Face cache "
         "and the hub is unreachable: http://127.0.0.1:9 cannot be reached"),
        (["data=ultrafeedback"],
         "data error: data.path='openbmb/UltraFeedback' is neither a local file or directory nor reachable on the hub"),
    ]:  # fmt: skip
        start = time.time()
        cmd = [sys.executable, str(SRC / "train.py"), *overrides, f"hydra.run.dir={tmp_path / 'run'}"]
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and message in out, out[-2000:]
        assert time.time() - start < 30
        assert not (tmp_path / "cache").exists()


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


# (model, algo) -> (beta or tau, gamma, lr, length_normalize): conf/recipe/, conf/trainer/gpu.yaml and conf/algo/,
# each value with its source in a comment
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


def test_recipes_say_each_value_once():
    """One recipe per algorithm for the paper's trainer (recipe/gpu_<algo>.yaml, keyed by trainer and algo), and a
    per-model file only where a model's values differ (recipe/model/: SimPO's); no two recipes are the same."""
    bodies = {}
    for path in sorted((CONF / "recipe").rglob("*.yaml")):
        body = "\n".join(ln for ln in path.read_text().splitlines() if ln.strip() and not ln.lstrip().startswith("#"))
        assert body not in bodies, f"{path.name} repeats {bodies.get(body)}"
        bodies[body] = path.name
    assert {p.stem for p in (CONF / "recipe" / "model").glob("*.yaml")} == {
        f"{m}_simpo" for m in ("mistral7b", "llama3_8b", "llama3_8b_instruct", "mini_llama", "mini_mistral")
    }
    # the IPO recipe goes with the paper's trainer, whichever model runs on it
    assert compose(["algo=ipo", "trainer=gpu"]).algo.length_normalize is False
    assert compose(["model=mistral7b", "algo=ipo", "trainer=cpu"]).algo.length_normalize is True
    rehearsal = compose(["experiment=rehearsal", "model=mini_mistral", "algo=simpo"])  # the miniature: its model's
    assert (rehearsal.algo.beta, rehearsal.algo.gamma) == (2.0, 1.6)


def test_readme_names_every_config_group_and_the_codebook_options(tmp_path, capsys):
    """make docs-check's config-tree check: true today, and false on a README without the codebook row's 256."""
    import importlib.util
    import shutil

    spec = importlib.util.spec_from_file_location("docs_check", REPO / "scripts" / "docs_check.py")
    docs_check = importlib.util.module_from_spec(spec)
    sys.modules["docs_check"] = docs_check  # its dataclass looks its module up there
    spec.loader.exec_module(docs_check)
    assert docs_check.main(["--only", "config-tree"]) == 0
    shutil.copy(REPO / "README.md", tmp_path / "README.md")
    readme = tmp_path / "README.md"
    readme.write_text(readme.read_text().replace("`128`, `256`", "`128`", 1))
    capsys.readouterr()
    assert docs_check.main(["--root", str(tmp_path), "--only", "config-tree"]) == 1
    assert "FAIL README.md: codebook options: claimed 128,16,2,32,4,64,8,none" in capsys.readouterr().out


def test_validate_raises_config_error_in_process():
    with pytest.raises(ConfigError, match=r"flip=2 is not allowed: a number in \[0, 1\]"):
        validate(compose(["flip=2"]))
    with pytest.raises(ConfigError, match="latent.codebook_size=-3 is not allowed: an integer >= 1"):
        validate(compose(["latent=discrete", "latent.codebook_size=-3"]))


def test_missing_hub_model_offline_fails_at_once(tmp_path):
    run_dir = tmp_path / "run"
    start = time.time()
    proc = run_train(
        ["model=mistral7b", *ONE_CPU_PROCESS], run_dir, env={"HF_HUB_OFFLINE": "1"}, check=False, timeout=120
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2
    assert (
        "model unavailable: model.name_or_path='mistralai/Mistral-7B-v0.1' is not in the local Hugging Face cache "
        "and HF_HUB_OFFLINE=1 is set" in out
    ), out[-2000:]
    assert not (run_dir / "metrics.json").exists() and not (run_dir / "final").exists()
    assert time.time() - start < 30
