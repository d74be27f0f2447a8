"""lpc-train on the hardware at hand (issue 24): a hub model's command trains the paper's experiment, the entry
point starts the processes the hardware asks for, asks the planner before any model loads, checks the disk at
start and explains a disk that fills while it trains (lpc.preflight)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from collections import namedtuple
from pathlib import Path

import pytest
import torch

from conftest import REPO, SRC, compose, read_metrics, run_train
from lpc.errors import ConfigError, DiskFull, WontFit
from lpc.experiments import plan as planner
from lpc.experiments.plan import load_hardware, plan
from lpc.preflight import disk_full, launcher, preflight, processes_to_start

HUB = ("mistral7b", "llama3_8b", "llama3_8b_instruct")
A100 = load_hardware("a100_80g_x8")
Usage = namedtuple("Usage", "total used free")
LAUNCHER_ENV = ("ACCELERATE_DYNAMO_BACKEND", "TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE", "RANK")


@pytest.fixture
def no_launcher(monkeypatch):
    """This test process as a user's shell starts it: no launcher's variables."""
    for var in LAUNCHER_ENV + ("SLURM_JOB_ID", "SUBMITIT_FOLDER", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        monkeypatch.delenv(var, raising=False)


# --------------------------------------------------------------------------- 1. the card's command
@pytest.mark.parametrize("model", HUB)
@pytest.mark.parametrize("algo", ["dpo", "simpo", "ipo"])
def test_a_hub_model_trains_the_papers_experiment_and_fits_its_node(model, algo):
    cfg = compose([f"model={model}", f"algo={algo}", "codebook=64", "latent=discrete"])
    assert cfg.data.name == "ultrafeedback" and cfg.data._target_ == "lpc.data.hub.UltraFeedback"
    assert cfg.data.path == "openbmb/UltraFeedback"  # raw, as in the paper: y_w the best-rated, y_l another
    assert (cfg.hardware.name, cfg.hardware.gpus_per_node, cfg.distributed.name) == ("a100_80g_x8", 8, "auto")
    assert cfg.trainer.precision == "bf16" and cfg.trainer.global_batch_size == 128
    p = plan(cfg)
    assert p.fits and p.distributed == "zero3" and p.world == 8  # ddp does not fit a 7-8B model on 80 GB
    assert p.notes[0].startswith("distributed=auto: ddp does not fit (peak ")


def test_the_command_line_wins_and_the_small_models_keep_synthetic_data():
    cfg = compose(["model=mistral7b", "data=synthetic", "distributed=ddp", "hardware=h100_80g_x8"])
    assert (cfg.data.name, cfg.distributed.name, cfg.hardware.name) == ("synthetic", "ddp", "h100_80g_x8")
    for model in ("tiny", "smollm2"):
        cfg = compose([f"model={model}"])
        assert (cfg.data.name, cfg.distributed.name, cfg.hardware.name) == ("synthetic", "none", "cpu")


def test_cfg_job_of_the_card_command_shows_ultrafeedback():
    cmd = [sys.executable, str(SRC / "train.py"), "model=mistral7b", "algo=simpo", "codebook=64", "--cfg", "job"]
    out = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120, check=True).stdout
    assert "name: ultrafeedback" in out and "path: openbmb/UltraFeedback" in out and "name: auto" in out


def test_help_says_what_lpc_train_starts_and_refuses():
    out = subprocess.run([sys.executable, str(SRC / "train.py"), "--help"], cwd=REPO, capture_output=True,
                         text=True, timeout=120, check=True).stdout  # fmt: skip
    assert "lpc-train hardware=cpu_1x2 distributed=ddp     # 2 CPU processes, started by lpc-train itself" in out
    assert "trainer.allow_misfit=true runs it" in out and "the paper's LPC-SimPO, 64 codes: UltraFeedback" in out
    assert "distributed: auto, ddp, fsdp, none, zero3" in out and "cpu, cpu_1x2, cpu_2x2" in out


def test_auto_picks_ddp_where_it_fits_and_none_for_one_process():
    assert plan(compose(["hardware=cpu_1x2", "distributed=auto"])).distributed == "ddp"
    assert plan(compose(["hardware=cpu", "distributed=auto"])).distributed == "none"
    p = plan(compose(["model=mistral7b", "distributed=auto"]), {**A100, "gpu_memory_gb": 200})
    assert p.distributed == "ddp" and p.notes[0] == "distributed=auto: ddp fits on 8 processes -> ddp"


# --------------------------------------------------------------------------- the planner's new pieces
def test_disk_sizes_per_parameter():
    tiny = plan(compose(["trainer.max_steps=300", "trainer.save_every=50"]))
    n = tiny.n_trainable
    assert (tiny.checkpoint_bytes, tiny.final_bytes) == (12 * n, 4 * n)  # fp32 weights + AdamW's 2 moments
    # saves at 50, 100, ..., 250 and the last step; 2 kept + the one being written
    assert (tiny.checkpoints_written, tiny.checkpoints_on_disk, tiny.disk_peak) == (6, 3, 3 * 12 * n)
    once = plan(compose(["trainer.save_every=0"]))
    assert (once.checkpoints_written, once.disk_peak) == (1, 12 * n + 4 * n)  # one checkpoint + final/
    # ZeRO-3: DeepSpeed's fp32 master weights and moments (its partitioned bf16 weights are not saved: measured
    # with the tiny model on 2 CPU processes in bf16, 8.71 MB = 12 B/param), the consolidated bf16 weights in final/
    z3 = plan(compose(["model=mistral7b", "distributed=zero3"]))
    n = z3.n_trainable
    assert (z3.checkpoint_bytes, z3.final_bytes) == (12 * n, 2 * n)
    assert round(plan(compose(["model=mistral7b", "distributed=ddp"])).checkpoint_bytes / 1e9) == 87  # README


def test_the_disk_estimate_matches_a_real_run(tiny_dpo_run):
    p = plan(compose(["trainer.max_steps=40", "trainer.save_every=0"]))

    def size(path: Path) -> int:
        return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())

    (checkpoint,) = (tiny_dpo_run / "checkpoints").iterdir()
    assert size(checkpoint) == pytest.approx(p.checkpoint_bytes, rel=0.02)  # + RNG states and small files
    assert size(tiny_dpo_run / "final") == pytest.approx(p.final_bytes, rel=0.02)  # + the tokenizer


def test_suggestions_name_more_gpus_and_smaller_micro_batches():
    p = plan(compose(["model=llama3_8b", "algo=dpo", "distributed=none", "hardware.gpus_per_node=1"]))
    assert not p.fits and p.suggestion == "distributed=zero3 hardware.gpus_per_node=4" and p.suggested.world == 4
    # nothing sharding could still change (512 GPUs): the evaluation's micro-batch is the smallest change
    wide = {**A100, "nodes": planner.MAX_NODES, "gpu_memory_gb": 16}
    q = plan(compose(["model=llama3_8b", "distributed=zero3", "trainer.global_batch_size=1024"]), wide, pairs=10**5)
    assert not q.fits and q.suggestion == "trainer.eval_batch_size=4" and q.suggested.fits


def test_a_smaller_micro_batch_keeps_the_global_batch():
    cfg = compose(["trainer.batch_size=16", "trainer.gradient_accumulation_steps=1"])  # no global_batch_size
    s = planner._setup(cfg, load_hardware("cpu"), None, 0.4, 0.1, [])
    variants = planner._micro_batches(s)
    first_train = next((v, o) for v, o in variants if o[0].startswith("trainer.batch_size"))
    assert first_train[1] == ["trainer.batch_size=8", "trainer.gradient_accumulation_steps=2"]
    assert first_train[0].batch_pairs * first_train[0].accumulation == 16
    assert variants[0][1] == ["trainer.eval_batch_size=32"]  # the evaluation's first: it changes no update


# --------------------------------------------------------------------------- 3. memory, before any model loads
def test_a_run_that_does_not_fit_is_refused_before_loading(tmp_path):
    run_dir = tmp_path / "run"
    args = ["model=llama3_8b", "algo=dpo", "distributed=none", "hardware.gpus_per_node=1"]
    proc = run_train(args, run_dir, check=False, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out[-3000:]
    assert "refused: model=llama3_8b does not fit a100_80g_x8 with distributed=none: peak 125.1 GiB" in out
    assert "what would fit: add distributed=zero3 hardware.gpus_per_node=4, or trainer.allow_misfit=true" in out
    assert "Verdict: does not fit" in out and "Memory per GPU" in out  # the planner's table
    assert "model unavailable" not in out and "data error" not in out  # nothing was looked for or loaded
    assert not (run_dir / ".lock").exists() and not (run_dir / ".hydra").exists()
    # trainer.allow_misfit=true: a warning, then the run goes on (offline: to the data, which is not here)
    proc = run_train([*args, "trainer.allow_misfit=true"], run_dir, check=False, timeout=120)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2 and "refused" not in out and "data error: data.path='openbmb/UltraFeedback'" in out
    assert "(trainer.allow_misfit=true)" in out


def test_refused_in_process_and_cpu_hardware_only_warned(tmp_path, no_launcher, caplog):
    with pytest.raises(WontFit, match=r"what would fit: add distributed=zero3 hardware.gpus_per_node=4"):
        preflight(compose(["model=llama3_8b", "algo=dpo", "distributed=none", "hardware.gpus_per_node=1"]), tmp_path)
    # CPU hardware: "GPU memory" is a rough host-RAM figure and the models are small: a warning, never exit 2
    decision = preflight(compose(["hardware=cpu", "hardware.gpu_memory_gb=0.001"]), tmp_path)
    assert not decision.plan.fits and decision.processes == 1 and decision.distributed == "none"
    assert "(CPU hardware: not refused)" in caplog.text


# --------------------------------------------------------------------------- 2. processes
def test_launchers_are_recognised_from_their_environment(no_launcher, monkeypatch):
    assert launcher() is None
    for var, name in [("WORLD_SIZE", "torchrun"), ("TORCHELASTIC_RUN_ID", "torchrun")]:
        with monkeypatch.context() as m:
            m.setenv(var, "2")
            assert launcher() == name
    with monkeypatch.context() as m:
        m.setenv("ACCELERATE_DYNAMO_BACKEND", "NO")
        assert launcher() == "accelerate launch"
    with monkeypatch.context() as m:
        m.setattr("lpc.preflight.submitit_world", lambda: (4, 2))
        assert launcher() == "SLURM"


def test_processes_to_start(no_launcher, monkeypatch):
    def n(overrides):
        cfg = compose(overrides)
        return processes_to_start(cfg, dict(cfg.hardware))

    assert n(["hardware=cpu_1x2", "distributed=ddp"]) == 2
    assert n(["hardware=cpu_1x2", "distributed=none"]) == 1  # one process asked for
    assert n(["hardware=cpu", "distributed=ddp"]) == 1
    with pytest.raises(ConfigError, match=r"hardware.nodes=2 is not allowed outside a launcher"):
        n(["hardware=cpu_2x2", "distributed=ddp"])
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(ConfigError, match=r"hardware.gpus_per_node=8 is not allowed here: this machine has 0 GPU"):
        n(["hardware=a100_80g_x8", "distributed=zero3"])
    monkeypatch.setenv("WORLD_SIZE", "2")  # started by a launcher: it started the others
    assert n(["hardware=cpu_1x2", "distributed=ddp"]) == 1


@pytest.mark.distributed
def test_train_py_starts_the_processes_of_the_hardware_as_accelerate_launch_does(tmp_path):
    steps = ["trainer.max_steps=6", "trainer.eval_every=0", "trainer.save_every=3", "trainer.log_every=3"]
    steps += ["data.n_train=64", "data.n_eval=32", "trainer.batch_size=4"]
    env = {"LPC_CACHE_DIR": str(tmp_path / "cache")}
    env_no_launcher = {k: v for k, v in os.environ.items() if k not in LAUNCHER_ENV + ("ACCELERATE_USE_CPU",)}
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    cmd = [sys.executable, str(SRC / "train.py"), "hardware=cpu_1x2", "distributed=ddp", *steps]
    proc = subprocess.run([*cmd, f"hydra.run.dir={ours}"], cwd=REPO, env={**env_no_launcher, **env},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    assert "starting 2 processes on this node (hardware=cpu_1x2, distributed=ddp)" in proc.stdout + proc.stderr
    printed = [ln for ln in proc.stdout.splitlines() if ln.startswith("eval/pref_accuracy=")]
    assert len(printed) == 1  # by rank 0 only
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    launch += ["--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    proc = subprocess.run([*launch, str(SRC / "train.py"), "distributed=ddp", *steps, f"hydra.run.dir={theirs}"],
                          cwd=REPO, env={**env_no_launcher, **env, "ACCELERATE_USE_CPU": "true"},
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    a, b = read_metrics(ours), read_metrics(theirs)
    assert a["train/num_processes"] == b["train/num_processes"] == 2
    assert a["train/global_batch_size"] == b["train/global_batch_size"] == 8
    for key in ("eval/loss", "eval/margin", "eval/pref_accuracy", "train/steps"):
        assert a[key] == b[key], key
    assert (ours / "train_log.jsonl").read_text() == (theirs / "train_log.jsonl").read_text()
    from safetensors.torch import load_file

    wa, wb = load_file(str(ours / "final/model.safetensors")), load_file(str(theirs / "final/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


# --------------------------------------------------------------------------- 7. disk
def test_the_disk_is_checked_at_start(tmp_path, no_launcher, monkeypatch, caplog):
    cfg = ["trainer.max_steps=300", "trainer.save_every=50"]
    need = plan(compose(cfg)).disk_peak  # 3 checkpoints of the tiny model at once: ~24 MB
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 10**12 - 10**6, 10**6))
    with pytest.raises(WontFit, match=r"not enough disk for the run: 0.024 GB needed \(checkpoints of 0.0079 GB") as e:
        preflight(compose(cfg), tmp_path / "run")
    assert f"0.001 GB free in {tmp_path / 'run'}" in str(e.value) and "trainer.allow_misfit=true" in str(e.value)
    assert need == pytest.approx(0.0236e9, rel=0.01)
    decision = preflight(compose([*cfg, "trainer.allow_misfit=true"]), tmp_path / "run")
    assert decision.disk.short and "starting anyway" in caplog.text
    # a resumed run's directory holds some of it already
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**12, 0, int(need) - 10**6))
    with pytest.raises(WontFit):
        preflight(compose(cfg), tmp_path / "run")
    (tmp_path / "run" / "checkpoints" / "step-50").mkdir(parents=True)
    (tmp_path / "run" / "checkpoints" / "step-50" / "model.safetensors").write_bytes(b"\0" * 2 * 10**6)
    assert preflight(compose(cfg), tmp_path / "run").disk.needed == pytest.approx(need - 2 * 10**6)


def test_a_full_disk_during_a_checkpoint_stops_with_the_numbers(tmp_path, no_launcher, monkeypatch):
    from accelerate import Accelerator

    from lpc.run import run

    original, calls = Accelerator.save_state, []

    def save_state(self, output_dir=None, **kwargs):
        calls.append(output_dir)
        if len(calls) == 2:  # the step-4 checkpoint: half written, then the disk is full
            Path(output_dir).mkdir(parents=True, exist_ok=True)
            (Path(output_dir) / "model.safetensors").write_bytes(b"\0" * 1000)
            raise OSError(errno.ENOSPC, "No space left on device", str(Path(output_dir) / "optimizer.bin"))
        return original(self, output_dir, **kwargs)

    monkeypatch.setattr(Accelerator, "save_state", save_state)
    cfg = compose(["trainer.max_steps=6", "trainer.save_every=2", "trainer.eval_every=0", "data.n_train=64"])
    run_dir = tmp_path / "run"
    with pytest.raises(DiskFull) as e:
        run(cfg, run_dir)
    message = str(e.value)
    assert message.startswith(f"no space left on device: {run_dir / 'checkpoints'}, 0.0")
    assert " GB needed (checkpoints of 0.0079 GB" in message
    assert "the earlier checkpoints are kept (step-2): free space and rerun the same command to resume" in message
    assert message.endswith("(OSError: [Errno 28] No space left on device: '" + str(calls[1]) + "/optimizer.bin')")
    from lpc.training import rundir

    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-2"]  # the partial write is gone
    assert rundir.checkpoint_problem(run_dir / "checkpoints" / "step-2") is None
    assert not (run_dir / "metrics.json").exists()


def test_torch_writers_full_disk_is_recognised_by_the_free_space(tmp_path, monkeypatch):
    # torch.save on a full disk: RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos ...")
    err = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")
    cfg = compose([])
    (tmp_path / "checkpoints" / ".tmp-step-4").mkdir(parents=True)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 10**12))
    assert disk_full(err, cfg, tmp_path) is None  # room left: some other failure, left as it is
    assert (tmp_path / "checkpoints" / ".tmp-step-4").exists()
    monkeypatch.setattr(shutil, "disk_usage", lambda path: Usage(10**9, 10**9, 4096))
    full = disk_full(err, cfg, tmp_path)
    assert str(full).startswith(f"no space left on device: {tmp_path / 'checkpoints'}, ")
    assert not (tmp_path / "checkpoints" / ".tmp-step-4").exists()
    assert "no checkpoint was written yet" in str(full)
    assert disk_full(ValueError("bad value"), cfg, tmp_path) is None
    safetensors = RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)")
    assert disk_full(safetensors, cfg, tmp_path) is not None


def _tmpfs(path: Path, size: str) -> None:
    path.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {proc.stderr.decode().strip()}")


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("mount") is None, reason="mounts a small tmpfs: needs root")
def test_a_real_full_disk_refuses_stops_cleanly_and_resumes(tmp_path):
    """A 12 MB tmpfs holds one 7.9 MB checkpoint of the tiny model, not two: refused at start; started anyway, it
    stops at the second checkpoint with the numbers and keeps the first; with room again it resumes and ends where
    an uninterrupted run ends."""
    steps = ["trainer.max_steps=6", "trainer.save_every=2", "trainer.keep_checkpoints=1", "trainer.log_every=2"]
    steps += ["trainer.eval_every=0", "data.n_train=64", "data.n_eval=32", "trainer.batch_size=4"]
    env = {"LPC_CACHE_DIR": str(tmp_path / "cache")}
    reference = tmp_path / "uninterrupted"
    run_train(steps, reference, env=env)
    disk = tmp_path / "disk"
    _tmpfs(disk, "12m")
    try:
        run_dir = disk / "run"
        proc = run_train(steps, run_dir, env=env, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 2 and "refused: not enough disk for the run: 0.016 GB needed" in out, out[-3000:]
        assert "0.013 GB free in" in out
        proc = run_train([*steps, "trainer.allow_misfit=true"], run_dir, env=env, check=False)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 1, out[-3000:]
        assert f"no space left on device: {run_dir / 'checkpoints'}, 0.0078 GB needed" in out
        assert "the earlier checkpoints are kept (step-2)" in out and "Traceback" not in out
        assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-2"]
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        proc = run_train(steps, run_dir, env=env)
        assert "resumed from" in proc.stdout + proc.stderr
        assert (run_dir / "train_log.jsonl").read_text() == (reference / "train_log.jsonl").read_text()
        ours, theirs = read_metrics(run_dir), read_metrics(reference)
        for key in ("eval/loss", "eval/margin", "eval/pref_accuracy", "train/steps"):
            assert ours[key] == theirs[key], key
        assert json.loads((run_dir / "checkpoints" / "step-6" / "trainer_state.json").read_text())["step"] == 6
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
