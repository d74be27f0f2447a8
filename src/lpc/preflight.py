"""What ``lpc-train`` decides and checks before any model loads, and the one failure it explains while it runs.

* **Processes and sharding.** ``distributed=auto`` (the hub models' choice) becomes the sharding lpc-plan says
  fits the processes that will run (:func:`lpc.experiments.plan.choose_distributed`). A config that asks for
  N > 1 processes on one node (``hardware.gpus_per_node`` with ``distributed`` other than ``none``) in a process
  that no launcher started (torchrun, ``accelerate launch``, a multi-task SLURM job: :func:`launcher`) starts
  the N processes itself with accelerate's launcher, which runs torch's elastic launcher (:func:`launch`): the
  same processes and environment as ``accelerate launch --config_file <distributed's file> --num_processes N``.
* **Memory.** lpc-plan's verdict for those processes; a GPU run that does not fit is refused (exit 2) with the
  planner's table and the smallest change that fits. CPU hardware (``hardware.device: cpu``) gets a warning
  instead: its "GPU memory" is a rough host-RAM figure and the CPU models are small.
* **Disk.** The run directory's free space against the checkpoints and final/ the run will hold at once (the
  planner's sizes, less what a resumed run's directory holds already); refused (exit 2) where it is short.
  ``trainer.allow_misfit=true`` turns both refusals into warnings.
* **A full disk while training** (:func:`disk_full`): a write that fails for lack of space (ENOSPC, or torch's
  zip writer's "unexpected pos" on a disk with no room left) stops the run with the directory and the space it
  needs, not a traceback; its partial write is removed and the earlier checkpoints are kept.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from lpc.errors import ConfigError, DiskFull, PlanError, Unplannable, WontFit
from lpc.training import rundir
from lpc.training.distributed import LAUNCHED_BY_ACCELERATE, accelerate_config_path, submitit_world

log = logging.getLogger("lpc.preflight")

# Environment variables a launcher sets in the processes it starts.
TORCHRUN_VARS = ("TORCHELASTIC_RUN_ID", "LOCAL_RANK", "WORLD_SIZE")
MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
# Seconds the launcher gives its processes to stop after SIGTERM (they checkpoint first) before SIGKILL;
# torch's default is 30, shorter than writing a 7B checkpoint. TORCH_ELASTIC_SHUTDOWN_TIMEOUT wins.
SHUTDOWN_TIMEOUT_S = 1800
# torch.save's zip writer reports a full disk without errno: "[enforce fail at inline_container.cc] . unexpected
# pos 576 vs 534", "PytorchStreamWriter failed writing file ...: file write failed" (with "basic_ios::clear:
# iostream error" as its context).
TORCH_WRITE_FAILURES = ("unexpected pos", "file write failed", "iostream error")


# --------------------------------------------------------------------------- launchers
def launcher() -> str | None:
    """The launcher that started this process (it starts the others), or None: torchrun / ``accelerate launch``
    (their environment variables), a SLURM job of more than one task (submitit's job environment: a one-task
    job is a node lpc-train may start processes on), mpirun."""
    if os.environ.get(LAUNCHED_BY_ACCELERATE):
        return "accelerate launch"
    if any(os.environ.get(v) for v in TORCHRUN_VARS):
        return "torchrun"
    if submitit_world() is not None:
        return "SLURM"
    if any(int(os.environ.get(v) or 1) > 1 for v in MPI_VARS):
        return "mpirun"
    return None


def launched_world() -> tuple[int, int] | None:
    """``(processes per node, nodes)`` of the launcher that started this process, None outside one."""
    if os.environ.get("WORLD_SIZE"):
        world = int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_WORLD_SIZE") or world)
        return local, max(world // local, 1)
    tasks = submitit_world()
    if tasks is not None:
        n_tasks, n_nodes = tasks
        return max(n_tasks // n_nodes, 1), n_nodes
    return None


def is_main_process() -> bool:
    return os.environ.get("RANK", "0") == "0" and os.environ.get("SLURM_PROCID", "0") == "0"


def hardware_of(cfg: DictConfig) -> dict | None:
    """``cfg.hardware`` as the run will have it: under a launcher, its processes per node and nodes."""
    if "hardware" not in cfg:
        return None
    hardware = OmegaConf.to_container(cfg.hardware, resolve=True)
    world = launched_world()
    if world is not None:
        hardware["gpus_per_node"], hardware["nodes"] = world
    return hardware


def on_cpu(hardware: dict) -> bool:
    return str(hardware.get("device", "cuda")).lower() == "cpu"


# --------------------------------------------------------------------------- the decision
@dataclass
class DiskNeed:
    """The run directory's disk: what the run will hold at once against what is free there."""

    directory: Path
    checkpoint: float  # bytes of one checkpoint (the planner's)
    final: float  # bytes of final/
    peak: float  # the most the run directory holds at once (checkpoints + final/)
    present: float  # bytes its checkpoints/ and final/ hold already (a resumed run)
    free: float
    keep: int
    written: int

    @property
    def needed(self) -> float:
        return max(self.peak - self.present, 0.0)

    @property
    def short(self) -> bool:
        return self.needed > self.free

    def describe(self) -> str:
        """``N GB needed (what makes it up; F GB free in DIR)``."""
        held = f", less {gb(self.present)} its checkpoints/ and final/ hold already" if self.present else ""
        return (
            f"{gb(self.needed)} needed (checkpoints of {gb(self.checkpoint)}: trainer.keep_checkpoints="
            f"{self.keep} kept and one more while it is written, {self.written} written; final/ of "
            f"{gb(self.final)}; at most {gb(self.peak)} at once{held}; {gb(self.free)} free in {self.directory})"
        )


@dataclass
class Decision:
    plan: object | None  # lpc.experiments.plan.Plan, None where the model cannot be planned (no model.arch)
    distributed: str
    processes: int  # to start from this process (1: train in this process)
    disk: DiskNeed | None


def gb(x: float) -> str:
    return f"{x / 1e9:,.1f} GB" if x >= 1e9 else f"{x / 1e9:.2g} GB"


def plan_of(cfg: DictConfig, hardware: dict | None):
    """lpc-plan's estimate of ``cfg`` on ``hardware``; None for a model without ``model.arch`` (warned).
    A config the planner refuses (a batch that does not divide over the processes, ...) is a ConfigError."""
    from lpc.experiments.plan import plan

    if hardware is None:
        return None
    from hydra.core.hydra_config import HydraConfig

    overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
    try:
        return plan(cfg, hardware, overrides=overrides)
    except Unplannable as err:
        if is_main_process():
            log.warning("no memory or disk check: %s", err)
        return None
    except PlanError as err:
        raise ConfigError(f"{err} (lpc-plan, for the processes hardware.* gives)") from None


def use_distributed(cfg: DictConfig, name: str) -> None:
    """Replace the ``distributed`` node with conf/distributed/NAME.yaml (what ``distributed=NAME`` composes)."""
    from lpc.conf import CONF_DIR

    node = OmegaConf.load(Path(CONF_DIR) / "distributed" / f"{name}.yaml")
    with open_dict(cfg):
        cfg.distributed = node


def resolve_distributed(cfg: DictConfig, p=None) -> str:
    """``distributed=auto`` becomes the planner's choice for the processes the hardware (or the launcher) gives;
    where the model cannot be planned, ddp for more than one process. Every rank decides the same."""
    if cfg.distributed.name != "auto":
        return cfg.distributed.name
    hardware = hardware_of(cfg) or {"gpus_per_node": 1, "nodes": 1}
    p = p if p is not None else plan_of(cfg, hardware)
    if p is not None:
        chosen = p.distributed
    else:
        chosen = "none" if hardware["gpus_per_node"] * hardware["nodes"] == 1 else "ddp"
    use_distributed(cfg, chosen)
    if is_main_process():
        log.info("%s", p.notes[0] if p is not None else f"distributed=auto: no plan (no model.arch) -> {chosen}")
    return chosen


def misfit_message(p, refused: bool = True) -> str:
    from lpc.experiments.plan import format_plan

    fix = f"add {p.suggestion}" if p.suggestion else "see what does not shard in the table"
    anyway = ", or trainer.allow_misfit=true to train anyway" if refused else ""
    if p.alternative:  # lpc-plan's fit on the GPUs the job has, an adapter=lora included
        anyway += f"; on the GPUs the job has: add {p.alternative}"
    return (
        f"model={p.model} does not fit {p.hardware} with distributed={p.distributed}: peak {p.peak / 2**30:.1f} GiB "
        f"of {p.budget / 2**30:.1f} GiB usable per GPU (lpc-plan's estimate); what would fit: {fix}{anyway}\n"
        f"{format_plan(p)}"
    )


def disk_need(cfg: DictConfig, p, run_dir: str | Path) -> DiskNeed:
    """The run directory's need (the planner's checkpoint and final/ sizes) against its free space."""
    run_dir = Path(run_dir)
    present = 0
    for sub in (rundir.CHECKPOINTS, rundir.FINAL):
        if (run_dir / sub).is_dir():
            present += sum(f.stat().st_size for f in (run_dir / sub).rglob("*") if f.is_file())
    existing = run_dir
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return DiskNeed(
        directory=run_dir,
        checkpoint=p.checkpoint_bytes,
        final=p.final_bytes,
        peak=p.disk_peak,
        present=present,
        free=shutil.disk_usage(existing).free,
        keep=p.keep_checkpoints,
        written=p.checkpoints_written,
    )


def processes_to_start(cfg: DictConfig, hardware: dict | None) -> int:
    """How many processes this process starts: N = gpus_per_node for a multi-process config on one node under
    no launcher, else 1 (it trains itself). A multi-node config outside a launcher, or more GPU processes than
    the node has GPUs, is a ConfigError."""
    if hardware is None or cfg.distributed.name == "none" or launcher() is not None:
        return 1
    per_node, nodes = int(hardware["gpus_per_node"]), int(hardware["nodes"])
    if per_node * nodes == 1:
        return 1
    if nodes > 1:
        raise ConfigError(
            f"hardware.nodes={nodes} is not allowed outside a launcher: lpc-train starts processes on this node "
            f"only; run a multi-node job with hydra/launcher=slurm (docs/slurm.md) or `accelerate launch "
            f"--num_machines {nodes}` on every node, or set hardware.nodes=1"
        )
    if not on_cpu(hardware):
        import torch

        found = torch.cuda.device_count()
        if found < per_node:
            raise ConfigError(
                f"hardware.gpus_per_node={per_node} is not allowed here: this machine has {found} GPU(s) "
                f"(torch.cuda.device_count()) for distributed={cfg.distributed.name}; set hardware.gpus_per_node="
                f"{found} (the global batch is kept), hardware=cpu (one CPU process) or hardware=cpu_1x2, "
                f"or distributed=none (one process)"
            )
    return per_node


def preflight(cfg: DictConfig, run_dir: str | Path) -> Decision:
    """Everything lpc-train settles before any model loads: the sharding (``distributed=auto``), the memory
    and disk verdicts (:class:`WontFit` where they fail, unless ``trainer.allow_misfit``) and the processes to
    start. ``cfg.distributed`` is the chosen node afterwards."""
    hardware = hardware_of(cfg)
    p = plan_of(cfg, hardware)
    distributed = resolve_distributed(cfg, p)
    allow = bool(cfg.trainer.get("allow_misfit", False))
    main = is_main_process()
    if p is not None and not p.fits:
        if on_cpu(hardware) or allow:
            if main:
                why = "CPU hardware: not refused" if on_cpu(hardware) else "trainer.allow_misfit=true"
                log.warning("%s\n(%s)", misfit_message(p, refused=False), why)
        else:
            raise WontFit(misfit_message(p))
    disk = None
    if p is not None:
        disk = disk_need(cfg, p, run_dir)
        if disk.short:
            message = f"not enough disk for the run: {disk.describe()}"
            if not allow:
                raise WontFit(
                    f"{message}; free space there, choose another hydra.run.dir, lower trainer.keep_checkpoints, "
                    "or trainer.allow_misfit=true to start anyway"
                )
            if main:
                log.warning("%s (trainer.allow_misfit=true: starting anyway)", message)
        elif main:
            log.info("disk: %s", disk.describe())
    return Decision(plan=p, distributed=distributed, processes=processes_to_start(cfg, hardware), disk=disk)


# --------------------------------------------------------------------------- starting the processes
def _quote(value: str) -> str:
    """A value as one Hydra override token (quoted where the grammar would split or read it)."""
    if all(c.isalnum() or c in "_-./:+@" for c in value):
        return value
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def child_overrides(cfg: DictConfig, run_dir: str | Path) -> list[str]:
    """The command line of each started process: this job's overrides, the chosen ``distributed`` in place of
    ``auto``, and this run directory (Hydra's ``${now:...}`` must not give every process its own). In a
    multirun the W&B group and name stay the sweep's."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hc = HydraConfig.get()
    task = [o for o in hc.overrides.task if o.lstrip("+~").split("=", 1)[0] != "distributed"]
    task.append(f"distributed={cfg.distributed.name}")
    if hc.mode == RunMode.MULTIRUN and cfg.logger.get("name") == "wandb":
        if not cfg.logger.get("group"):
            task.append(f"logger.group={_quote(rundir.sweep_group())}")
        if not cfg.logger.get("run_name"):
            task.append(f"logger.run_name={_quote(rundir.run_name(Path(run_dir)))}")
    return [*task, f"hydra.run.dir={_quote(str(run_dir))}"]


def launch(cfg: DictConfig, processes: int, overrides: list[str]) -> int:
    """Start ``processes`` copies of lpc-train (``python -m lpc.train <overrides>``) on this node with
    accelerate's launcher, as ``accelerate launch --config_file <distributed's accelerate file> --num_processes N
    --num_machines 1 --mixed_precision <trainer.precision> --dynamo_backend no --main_process_port 0`` would,
    and wait for them: their exit code (the first failed rank's), 0 when all finished. On CPU hardware the
    processes join over gloo: ACCELERATE_USE_CPU=true for ddp; for zero3 CUDA_VISIBLE_DEVICES is empty instead
    (DeepSpeed's CPU accelerator, which ACCELERATE_USE_CPU would switch off)."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    config_file = accelerate_config_path(cfg.distributed.get("accelerate_config"))
    if config_file is None:
        raise ConfigError(
            f"distributed.accelerate_config=None is not allowed with distributed={cfg.distributed.name} on "
            f"{processes} processes: an accelerate config file (src/lpc/training/accelerate/*.yaml)"
        )
    argv = ["--config_file", str(config_file), "--num_processes", str(processes), "--num_machines", "1"]
    argv += ["--mixed_precision", str(cfg.trainer.precision), "--dynamo_backend", "no", "--main_process_port", "0"]
    argv += ["--module", "lpc.train", *overrides]
    env: dict[str, str | None] = {"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": os.environ.get(
        "TORCH_ELASTIC_SHUTDOWN_TIMEOUT", str(SHUTDOWN_TIMEOUT_S))}  # fmt: skip
    hardware = hardware_of(cfg) or {}
    if on_cpu(hardware):
        if cfg.distributed.name == "zero3":
            env.update(ACCELERATE_USE_CPU=None, CUDA_VISIBLE_DEVICES="")
        else:
            env["ACCELERATE_USE_CPU"] = "true"
    log.info(
        "starting %d processes on this node (hardware=%s, distributed=%s): accelerate launch %s",
        processes,
        hardware.get("name"),
        cfg.distributed.name,
        " ".join(argv[: argv.index("--module")]),
    )
    saved = {k: os.environ.get(k) for k in env}
    try:
        _set_environ(env)
        launch_command(launch_command_parser().parse_args(argv))
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        code = failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode  # -N: killed by signal N
        log.error("process %d of %d exited with code %d (its messages are above)", rank, processes, code)
        return code
    except SystemExit as stop:  # the launcher stopped on SIGTERM / Ctrl-C after its processes did
        return stop.code if isinstance(stop.code, int) else 1
    finally:
        _set_environ(saved)
    return 0


def _set_environ(values: dict[str, str | None]) -> None:
    """Set each variable; None unsets it (as it was before, when ``values`` is what was saved)."""
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# --------------------------------------------------------------------------- a full disk while training
def _chain(err: BaseException):
    seen, stack = set(), [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        yield e
        stack += [e.__cause__, e.__context__]


def _free(path: Path) -> float:
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def disk_full(err: BaseException, cfg: DictConfig, run_dir: str | Path) -> DiskFull | None:
    """A :class:`DiskFull` naming the directory and the space the run needs when ``err`` is a write that failed
    for lack of space, else None. Its partial write (``checkpoints/.tmp-step-N``, ``.final.tmp``) is removed
    first; complete checkpoints are left alone (the trainer deletes an old one only after a new one is whole)."""
    run_dir = Path(run_dir)
    chain = list(_chain(err))
    enospc = any(isinstance(e, OSError) and e.errno == errno.ENOSPC for e in chain)
    enospc |= any("No space left on device" in str(e) or "os error 28" in str(e) for e in chain)
    torch_write = any(s in str(e) for e in chain for s in TORCH_WRITE_FAILURES)
    if not (enospc or torch_write):
        return None
    p = None
    try:
        p = plan_of(cfg, hardware_of(cfg))
    except ConfigError:
        pass
    if not enospc:
        # torch's writer drops errno: a full disk is one that cannot hold another checkpoint now
        enospc = _free(run_dir) < (p.checkpoint_bytes if p is not None else 64 * 2**20)
    if not enospc:
        return None
    partial = sorted((run_dir / rundir.CHECKPOINTS).glob(".tmp-*")) + sorted(run_dir.glob(f".{rundir.FINAL}.tmp"))
    where = run_dir
    if partial:
        where = run_dir / (rundir.CHECKPOINTS if partial[0].parent.name == rundir.CHECKPOINTS else rundir.FINAL)
    for path in partial:
        shutil.rmtree(path, ignore_errors=True)
    kept = [path.name for _, path in rundir.checkpoints(run_dir)]
    if p is not None:
        numbers = disk_need(cfg, p, run_dir).describe()
    else:
        numbers = f"size unknown (no model.arch to plan from); {gb(_free(run_dir))} free"
    resume = (
        f"the earlier checkpoints are kept ({', '.join(kept)}): free space and rerun the same command to resume"
        if kept
        else "no checkpoint was written yet: free space and rerun the same command"
    )
    failed = next((e for e in chain if not isinstance(e, DiskFull)), err)
    first_line = (str(failed).strip().splitlines() or [""])[0][:200]
    return DiskFull(f"no space left on device: {where}, {numbers}; {resume} ({type(failed).__name__}: {first_line})")
