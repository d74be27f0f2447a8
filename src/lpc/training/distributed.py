"""Multi-GPU / multi-node set-up: the ``distributed`` config group -> an ``Accelerator``.

Two ways to start N processes, both ending in the same ``Accelerator()``:

* ``accelerate launch --config_file src/lpc/training/accelerate/<name>.yaml src/train.py distributed=<name> ...``:
  accelerate's launcher (torchrun inside) starts the processes and sets the environment itself.
* SLURM through hydra-submitit-launcher with ``tasks_per_node`` = GPUs per node (``nodes`` > 1 for
  multi-node): SLURM starts one task per GPU; each task calls :func:`setup_process_env`, which
  exports submitit's torch distributed environment (MASTER_ADDR/PORT, RANK, WORLD_SIZE, LOCAL_RANK)
  and the variables ``accelerate launch`` would derive from the same config file (ACCELERATE_USE_FSDP,
  FSDP_*, ACCELERATE_USE_DEEPSPEED, ACCELERATE_DEEPSPEED_*). The translation is accelerate's own
  (its launch-command parser and ``prepare_multi_gpu_env`` / ``prepare_deepspeed_cmd_env``), so a
  config file means the same thing under both launchers.
"""

from __future__ import annotations

import atexit
import logging
import os
from pathlib import Path

from omegaconf import open_dict

from lpc.errors import ConfigError, require

# torch, accelerate, submitit and deepspeed (an optional dependency) are imported inside the functions that use
# them: lpc-plan and lpc-train's preflight read this module's config helpers before (or without) loading torch
log = logging.getLogger(__name__)
# The accelerate config files ship inside the package (an installed package finds them too).
ACCELERATE_CONFIGS = Path(__file__).resolve().parent / "accelerate"
# Set by `accelerate launch`: when present, the launcher already exported the config file's variables.
LAUNCHED_BY_ACCELERATE = "ACCELERATE_DYNAMO_BACKEND"
EXPORTED_PREFIXES = ("ACCELERATE_", "FSDP_")


def accelerate_config_path(name: str | None) -> Path | None:
    """``ddp`` -> src/lpc/training/accelerate/ddp.yaml; an absolute or relative path is used as is; none -> None."""
    if not name:
        return None
    path = Path(name)
    if path.suffix not in (".yaml", ".yml", ".json"):
        path = ACCELERATE_CONFIGS / f"{name}.yaml"
    if not path.exists():
        raise FileNotFoundError(f"distributed.accelerate_config={name!r}: no such file {path}")
    return path


def launch_args(
    config_file: str | Path,
    num_processes: int | None = None,
    num_machines: int | None = None,
    machine_rank: int | None = None,
):
    """The ``accelerate launch`` arguments this config file gives, validated by accelerate itself
    (unknown keys or bad values raise here)."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    argv = ["--config_file", str(config_file)]
    for flag, value in (
        ("--num_processes", num_processes),
        ("--num_machines", num_machines),
        ("--machine_rank", machine_rank),
    ):
        if value is not None:
            argv += [flag, str(value)]
    args, defaults, mp_from_config = _validate_launch_command(launch_command_parser().parse_args(argv + ["train.py"]))
    if args.use_deepspeed:  # what `accelerate launch` adds before calling its DeepSpeed launcher
        fields = list(defaults.deepspeed_config.keys()) if defaults else []
        args.deepspeed_fields_from_accelerate_config = ",".join(
            fields + (["mixed_precision"] if mp_from_config else [])
        )
    return args


def accelerate_env(config_file: str | Path, **launch_kwargs) -> dict[str, str]:
    """The ACCELERATE_* / FSDP_* variables ``accelerate launch --config_file`` would export."""
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_args(config_file, **launch_kwargs)
    env = prepare_deepspeed_cmd_env(args)[1] if args.use_deepspeed else prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(EXPORTED_PREFIXES)}


def submitit_world() -> tuple[int, int] | None:
    """(number of tasks, number of nodes) when running as a multi-task submitit job, else None."""
    if "SUBMITIT_FOLDER" not in os.environ and "SLURM_JOB_ID" not in os.environ:
        return None
    try:
        import submitit

        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            return env.num_tasks, env.num_nodes
    except RuntimeError:  # not inside a submitit job (e.g. an interactive salloc shell)
        return None
    return None


def setup_process_env(distributed_cfg) -> None:
    """Before the Accelerator exists: make this process one rank of the job, if it is one.

    Under ``accelerate launch``/torchrun nothing is needed. Under a multi-task submitit job, export
    the torch distributed environment and the accelerate config's variables."""
    world = submitit_world()
    if world is None:
        return
    import submitit

    dist_env = submitit.helpers.TorchDistributedEnvironment().export()
    log.info(
        "SLURM rank %d/%d (local %d) on %s, master %s:%s",
        dist_env.rank,
        dist_env.world_size,
        dist_env.local_rank,
        os.uname().nodename,
        dist_env.master_addr,
        dist_env.master_port,
    )
    config_file = accelerate_config_path(distributed_cfg.get("accelerate_config"))
    if config_file is not None and LAUNCHED_BY_ACCELERATE not in os.environ:
        n_tasks, n_nodes = world
        env = accelerate_env(
            config_file,
            num_processes=n_tasks,
            num_machines=n_nodes,
            machine_rank=dist_env.rank // dist_env.local_world_size,
        )
        os.environ.update(env)


def process_count() -> int:
    """Processes this run will have, known before any of them joins a process group: torchrun's and
    ``accelerate launch``'s WORLD_SIZE, or the tasks of a multi-task SLURM job; 1 otherwise."""
    if os.environ.get("WORLD_SIZE"):
        return int(os.environ["WORLD_SIZE"])
    world = submitit_world()
    return world[0] if world else 1


def gradient_accumulation(trainer_cfg, world: int) -> int:
    """The gradient accumulation steps of ``trainer_cfg`` on ``world`` processes. With
    ``trainer.global_batch_size`` set it is derived: global = batch_size x accumulation x processes, so the
    same recipe trains the same steps (and lr and g schedules) on 8 GPUs or on 4."""
    t = trainer_cfg
    acc, global_batch = t.get("gradient_accumulation_steps"), t.get("global_batch_size")
    if global_batch is None:
        require(
            isinstance(acc, int) and not isinstance(acc, bool) and acc >= 1,
            "trainer.gradient_accumulation_steps",
            acc,
            "an integer >= 1 (or null with trainer.global_batch_size set)",
            ConfigError,
        )
        return acc
    require(
        isinstance(global_batch, int) and not isinstance(global_batch, bool) and global_batch >= 1,
        "trainer.global_batch_size",
        global_batch,
        "an integer >= 1 (pairs per optimizer step), or null",
        ConfigError,
    )
    per_step = t.batch_size * world
    if global_batch % per_step:
        fits = [b for b in range(1, t.batch_size + 1) if global_batch % (b * world) == 0]
        raise ConfigError(
            f"trainer.global_batch_size={global_batch} is not allowed with trainer.batch_size={t.batch_size} "
            f"on {world} process(es): it must be a multiple of batch_size x processes = {per_step} "
            f"(batch sizes that divide it on {world} processes: {fits or 'none'}; or change the process count)"
        )
    derived = global_batch // per_step
    require(
        acc is None or acc == derived,
        "trainer.gradient_accumulation_steps",
        acc,
        f"null (derived from trainer.global_batch_size={global_batch}: {derived} on {world} process(es)), "
        "or set trainer.global_batch_size=null",
        ConfigError,
    )
    return derived


def resolve_gradient_accumulation(cfg, world: int | None = None) -> int:
    """Write the derived accumulation into ``cfg.trainer`` (what the Accelerator and the trainer read)."""
    derived = gradient_accumulation(cfg.trainer, process_count() if world is None else world)
    with open_dict(cfg.trainer):
        cfg.trainer.gradient_accumulation_steps = derived
    return derived


def destroy_gloo_process_group() -> None:
    """Why: a gloo process group left to the interpreter's teardown can abort a finished rank ("terminate called
    without an active exception", exit code -6): gloo's worker threads still hold async work, which ZeRO-3's
    all-gathers leave behind. Destroyed while Python is alive (atexit), the rank exits cleanly."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "gloo":
        dist.destroy_process_group()


def build_accelerator(trainer_cfg, run_dir, log_with: str | None = None):
    """The run's Accelerator. ``trainer.precision`` wins over the config file's mixed_precision;
    gradient accumulation goes through accelerate (DeepSpeed scales and steps it itself)."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedType, InitProcessGroupKwargs

    handlers = []
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true":
        from deepspeed.accelerator import get_accelerator

        if get_accelerator().device_name() == "cpu":
            # Why: without GPUs accelerate chooses no process-group backend for DeepSpeed and then counts 1
            # process while DeepSpeed joined all of them (a wrong train_batch_size; every rank training as if
            # alone). DeepSpeed's CPU accelerator names its backend (gloo, or ccl with oneCCL): pass it on.
            handlers.append(InitProcessGroupKwargs(backend=get_accelerator().communication_backend_name()))
    acc = Accelerator(
        mixed_precision=trainer_cfg.precision,
        log_with=log_with,
        project_dir=str(run_dir),
        gradient_accumulation_steps=trainer_cfg.gradient_accumulation_steps,
        kwargs_handlers=handlers,
    )
    if acc.distributed_type == DistributedType.DEEPSPEED:
        ds_config = acc.state.deepspeed_plugin.deepspeed_config
        # We prepare no DataLoader (the trainer slices batches itself), so DeepSpeed's "auto"
        # micro-batch size cannot be inferred: it is trainer.batch_size.
        ds_config["train_micro_batch_size_per_gpu"] = trainer_cfg.batch_size
        # DeepSpeed clips inside its engine step and ignores the trainer's clip_grad_norm_ argument; accelerate
        # fills its "auto" with 1.0. trainer.max_grad_norm is the one setting, as under DDP/FSDP.
        ds_config["gradient_clipping"] = float(trainer_cfg.max_grad_norm)
    if acc.num_processes > 1:
        atexit.unregister(destroy_gloo_process_group)  # once, however many Accelerators a process builds
        atexit.register(destroy_gloo_process_group)
    return acc
