"""Build everything a config names and train it; ``src/train.py`` calls :func:`run`."""

from __future__ import annotations

import copy
import logging
import uuid
from pathlib import Path

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

import lpc.adapters as adapters
from lpc.config import fingerprint
from lpc.policy import PreferenceModel
from lpc.progress import phase, quiet_library_bars
from lpc.training import rundir
from lpc.training.checkpoint import export_checkpoint

log = logging.getLogger(__name__)
logging.getLogger("accelerate").setLevel(logging.WARNING)  # its per-checkpoint INFO lines drown the progress bar


def build_datasets(cfg: DictConfig, tokenizer, pairs=None):
    """The ``data`` node's object (a ``lpc.data.PreferenceData``) runs its pipeline: ``(train, eval, stats)``;
    ``pairs`` (from :func:`prepare_pairs`) skips its text stages."""
    data = instantiate(cfg.data)
    text, text_stats = pairs if pairs is not None else data.pairs()  # one data object for both stages
    train, eval_ds, stats = data.tokenize(text, tokenizer, cfg.trainer.max_length, cfg.trainer.max_prompt_length)
    return train, eval_ds, {**text_stats, **stats}


def prepare_pairs(cfg: DictConfig):
    """The data's text stages (load, bad rows, eval held out from train, flips): ``(pairs, stats)``. They
    need no tokenizer, so a run calls this before any model loads and bad data stops it at once."""
    return instantiate(cfg.data).pairs()


def wandb_tracker(cfg: DictConfig, run_dir: Path) -> dict | None:
    lg = cfg.logger
    if lg.name != "wandb":
        return None
    id_file = run_dir / "wandb_run_id.txt"
    if not id_file.exists():  # kept across resumes so a resumed run continues its own W&B run
        id_file.write_text(uuid.uuid4().hex[:12])
    init = {
        "id": id_file.read_text().strip(),
        "resume": "allow",
        "dir": str(run_dir),
        "mode": lg.mode,
        "name": lg.get("run_name") or rundir.run_name(run_dir),
        "group": lg.get("group") or rundir.sweep_group(),
        "tags": list(lg.get("tags") or []),
        "entity": lg.get("entity"),
    }
    return {
        "project": lg.project,
        "config": OmegaConf.to_container(cfg, resolve=True),
        "init_kwargs": {k: v for k, v in init.items() if v is not None},
    }


def with_reference_logps(cfg, ref_lm, train_ds, eval_ds, accelerator, tokenizer):
    """``(train, eval, info)`` with each pair's reference log-probs from ``ref_lm`` (the initial policy),
    read from the cache keyed on its weights and the tokens, or computed once and cached."""
    from lpc.backbones import default_cache_dir
    from lpc.data import PairCollator
    from lpc.training.reference import attach_reference_logps, key_parts

    parts = key_parts(cfg, ref_lm, train_ds, eval_ds, accelerator.device.type)
    splits, info = attach_reference_logps(
        ref_lm,
        {"train": train_ds, "eval": eval_ds},
        parts,
        accelerator,
        PairCollator(tokenizer.pad_token_id),
        cfg.trainer.eval_batch_size,
        cfg.model.get("cache_dir") or default_cache_dir(),
    )
    return splits["train"], splits["eval"], info


def preference_trainer(cfg, model, ref_model, tokenizer, train_ds, eval_ds, run_dir, accelerator, tracker=None):
    """A ``PreferenceTrainer`` for built parts, with the algorithm, optimizer and fingerprint ``cfg`` names."""
    from lpc.training.trainer import PreferenceTrainer

    return PreferenceTrainer(
        model=model,
        ref_model=ref_model,
        tokenizer=tokenizer,
        algo=instantiate(cfg.algo),
        train_dataset=train_ds,
        eval_dataset=eval_ds,
        trainer_cfg=cfg.trainer,
        run_dir=run_dir,
        optimizer_factory=instantiate(cfg.trainer.optimizer),
        tracker=tracker,
        fingerprint=fingerprint(cfg),
        accelerator=accelerator,
    )


def master_weights(cfg: DictConfig) -> dict:
    """Loader overrides that keep fp32 master weights under mixed precision without sharding.

    accelerate's bf16/fp16 autocast computes in 16 bits but leaves the parameters, their gradients and
    AdamW's moments in the dtype they were loaded in. A model loaded in 16 bits (the hub models' model.dtype)
    would then train in pure bf16, where updates of about lr x weight fall below bf16's resolution and are
    lost. DeepSpeed ZeRO-3 and FSDP keep fp32 master copies themselves; DDP and one process do not.
    An adapter run (``adapter=lora|qlora``) keeps the base as loaded (it does not train; the adapter is float32)
    and QLoRA's loader gets its 4-bit ``quantization_config`` (lpc.adapters.load_kwargs)."""
    from lpc.adapters import adapter_name, load_kwargs

    if adapter_name(cfg) != "none":  # an adapter run: the base is frozen (no master weights), QLoRA's in 4 bits
        return load_kwargs(cfg)
    mixed = cfg.trainer.precision in ("bf16", "fp16")
    if mixed and cfg.distributed.name in ("none", "ddp") and cfg.model.get("dtype") in ("bfloat16", "float16"):
        log.info(
            "model.dtype=%s loaded as float32: fp32 master weights under trainer.precision=%s with distributed=%s",
            cfg.model.dtype,
            cfg.trainer.precision,
            cfg.distributed.name,
        )
        return {"dtype": "float32"}
    return {}


def load_model(cfg: DictConfig):
    """``(lm, tokenizer)`` from the ``model`` node; a model that cannot be had here raises ``ModelUnavailable``
    itself, not Hydra's wrapper around it."""
    from hydra.errors import InstantiationException

    from lpc.errors import ModelUnavailable

    try:
        return instantiate(cfg.model, **master_weights(cfg))
    except InstantiationException as err:
        if isinstance(err.__cause__, ModelUnavailable):
            raise err.__cause__ from None
        raise


def build_trainer(cfg: DictConfig, run_dir: str | Path, accelerator=None, tracker: dict | None = None, pairs=None):
    """Every object ``cfg`` names, wired into a ``PreferenceTrainer``: ``(trainer, tokenizer, data_stats)``.
    The one place a trainer is built from a config (training, the benchmark script and the tests).
    ``pairs``: the data's text stages, already run (:func:`prepare_pairs`)."""
    from accelerate.utils import set_seed

    from lpc.training.distributed import build_accelerator, resolve_gradient_accumulation

    if accelerator is None:
        resolve_gradient_accumulation(cfg)
        accelerator = build_accelerator(cfg.trainer, run_dir)
    set_seed(cfg.seed)
    algo = instantiate(cfg.algo)
    lm, tokenizer = load_model(cfg)
    precompute = algo.needs_reference and cfg.trainer.get("reference_logps", "on_the_fly") == "precompute"
    adapter = adapters.adapter_name(cfg) != "none"
    # The reference is the frozen initial model, never conditioned on z; with precomputed
    # reference log-probs no second model is built at all, nor with an adapter (the base with the adapter off).
    ref = copy.deepcopy(lm) if algo.needs_reference and not precompute and not adapter else None
    latent = None
    if cfg.latent.get("_target_"):
        latent = instantiate(cfg.latent, hidden_size=lm.config.hidden_size)
    train_ds, eval_ds, data_stats = build_datasets(cfg, tokenizer, pairs)
    log.info("data: %d train / %d eval pairs", len(train_ds), len(eval_ds))
    if precompute:
        lm.to(accelerator.device)
        train_ds, eval_ds, info = with_reference_logps(cfg, lm, train_ds, eval_ds, accelerator, tokenizer)
        data_stats.update(info)
    if adapter:  # after the precompute: the reference cache is the base model's, shared with full fine-tuning
        adapters.add_adapter(lm, cfg.adapter)
    model = PreferenceModel(lm, latent)
    if adapter:
        in_lm, _ = adapters.parameter_counts(lm)
        trainable, total = adapters.parameter_counts(model)
        log.info("adapter=%s: %s of %s parameters train (%.2f%%): the adapter's %s and the latent's %s",
                 cfg.adapter.name, f"{trainable:,}", f"{total:,}", 100 * trainable / total, f"{in_lm:,}",
                 f"{trainable - in_lm:,}")  # fmt: skip
    trainer = preference_trainer(cfg, model, ref, tokenizer, train_ds, eval_ds, run_dir, accelerator, tracker)
    return trainer, tokenizer, data_stats


def plot_title(cfg: DictConfig) -> str:
    """What a run's plots say about it: model, algorithm, latent, seed and scale (CPU scale is named as such)."""
    scale = OmegaConf.select(cfg, "scale.name")
    where = {"cpu": "CPU scale", "paper": "paper scale"}.get(scale, "single run")
    return f"{cfg.model.name} {cfg.algo.name} LPC-{cfg.latent.name}, seed {cfg.seed}, {where}"


def lock_run_dir(run_dir: Path):
    """Hold an exclusive lock on the run directory while this process trains in it. The kernel drops a
    flock when its process dies (kill -9 included), so a stale lock never needs cleaning up."""
    import fcntl
    import os
    import socket

    from lpc.errors import RunDirInUse

    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / rundir.LOCK, "a+")  # noqa: SIM115 - held open for the life of the run
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise RunDirInUse(f"{run_dir} is in use by {holder}: one training per run directory") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
    f.flush()
    return f


def refuse_other_config(cfg: DictConfig, run_dir: Path) -> None:
    """A run directory whose checkpoint belongs to another configuration is refused before any model loads
    (and before its record in .hydra/ is touched)."""
    from lpc.errors import ConfigError

    theirs = rundir.checkpoint_fingerprint(run_dir) if cfg.trainer.get("resume", True) else None
    if theirs is not None and theirs != fingerprint(cfg):
        raise ConfigError(
            f"{run_dir} holds a run of a different configuration (its checkpoint's fingerprint differs); "
            "use a new run directory (hydra.run.dir=...) or trainer.resume=false to start over"
        )


def record_config(cfg: DictConfig, run_dir: Path) -> None:
    """Write Hydra's record of the run (.hydra/config.yaml, hydra.yaml, overrides.yaml) once the run is
    accepted: Hydra's own writing is off (hydra.output_subdir=null) because it happens before a refused
    rerun is refused, and would file a finished run's results under the refused config."""
    from hydra.core.hydra_config import HydraConfig

    from lpc.files import atomic_write_text

    if not HydraConfig.initialized():
        return
    hydra_cfg = HydraConfig.get()
    record = run_dir / ".hydra"
    task = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    atomic_write_text(record / "config.yaml", OmegaConf.to_yaml(task))
    atomic_write_text(record / "hydra.yaml", OmegaConf.to_yaml(OmegaConf.create({"hydra": hydra_cfg})))
    atomic_write_text(record / "overrides.yaml", OmegaConf.to_yaml(list(hydra_cfg.overrides.task)))


def run(cfg: DictConfig, run_dir: str | Path, step_hooks=()) -> dict:
    """Train ``cfg`` into ``run_dir``; ``step_hooks`` join the trainer's (called after every step)."""
    from accelerate.utils import broadcast_object_list

    from lpc.errors import ConfigError, DataError, RunDirInUse
    from lpc.training.distributed import build_accelerator, resolve_gradient_accumulation, setup_process_env

    if cfg.distributed.name == "auto":  # lpc-train's preflight resolves it; here for callers that skip it
        from lpc.preflight import resolve_distributed

        resolve_distributed(cfg)
    setup_process_env(cfg.distributed)  # one rank of a multi-task SLURM job (no-op otherwise)
    quiet_library_bars()  # in a log file, the libraries' bars would leave carriage-return residue
    resolve_gradient_accumulation(cfg)  # from trainer.global_batch_size and the process count, if set
    accelerator = build_accelerator(cfg.trainer, run_dir, log_with="wandb" if cfg.logger.name == "wandb" else None)
    # Every rank writes into rank 0's run directory (Hydra's ${now:...} may differ between ranks).
    run_dir = Path(broadcast_object_list([str(run_dir)])[0]) if accelerator.num_processes > 1 else Path(run_dir)
    lock, refusal, pairs = None, None, None
    try:
        if accelerator.is_main_process:
            lock = lock_run_dir(run_dir)  # before anything is written or loaded
            refuse_other_config(cfg, run_dir)
        pairs = prepare_pairs(cfg)  # every rank; bad data stops the run before any model loads
        if accelerator.is_main_process:
            record_config(cfg, run_dir)
    except (RunDirInUse, ConfigError, DataError) as err:
        if lock is not None:
            lock.close()
        refusal = err
    if accelerator.num_processes > 1:  # every rank stops, not only rank 0
        refusal = broadcast_object_list([refusal])[0] or refusal
    if refusal is not None:
        raise refusal
    try:
        return _train(cfg, run_dir, accelerator, step_hooks, pairs)
    except Exception as err:
        from lpc.preflight import disk_full

        full = disk_full(err, cfg, run_dir)  # a write that did not fit: its partial files removed, the numbers
        if full is None:
            raise
        raise full from err
    finally:
        if lock is not None:
            lock.close()


def _train(cfg: DictConfig, run_dir: Path, accelerator, step_hooks, pairs) -> dict:
    from accelerate.utils import DistributedType

    with accelerator.main_process_first():  # rank 0 creates the W&B run id file, the others read it
        tracker = wandb_tracker(cfg, run_dir)
    trainer, tokenizer, data_stats = build_trainer(cfg, run_dir, accelerator, tracker, pairs)
    run = rundir.RunDir.at(run_dir)
    from lpc.evaluation.analysis import final_analysis

    # Per-type accuracy, code usage, NMI/purity and the prior's t-SNE into metrics.json and run_dir/analysis/.
    trainer.step_hooks.extend(step_hooks)
    title = plot_title(cfg)
    trainer.final_hooks.append(lambda t, pairs: final_analysis(t, run.analysis, pairs=pairs, title=title))
    # Is the policy still a language model? The initial LM (the reference) is measured now, before the first step
    # (on resume too: the checkpoint loads inside train()); generation is left out where the weights are sharded.
    from lpc.evaluation.integrity import LMProbe, lm_integrity

    probe = LMProbe(tokenizer, chat_template=bool(cfg.data.get("chat_template", False)))
    sharded = accelerator.distributed_type in (DistributedType.FSDP, DistributedType.DEEPSPEED)
    reference = probe.measure_reference(accelerator.unwrap_model(trainer.model).lm, generate=not sharded)
    trainer.final_hooks.append(
        lambda t, pairs: lm_integrity(t, run.analysis, probe, reference, pairs, generate=not sharded)
    )
    metrics = trainer.train()
    metrics.update(data_stats)
    # Sharded weights (FSDP/ZeRO-3) are gathered by every rank, then rank 0 writes them.
    full_state = accelerator.get_state_dict(trainer.model) if sharded else None
    if trainer.accelerator.is_main_process:
        with phase(f"export {run.final}", log):
            export_checkpoint(
                trainer.accelerator.unwrap_model(trainer.model), tokenizer, cfg, run.final, state_dict=full_state
            )
        metrics["status"] = rundir.COMPLETED
        run.write_metrics(metrics)  # last: its presence means the run finished
        log.info(
            "final eval/pref_accuracy=%.4f eval/margin=%.4f (%d steps, %.1f s) -> %s",
            metrics["eval/pref_accuracy"],
            metrics["eval/margin"],
            metrics["train/steps"],
            metrics["train/wall_time_s"],
            run_dir,
        )
        if cfg.get("eval") is not None and cfg.eval.get("tasks"):
            from lpc.evaluation.harness import evaluate_checkpoint, load_eval_config

            # lm-eval benchmarks of the exported checkpoint; adds lm_eval/* keys to metrics.json.
            metrics.update(evaluate_checkpoint(run.path, load_eval_config(cfg.eval)))
    trainer.finish_tracking(metrics)  # the W&B run's summary holds every metrics.json key
    return metrics
