"""Sharded training on CPU: DeepSpeed ZeRO-3 on 2 processes (gloo, DeepSpeed's CPU accelerator) trains LPC as
DDP does, exports full weights, and resumes from its own checkpoints.

The ZeRO-3 runs are launched as on GPUs: ``accelerate launch --config_file src/lpc/training/accelerate/zero3.yaml``
with ``distributed=zero3`` (only ``--num_processes 2 --mixed_precision no`` differ). FSDP has no CPU test: accelerate
turns FSDP on only for GPU-like devices (a CPU job is ``MULTI_CPU``, i.e. DDP). What has never run is listed in
docs/distributed.md ("What has run and what has not").

Run as a script (``accelerate launch ... tests/training/test_sharded.py <train.py arguments>``) this file is the training
entry point (``lpc.run.run``) plus probes that rank 0 writes to ``<run dir>/probe/``: the latent module's initial
weights and, after step 1, what the optimizer and the ZeRO-3 partitioning hold."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
SRC = REPO / "src"
ZERO3 = SRC / "lpc/training/accelerate/zero3.yaml"
# LPC-DPO, 3 optimizer steps of 16 pairs (micro-batch 4 x accumulation 2 x 2 processes), a checkpoint at step 2.
# The latent's learning rate as a multiple of the LM's (lr_multiplier, with latent.lr=null) makes its parameter groups
# distinguishable from the LM's; codes at the hidden state's norm make z act from step 1; step 2's
# gradient norm (1.6) exceeds max_grad_norm, step 1's (1.4) does not, so DeepSpeed must clip at it as DDP does.
STEPS = [
    "model=tiny",
    "latent=discrete",
    "latent.lr=null",
    "latent.lr_multiplier=10",
    "latent.codebook_init=hidden",
    "data.n_train=64",
    "data.n_eval=16",
    "trainer.max_steps=3",
    "trainer.batch_size=4",
    "trainer.gradient_accumulation_steps=2",
    "trainer.precision=no",
    "trainer.max_grad_norm=1.5",
    "trainer.log_every=1",
    "trainer.eval_every=0",
    "trainer.save_every=2",
]
PROBE = "probe"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(kind: str, overrides: list[str], run_dir: Path, env: dict, script: list[str] | None = None, check=True):
    """2 processes of ``script`` (default src/train.py): ``kind`` = ddp (gloo, MULTI_CPU) or zero3 (zero3.yaml)."""
    if kind == "ddp":
        launcher = ["--multi_gpu", "--num_machines", "1"]
        env = {**env, "ACCELERATE_USE_CPU": "true"}
    else:
        launcher = ["--config_file", str(ZERO3)]
        # no GPU even where there is one (DeepSpeed then picks its CPU accelerator and gloo); and not
        # ACCELERATE_USE_CPU, which makes accelerate ignore DeepSpeed
        env = {**env, "CUDA_VISIBLE_DEVICES": ""}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        *launcher,
        "--num_processes",
        "2",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
        *(script or [str(SRC / "train.py")]),
        *overrides,
        f"distributed={kind}",
        f"hydra.run.dir={run_dir}",
    ]
    full_env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    # ~15 s each; the first ZeRO-3 launch on a machine also compiles DeepSpeed's shared-memory op (25 s
    # idle, cached in ~/.cache/torch_extensions)
    proc = subprocess.run(cmd, cwd=REPO, env={**full_env, **env}, capture_output=True, text=True, timeout=900)
    if check:
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
    return proc


def metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def train_log(run_dir: Path) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "train_log.jsonl").read_text().splitlines()]


def weights(run_dir: Path, name: str) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "final" / name))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """The same LPC job under DDP (src/train.py) and under ZeRO-3 (this file as the entry point, with probes,
    and W&B offline)."""
    tmp = tmp_path_factory.mktemp("sharded")
    env = {"LPC_CACHE_DIR": str(tmp / "cache")}
    out = {"ddp": tmp / "ddp", "zero3": tmp / "zero3"}
    launch("ddp", STEPS, out["ddp"], env)
    # with the W&B tracker (offline): the trainer finishing it must leave the process group to the sharded export
    wandb = ["logger=wandb", "logger.mode=offline"]
    launch("zero3", STEPS + wandb, out["zero3"], {**env, "WANDB_MODE": "offline"}, script=[__file__])
    out["env"] = env
    return out


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_two_processes_equal_ddp(runs):
    ddp, z3 = runs["ddp"], runs["zero3"]
    m_ddp, m_z3 = metrics(ddp), metrics(z3)
    probe = json.loads((z3 / PROBE / "step1.json").read_text())
    # it ran as ZeRO-3 on 2 ranks, every parameter partitioned (each rank holds about half of each one)
    assert probe["distributed_type"] == "DEEPSPEED" and probe["zero_stage"] == 3 and probe["num_processes"] == 2
    assert probe["all_params_partitioned"] and 0.5 <= probe["local_fraction"] < 0.52
    assert probe["gradient_clipping"] == 1.5  # trainer.max_grad_norm (accelerate would fill in 1.0)
    assert m_ddp["train/num_processes"] == m_z3["train/num_processes"] == 2
    assert m_z3["status"] == "completed" and any((z3 / "wandb").glob("offline-run-*"))  # the tracker ran and closed
    assert m_ddp["train/steps"] == m_z3["train/steps"] == 3
    # the per-step training metrics (losses, grad norms, latent KL) and the final evaluation
    log_ddp, log_z3 = train_log(ddp), train_log(z3)
    assert [r["step"] for r in log_ddp] == [r["step"] for r in log_z3] == [1, 2, 3, 3]
    for a, b in zip(log_ddp[:3], log_z3[:3]):
        for key in ("loss", "grad_norm", "rewards/margins", "latent/kl", "logps/chosen"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), (a["step"], key)
    # ... the LM-integrity probe's too, whose codes ZeRO-3 gathers for it
    for key in ("eval/loss", "eval/margin", "eval/pref_accuracy", "eval/rewards/chosen", "eval/lm/text_nll/prior"):
        assert m_z3[key] == pytest.approx(m_ddp[key], rel=1e-4, abs=1e-6), key
    assert abs(log_z3[1]["loss"] - log_z3[0]["loss"]) > 1e-4  # the steps changed the model: not two frozen inits


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_exports_the_gathered_weights_and_trains_the_latent(runs):
    from lpc.training.checkpoint import load_checkpoint

    ddp, z3 = runs["ddp"], runs["zero3"]
    probe = json.loads((z3 / PROBE / "step1.json").read_text())
    # the latent module is the optimizer's second and third parameter groups (its codes; its heads), at lr x
    # latent.lr_multiplier, and its ZeRO-3 partitions over both ranks hold all of its elements
    assert probe["groups"] == 3 and probe["latent_group_is_the_latent"] and probe["lm_group_is_the_rest"]
    assert probe["group_lr_ratio"] == pytest.approx(10.0)
    fp32 = probe["fp32_numel"]
    for numel, held in ((probe["lm_numel"], fp32[0]), (probe["latent_numel"], fp32[1] + fp32[2])):
        assert numel > 0 and numel <= held < numel + 128, (numel, held)  # (+ alignment padding)
    # final/ holds full (gathered) weights, equal to DDP's
    for name in ("model.safetensors", "latent.safetensors"):
        w_ddp, w_z3 = weights(ddp, name), weights(z3, name)
        assert w_ddp.keys() == w_z3.keys() and len(w_z3) > 0, name
        for k in w_ddp:
            # float32 weights and running statistics; the head inputs' batch counters are integers
            assert w_z3[k].shape == w_ddp[k].shape and w_z3[k].dtype == w_ddp[k].dtype, k
            assert w_z3[k].dtype == (torch.int64 if k.endswith(".batches") else torch.float32), k
            torch.testing.assert_close(w_z3[k], w_ddp[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")
    # the latent was updated: every tensor of it moved from its initial value
    from safetensors.torch import load_file

    init = load_file(str(z3 / PROBE / "latent_init.safetensors"))
    final = weights(z3, "latent.safetensors")
    assert init.keys() == final.keys()
    for k in init:
        assert (final[k] - init[k]).abs().max() > 1e-6, k
    # and the checkpoint loads as a model equal to DDP's
    m_z3, _, _ = load_checkpoint(z3)
    m_ddp, _, _ = load_checkpoint(ddp)
    s_z3, s_ddp = m_z3.state_dict(), m_ddp.state_dict()
    assert s_z3.keys() == s_ddp.keys()
    for k in s_ddp:
        torch.testing.assert_close(s_z3[k], s_ddp[k], rtol=1e-4, atol=1e-5, msg=k)


@pytest.mark.slow
@pytest.mark.distributed
def test_zero3_resumes_from_its_checkpoint_with_an_on_the_fly_reference(runs, tmp_path):
    """Killed after the step-2 checkpoint (DeepSpeed's partitioned model and optimizer states), then resumed:
    the result equals the uninterrupted run. The reference model here is built on every rank (on_the_fly)
    next to the ZeRO-3 policy instead of precomputed."""
    run_dir = tmp_path / "resumed"
    overrides = STEPS + ["trainer.reference_logps=on_the_fly"]
    crashed = launch(
        "zero3", overrides, run_dir, runs["env"], script=[str(REPO / "tests/crash_after.py"), "2"], check=False
    )
    assert crashed.returncode != 0 and not (run_dir / "metrics.json").exists()
    ckpt = run_dir / "checkpoints" / "step-2"
    assert (ckpt / "trainer_state.json").exists() and (ckpt / "pytorch_model").is_dir()  # DeepSpeed's own layout
    launch("zero3", overrides, run_dir, runs["env"])
    m, ref = metrics(run_dir), metrics(runs["zero3"])
    assert m["train/resumed"] is True and m["train/steps_this_session"] == 1
    for key in ("eval/loss", "eval/margin", "eval/pref_accuracy"):
        assert m[key] == pytest.approx(ref[key], rel=1e-4, abs=1e-6), key
    step3 = [r for r in train_log(run_dir) if r["step"] == 3 and "loss" in r][0]
    ref3 = [r for r in train_log(runs["zero3"]) if r["step"] == 3 and "loss" in r][0]
    assert step3["loss"] == pytest.approx(ref3["loss"], rel=1e-4) and step3["grad_norm"] == pytest.approx(
        ref3["grad_norm"], rel=1e-4
    )
    for name in ("model.safetensors", "latent.safetensors"):
        w, w_ref = weights(run_dir, name), weights(runs["zero3"], name)
        for k in w_ref:
            torch.testing.assert_close(w[k], w_ref[k], rtol=1e-4, atol=1e-5, msg=f"{name} {k}")


# ---------------------------------------------------------------------------------------------- script mode
def _probes():
    """The trainer factory wrapped to save the latent's initial weights; a step hook that records the optimizer
    groups and the ZeRO-3 partitioning after step 1. Rank 0 writes both."""
    import lpc.run

    factory = lpc.run.preference_trainer

    def preference_trainer(cfg, model, *args, **kwargs):
        if model.latent is not None:
            init = {k: v.detach().clone().contiguous() for k, v in model.latent.state_dict().items()}
        trainer = factory(cfg, model, *args, **kwargs)
        if model.latent is not None and trainer.accelerator.is_main_process:
            from safetensors.torch import save_file

            (trainer.run_dir / PROBE).mkdir(parents=True, exist_ok=True)
            save_file(init, str(trainer.run_dir / PROBE / "latent_init.safetensors"))
        return trainer

    lpc.run.preference_trainer = preference_trainer

    def after_step_1(trainer):
        if trainer.step != 1:
            return
        acc = trainer.accelerator
        model = acc.unwrap_model(trainer.model)
        groups = trainer.optimizer.param_groups
        zero = trainer.optimizer.optimizer  # DeepSpeed's ZeRO-3 optimizer: its (sub)groups of model parameters,
        latent_ids = {id(p) for p in model.latent.parameters()}  # mapped to the torch optimizer's param groups
        group_params: dict[int, set] = {}
        fp32 = torch.zeros(len(groups))  # the fp32 master partitions this rank updates, per param group
        for sub, params in enumerate(zero.fp16_groups):
            gid = zero.sub_group_to_group_id[sub]
            group_params.setdefault(gid, set()).update(id(p) for p in params)
            fp32[gid] += zero.fp32_partitioned_groups_flat[sub].numel()
        params = list(model.parameters())
        held = sum(p.ds_tensor.numel() for p in params if hasattr(p, "ds_tensor"))
        full = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
        plugin = acc.state.deepspeed_plugin
        probe = {
            "gradient_clipping": trainer.model.gradient_clipping(),  # the DeepSpeed engine's
            "distributed_type": acc.distributed_type.name,
            "zero_stage": plugin.zero_stage if plugin else None,
            "num_processes": acc.num_processes,
            "all_params_partitioned": all(hasattr(p, "ds_tensor") and p.ds_tensor.numel() < p.ds_numel for p in params),
            "local_fraction": held / full,
            "groups": len(groups),
            "latent_group_is_the_latent": group_params.get(1, set()) | group_params.get(2, set()) == latent_ids,
            "lm_group_is_the_rest": group_params.get(0) == {id(p) for p in params} - latent_ids,
            "fp32_numel": acc.reduce(fp32, "sum").tolist(),  # summed over the ranks' partitions
            "group_lr_ratio": groups[1]["lr"] / groups[0]["lr"] if len(groups) > 1 else None,
            "latent_numel": sum(p.ds_numel for p in model.latent.parameters()),
            "lm_numel": sum(p.ds_numel for p in params if id(p) not in latent_ids),
        }
        if acc.is_main_process:
            (trainer.run_dir / PROBE).mkdir(parents=True, exist_ok=True)
            (trainer.run_dir / PROBE / "step1.json").write_text(json.dumps(probe, indent=1))

    return after_step_1


if __name__ == "__main__":
    sys.path.insert(0, str(SRC))
    import hydra
    from hydra.core.hydra_config import HydraConfig

    from lpc.conf import CONF_DIR

    @hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
    def main(cfg):
        from lpc.config import validate
        from lpc.run import run

        validate(cfg)
        hook = _probes()
        run(cfg, HydraConfig.get().runtime.output_dir, step_hooks=[hook])

    main()
