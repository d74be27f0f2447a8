"""One training loop for DPO, SimPO and IPO, with or without LPC, on top of accelerate.

Why accelerate and not ``transformers.Trainer``: the LPC loss needs the hidden
states and the latent module inside the step, a frozen reference next to the
policy, and an exact, resumable data order; that is a short explicit loop
(nanoGPT-sized) while accelerate supplies the device placement, DDP/FSDP/
DeepSpeed wrapping, mixed precision, state checkpointing (model, optimizer,
RNG) and the W&B tracker.

The run directory's layout (``run_dir`` is Hydra's output directory) is ``lpc.training.rundir``'s.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import NamedTuple

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

import lpc.adapters as adapters
from lpc.data import PairCollator
from lpc.errors import ConfigError, DataError, Interrupted
from lpc.files import apply_umask, atomic_write_json
from lpc.losses import lpc_objective
from lpc.policy import PreferenceModel, hidden_states, response_logps
from lpc.progress import phase, tracked
from lpc.training import rundir
from lpc.training.distributed import build_accelerator
from lpc.training.preemption import PreemptionGuard, StopGuard

log = logging.getLogger(__name__)


class _Session(NamedTuple):
    """What ``train`` knows of this process's session: the final metrics report it."""

    resumed: bool  # started from a checkpoint
    start_step: int
    start_time: float
    interactive: bool  # a live progress bar (a terminal), not log lines


class PreferenceTrainer:
    """A preference-optimisation run on one process group, recipe-style: the constructor calls the ``setup_*``
    steps (batches, optimizer and model, reference) and ``train`` runs the phases (session start, the step loop,
    the final evaluation). Each piece reads on its own, and a test can drive one (``train_step``, ``evaluate``)."""

    def __init__(
        self,
        *,
        model: PreferenceModel,
        ref_model,
        tokenizer,
        algo,
        train_dataset,
        eval_dataset,
        trainer_cfg,
        run_dir: str | Path,
        optimizer_factory,
        tracker: dict | None = None,
        fingerprint: str = "",
        accelerator: Accelerator | None = None,
    ):
        self.cfg = trainer_cfg
        self.algo = algo
        self.tokenizer = tokenizer
        self.run_dir = Path(run_dir)
        self.ckpt_dir = self.run_dir / rundir.CHECKPOINTS
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.collate = PairCollator(tokenizer.pad_token_id)
        self.fingerprint = fingerprint
        self.tracker = tracker
        self.accelerator = accelerator or build_accelerator(trainer_cfg, run_dir, "wandb" if tracker else None)
        self._running: dict[str, list] = {}  # per-micro-batch metrics since the last log line
        self._log_lines = 0  # the train log's length in the checkpoint resumed from (0: a fresh log)
        self.setup_batches()
        self.setup_model_and_optimizer(model, optimizer_factory)
        self.setup_reference(ref_model)
        self.step = 0
        self.skipped_steps = 0  # updates dropped by trainer.on_nonfinite=skip_step (this session)
        # Called as hook(trainer, pairs) -> dict after the final evaluation (pairs: its per-pair outputs),
        # while a W&B run is still open; their metrics join the final ones (lpc.evaluation.analysis.final_analysis).
        self.final_hooks: list = []
        # Called as hook(trainer) after every optimizer step, once its logging and checkpointing are done
        # (fault injection in the tests, custom monitors); ``trainer.step`` is the step just finished.
        self.step_hooks: list = []

    # ------------------------------------------------------------------ setup
    def setup_batches(self) -> None:
        """The global batch, the steps per epoch and the run's length, from the processes that joined."""
        c = self.cfg
        self.world = self.accelerator.num_processes
        self.global_batch = c.batch_size * c.gradient_accumulation_steps * self.world
        if c.get("global_batch_size") is not None and self.global_batch != c.global_batch_size:
            # the accumulation was derived for another process count than the one that joined
            raise ConfigError(
                f"trainer.global_batch_size={c.global_batch_size} but batch_size {c.batch_size} x accumulation "
                f"{c.gradient_accumulation_steps} x {self.world} processes = {self.global_batch}"
            )
        self.steps_per_epoch = len(self.train_dataset) // self.global_batch
        if self.steps_per_epoch < 1:
            raise DataError(
                f"the training set has {len(self.train_dataset)} pairs, fewer than one global batch "
                f"({self.global_batch} = batch_size x gradient_accumulation_steps x processes)"
            )
        self.total_steps = c.max_steps if c.max_steps > 0 else c.epochs * self.steps_per_epoch

    def setup_model_and_optimizer(self, model: PreferenceModel, optimizer_factory) -> None:
        """The optimizer over ``param_groups``, its schedule, and the model and optimizer wrapped by accelerate
        (DDP, FSDP or DeepSpeed); the schedule and, for an adapter, the trainable-only state join checkpoints."""
        c, acc = self.cfg, self.accelerator
        if c.gradient_checkpointing:
            model.lm.gradient_checkpointing_enable()
        optimizer = optimizer_factory(params=self.param_groups(model, c.lr))
        warmup = c.warmup_steps if c.warmup_steps >= 0 else math.ceil(c.warmup_ratio * self.total_steps)
        # Stepped by hand once per optimizer step (accelerate's wrapper would step it once per process).
        self.scheduler = get_scheduler(
            c.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=self.total_steps
        )
        if acc.distributed_type == DistributedType.DEEPSPEED and model.latent is not None:
            # Why: ZeRO-3 gathers a module's own parameters for its forward and regathers them for its backward
            # only through the tensors it returns; the latent returns a LatentOutput, so its codebook (z = probs @
            # codebook) would be released before backward needs it ("mat2 must be a matrix"). As external
            # parameters of the PreferenceModel (whose output is a NamedTuple) they stay gathered for both passes.
            import deepspeed  # an optional dependency (the zero3 extra): imported only by a DeepSpeed run

            for p in model.latent.parameters(recurse=False):
                deepspeed.zero.register_external_parameter(model, p)
        self.model, self.optimizer = acc.prepare(model, optimizer)
        acc.register_for_checkpointing(self.scheduler)
        # adapter=lora|qlora: the reference is the policy with its adapters off, and a checkpoint holds what trains
        # (the adapter and the latent), not the frozen base (lpc.adapters)
        self.adapter = adapters.has_adapter(model.lm)
        if self.adapter:
            acc.register_save_state_pre_hook(adapters.trainable_state_only)

    def setup_reference(self, ref_model) -> None:
        """The frozen reference model, when the algorithm needs one and its log-probs are not precomputed."""
        self.ref_model = None
        if self.algo.needs_reference and ref_model is not None:  # None: precomputed (batch["ref_logps"])
            # Replicated on every process, frozen, never wrapped (DDP would sync nothing; prepare_model
            # would also add it to every checkpoint). Under FSDP/ZeRO-3 prefer precomputed log-probs.
            ref_model.requires_grad_(False).eval()
            self.ref_model = ref_model.to(self.accelerator.device)

    @staticmethod
    def param_groups(model: PreferenceModel, lr: float) -> list[dict]:
        """The LM's parameters at ``lr``; the latent's codes and gate at its own ``latent.lr`` when set, else at
        ``lr x latent.lr_multiplier``, and its prior/posterior heads at ``latent.head_lr`` (default: the same).
        They start from scratch while the LM is pretrained: at a paper LM rate of 5e-7 they would not move
        (docs/method.md)."""
        latent_ids = {id(p) for p in model.latent.parameters()} if model.latent is not None else set()
        lm = [p for p in model.parameters() if p.requires_grad and id(p) not in latent_ids]
        groups = [{"params": lm}]
        if model.latent is not None:
            latent = model.latent
            own = latent.lr if latent.lr is not None else lr * latent.lr_multiplier
            heads = {id(p) for p in latent.head_parameters()}
            z_params = [p for p in latent.parameters() if p.requires_grad and id(p) not in heads]
            groups.append({"params": z_params, "lr": own})
            # the heads read a d-wide hidden state: an Adam step moves their logits about lr x d, so a z-sized lr
            # saturates them within steps on a wide backbone (latent.head_lr; docs/method.md)
            head_params = [p for p in latent.head_parameters() if p.requires_grad]
            groups.append({"params": head_params, "lr": latent.head_lr if latent.head_lr is not None else own})
        return groups

    # ------------------------------------------------------------------ data
    def _micro_batches(self, step: int):
        """The micro-batches this process runs at optimizer step ``step``: the global batch is a slice
        of an epoch-seeded permutation, so the order is exact on resume and independent of the
        number of processes (rank r takes every world-th micro-batch slice)."""
        epoch, within = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.cfg.seed * 100003 + epoch)
        perm = torch.randperm(len(self.train_dataset), generator=g)
        chunk = perm[within * self.global_batch : (within + 1) * self.global_batch].tolist()
        b, r = self.cfg.batch_size, self.accelerator.process_index
        for a in range(self.cfg.gradient_accumulation_steps):
            start = (a * self.world + r) * b
            yield self._to_device(self.collate([self.train_dataset[i] for i in chunk[start : start + b]]))

    def _to_device(self, batch):
        return {k: v.to(self.accelerator.device) for k, v in batch.items()}

    # ------------------------------------------------------------------ loss
    def _reference_logps(self, batch):
        if "ref_logps" in batch:  # precomputed once per sweep (lpc.training.reference)
            return batch["ref_logps"], batch["response_mask"][:, 1:].sum(1)
        if self.ref_model is None and self.adapter and self.algo.needs_reference:
            lm = self.accelerator.unwrap_model(self.model).lm  # the base model: the policy with its adapters off
            with torch.no_grad(), self.accelerator.autocast(), adapters.adapters_disabled(lm):
                return response_logps(lm, hidden_states(lm, batch), batch)
        if self.ref_model is None:
            return None
        with torch.no_grad(), self.accelerator.autocast():
            return response_logps(self.ref_model, hidden_states(self.ref_model, batch), batch)

    def _algo_output(self, logps, n_tokens, ref):
        """The algorithm's per-pair losses and implicit rewards from stacked (chosen; rejected) log-probs."""
        half = logps.shape[0] // 2
        pol = logps / n_tokens if self.algo.average_logps else logps
        if ref is not None:
            ref = ref[0] / ref[1] if self.algo.average_logps else ref[0]
            return self.algo(pol[:half], pol[half:], ref[:half], ref[half:])
        return self.algo(pol[:half], pol[half:])

    def compute_loss(self, batch, progress: float, latent_mode: str = "train"):
        """Loss and TRL-named metrics for one micro-batch; also per-pair rewards for evaluation."""
        out = self.model(batch, progress=progress, latent_mode=latent_mode)
        half = out.logps.shape[0] // 2
        res = self._algo_output(out.logps, out.n_tokens, self._reference_logps(batch))
        losses = res.losses
        metrics = {}
        if out.latent is not None:
            latent = self.accelerator.unwrap_model(self.model).latent
            weight = latent.kl_weight_at(progress)
            losses = lpc_objective(losses, out.latent.kl, weight, latent.kl_free_bits)
            metrics.update({k: v.detach() for k, v in out.latent.metrics.items()})
            metrics["latent/kl_weight"] = torch.tensor(weight)
            if out.z_kl is not None:  # latent.lm_kl_weight: z may shift the LM's next-token distribution little
                per_token = out.z_kl / out.n_tokens.clamp_min(1)
                lm_kl = (per_token[:half] + per_token[half:]) / 2
                losses = losses + latent.lm_kl_weight * lm_kl
                metrics["latent/lm_kl"] = lm_kl.detach().mean()
        cr, rr = res.chosen_rewards.detach(), res.rejected_rewards.detach()
        metrics.update(
            {
                "loss": losses.mean().detach(),
                "rewards/chosen": cr.mean(),
                "rewards/rejected": rr.mean(),
                "rewards/accuracies": (cr > rr).float().mean(),
                "rewards/margins": (cr - rr).mean(),
                "logps/chosen": out.logps[:half].detach().mean(),
                "logps/rejected": out.logps[half:].detach().mean(),
            }
        )
        if out.logit_sums is not None:  # TRL's: the mean logit over the responses' tokens and the vocabulary
            n = out.n_tokens.detach()
            metrics["logits/chosen"] = out.logit_sums[:half].sum() / n[:half].sum().clamp_min(1)
            metrics["logits/rejected"] = out.logit_sums[half:].sum() / n[half:].sum().clamp_min(1)
        return losses.mean(), metrics, (cr, rr, out.latent)

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, dataset=None, return_pairs: bool = False, diagnostics: bool = False):
        """Held-out preference accuracy with the algorithm's implicit reward (for LPC, z from the prior).

        ``diagnostics`` (LPC only; the final evaluation sets it) also scores every pair with z = 0, with
        the prior's z of another prompt (a fixed permutation of the eval set, so z keeps its
        distribution) and with the posterior's code (an oracle: it sees which response won), which
        says whether the latent changed anything (``lpc.evaluation.analysis.latent_diagnostics``)."""
        dataset = dataset if dataset is not None else self.eval_dataset
        self.model.eval()
        # Evaluation must not move the training RNG (sampled z), or resumed runs would diverge.
        with torch.no_grad(), torch.random.fork_rng(devices=[]):
            cr_all, rr_all, loss_sum, n, extra, z_prior = [], [], 0.0, 0, {}, []
            loader = DataLoader(dataset, batch_size=self.cfg.eval_batch_size, collate_fn=self.collate)
            for batch in tracked(loader, "evaluation", log, enabled=self.accelerator.is_main_process):
                batch = self._to_device(batch)
                loss, _, (cr, rr, lat) = self.compute_loss(batch, progress=1.0, latent_mode="prior")
                cr_all.append(cr.float().cpu()), rr_all.append(rr.float().cpu())
                loss_sum += loss.item() * cr.shape[0]
                n += cr.shape[0]
                if lat is not None:
                    z_prior.append(lat.z.detach().float().cpu())
                    if return_pairs:
                        for k, v in lat.analysis().items():
                            extra.setdefault(k, []).append(v.float().cpu())
            cr, rr = torch.cat(cr_all), torch.cat(rr_all)
            ablations = {}
            if diagnostics and z_prior:
                ablations = self._latent_ablations(loader, torch.cat(z_prior))
        self.model.train()
        metrics = {
            "eval/pref_accuracy": (cr > rr).float().mean().item(),
            "eval/margin": (cr - rr).mean().item(),
            "eval/loss": loss_sum / max(n, 1),
            "eval/rewards/chosen": cr.mean().item(),
            "eval/rewards/rejected": rr.mean().item(),
        }
        if return_pairs:
            pairs = {
                "chosen_rewards": cr,
                "rejected_rewards": rr,
                **{k: torch.cat(v) for k, v in extra.items()},
                **ablations,
            }
            return metrics, pairs
        return metrics

    def _latent_ablations(self, loader, z_prior: torch.Tensor) -> dict[str, torch.Tensor]:
        """Per-pair margins (chosen - rejected reward) of the same policy with z replaced: ``z_zero``,
        ``z_shuffled`` (row i gets the prior's z of row perm[i]) and ``z_posterior``; the chosen response's
        log-prob under each (and the prior's z, and the reference's when there is one) with its token count;
        the norms of z and of the hidden states it is added to. One more backbone pass over the eval set."""
        model = self.accelerator.unwrap_model(self.model)
        g = torch.Generator().manual_seed(self.cfg.seed)
        perm = torch.randperm(len(z_prior), generator=g)
        out: dict[str, list] = {}
        row = 0
        for batch in loader:
            batch = self._to_device(batch)
            hidden, pre_norm = model.encode(batch)
            h_prompt, h_w, h_l = model.latent_inputs(hidden, batch)
            lat = model.latent(h_prompt, h_w, h_l, progress=1.0, mode="prior")
            ref = self._reference_logps(batch)
            b = h_prompt.shape[0]
            idx = perm[row : row + b]
            row += b
            zs = {
                "z_zero": torch.zeros_like(lat.z),
                "z_shuffled": z_prior[idx].to(device=lat.z.device, dtype=lat.z.dtype),
                "z_posterior": lat.z_posterior,
            }
            for name, z in {"z_prior": lat.z, **zs}.items():
                logps, counts = model.score(hidden, batch, z, pre_norm)
                # the chosen responses' log-probs: the eval text's NLL under each z (lpc.evaluation.integrity)
                out.setdefault(f"chosen_logps/{name}", []).append(logps[:b].float().cpu())
                if name == "z_prior":
                    out.setdefault("chosen_tokens", []).append(counts[:b].float().cpu())
                    if ref is not None:
                        out.setdefault("chosen_logps/reference", []).append(ref[0][:b].float().cpu())
                    continue
                res = self._algo_output(logps, counts, ref)
                out.setdefault(f"margin/{name}", []).append((res.chosen_rewards - res.rejected_rewards).float().cpu())
            out.setdefault("z_norm", []).append(lat.z.float().norm(dim=-1).cpu())
            out.setdefault("hidden_norm", []).append(
                torch.cat([h_w, h_l]).float().norm(dim=-1).view(2, -1).mean(0).cpu()
            )
        return {k: torch.cat(v) for k, v in out.items()}

    # ------------------------------------------------------------------ checkpoints
    def latest_checkpoint(self) -> Path | None:
        return rundir.latest_checkpoint(self.run_dir)

    def save_checkpoint(self):
        with phase(f"checkpoint {rundir.checkpoint_name(self.step)}", log, self.accelerator.is_main_process):
            self._save_checkpoint()

    def _save_checkpoint(self):
        acc = self.accelerator
        tmp = self.ckpt_dir / f".tmp-{rundir.checkpoint_name(self.step)}"
        final = self.ckpt_dir / rundir.checkpoint_name(self.step)
        if acc.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        acc.wait_for_everyone()
        acc.save_state(str(tmp))
        # this rank's metrics since the last log line: a run resumed between two log steps then writes the
        # same averages as an uninterrupted one
        running = {k: [float(x) for x in torch.stack(v).float().reshape(-1)] for k, v in self._running.items()}
        atomic_write_json(tmp / f"running_{acc.process_index}.json", running)
        acc.wait_for_everyone()
        if acc.is_main_process:
            log_path = self.run_dir / rundir.TRAIN_LOG
            log_lines = len(log_path.read_text().splitlines()) if log_path.exists() else 0
            state = {
                "step": self.step,
                "fingerprint": self.fingerprint,
                "total_steps": self.total_steps,
                "log_lines": log_lines,
            }
            atomic_write_json(tmp / rundir.TRAINER_STATE, state)
            rundir.write_checkpoint_manifest(tmp)  # last: its presence means the checkpoint is whole
            apply_umask(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for _, old in rundir.checkpoints(self.run_dir, complete_only=False)[: -max(self.cfg.keep_checkpoints, 1)]:
                shutil.rmtree(old, ignore_errors=True)
        acc.wait_for_everyone()

    def maybe_resume(self) -> bool:
        """Resume from the newest intact checkpoint; a broken one (a file missing or truncated against its
        manifest, or one that fails to load) is passed over with a warning naming it."""
        if not self.cfg.resume:
            return False
        found = rundir.checkpoints(self.run_dir)
        for _, ckpt in reversed(found):
            problem = rundir.checkpoint_problem(ckpt)
            if problem is None:
                state = json.loads((ckpt / rundir.TRAINER_STATE).read_text())
                if self.fingerprint and state["fingerprint"] != self.fingerprint:
                    raise RuntimeError(
                        f"{self.run_dir} holds a checkpoint of a different configuration ({ckpt.name}); "
                        f"use a new run directory (hydra.run.dir=...) or trainer.resume=false to start over"
                    )
                try:
                    # an adapter run's checkpoint lacks the frozen base (adapters.trainable_state_only): not strict
                    self.accelerator.load_state(str(ckpt), **({"strict": False} if self.adapter else {}))
                except Exception as err:  # noqa: BLE001 - a file that passed the size check but cannot be read
                    problem = f"it does not load: {type(err).__name__}: {str(err)[:200]}"
            if problem is not None:
                log.warning("checkpoint %s is broken (%s): falling back to the previous one", ckpt, problem)
                continue
            self.step = state["step"]
            self._log_lines = state["log_lines"]
            running = ckpt / f"running_{self.accelerator.process_index}.json"
            if running.exists():
                dev = self.accelerator.device
                saved = json.loads(running.read_text())
                self._running = {k: [torch.tensor(x, device=dev) for x in v] for k, v in saved.items() if v}
            log.info("resumed from %s (step %d of %d)", ckpt, self.step, self.total_steps)
            return True
        if found:
            log.warning("no intact checkpoint in %s: training from step 0", self.ckpt_dir)
        return False

    # ------------------------------------------------------------------ logging
    def finish_tracking(self, summary: dict | None = None) -> None:
        """Put ``summary`` (a run's whole metrics.json) into the W&B run's summary, then close the trackers.
        The trackers only: accelerator.end_training() also destroys the process group, which the sharded
        export (accelerator.get_state_dict under FSDP/ZeRO-3, lpc.run) may still need."""
        if not self.tracker:
            return
        for tracker in self.accelerator.trackers:
            if summary and tracker.name == "wandb":
                tracker.run.summary.update(summary)
            tracker.finish()

    def _log(self, metrics: dict):
        if self.accelerator.is_main_process:
            with open(self.run_dir / rundir.TRAIN_LOG, "a") as f:
                f.write(json.dumps({"step": self.step, **metrics}) + "\n")
        if self.tracker:
            self.accelerator.log(metrics, step=self.step)

    def _truncate_log(self):
        """Drop what the log gained after the checkpoint we resume from (all of it when starting over)."""
        path = self.run_dir / rundir.TRAIN_LOG
        if self.accelerator.is_main_process and path.exists():
            lines = path.read_text().splitlines()[: self._log_lines]
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(ln + "\n" for ln in lines))
            os.replace(tmp, path)

    # ------------------------------------------------------------------ the loop
    def train_step(self) -> dict[str, list]:
        """One optimizer step on the global batch of ``self.step``; returns each micro-batch's metrics."""
        acc = self.accelerator
        progress = self.step / max(self.total_steps - 1, 1)
        metrics_per_micro: dict[str, list] = {}
        for batch in self._micro_batches(self.step):
            # accelerate's accumulation: only the last of the gradient_accumulation_steps micro-batches all-reduces
            # gradients (DDP/FSDP) and backward divides each micro-batch mean loss by their number, so the
            # update equals one large batch's; under DeepSpeed the engine does both itself.
            with acc.accumulate(self.model), acc.autocast():
                loss, metrics, _ = self.compute_loss(batch, progress)
                acc.backward(loss)
            for k, v in metrics.items():
                metrics_per_micro.setdefault(k, []).append(v)
        grad_norm = acc.clip_grad_norm_(self.model.parameters(), self.cfg.max_grad_norm)
        # DeepSpeed has already clipped and stepped inside the last backward (so trainer.on_nonfinite=skip_step
        # cannot drop its update) and returns the norm as a float
        grad_norm = torch.as_tensor(grad_norm, dtype=torch.float32)
        losses = torch.stack(metrics_per_micro["loss"])
        # A NaN/inf loss makes NaN gradients, which the all-reduce spreads to every rank: the grad norm
        # is the same on all of them, so every rank takes the same decision.
        if not (torch.isfinite(grad_norm) and torch.isfinite(losses).all()):
            self._nonfinite(losses, grad_norm)
            self.optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # the schedule keeps counting steps: resume stays exact
                warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step()`")
                self.scheduler.step()
            self.step += 1
            self.skipped_steps += 1
            return {}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        metrics_per_micro["grad_norm"] = [grad_norm.detach().float()]
        return metrics_per_micro

    def _nonfinite(self, losses, grad_norm) -> None:
        """``trainer.on_nonfinite``: ``error`` stops the run here (no checkpoint, no final files: never a
        completed run trained on NaN); ``skip_step`` drops this step's update and counts it."""
        msg = (
            f"non-finite training step {self.step + 1}: loss {losses.tolist()}, grad norm {float(grad_norm)} "
            f"(check trainer.lr, algo.beta, latent.kl_weight)"
        )
        if self.cfg.get("on_nonfinite", "error") == "error":
            raise FloatingPointError(msg + "; trainer.on_nonfinite=skip_step skips such steps instead")
        log.warning("%s: skipped (trainer.on_nonfinite=skip_step)", msg)

    def train(self) -> dict:
        """Train from the newest checkpoint (or step 0) to ``total_steps``, then evaluate; returns the final
        metrics. SIGTERM or Ctrl-C checkpoints and raises ``Interrupted``; SLURM's warning checkpoints and
        requeues."""
        session = self.setup_session()
        bar = tqdm(total=self.total_steps, initial=self.step, disable=not session.interactive, desc="train")
        self.model.train()
        preemption = PreemptionGuard().install()  # SLURM's warning signal only sets a flag (lpc.training.preemption)
        stop = StopGuard().install()  # SIGTERM / Ctrl-C: checkpoint at the end of the step, then stop
        while self.step < self.total_steps:
            lr = self.scheduler.get_last_lr()[0]  # the rate this step trains at, for its log line
            for k, v in self.train_step().items():
                self._running.setdefault(k, []).extend(v)
            bar.update(1)
            if self.step % self.cfg.log_every == 0 or self.step == self.total_steps:
                self._log_progress(lr, bar, session.interactive)
            self._after_step()
            self._answer_signals(preemption, stop, bar)
        stop.restore()
        bar.close()
        final = self.final_evaluation(session)
        self.save_checkpoint()
        preemption.release()  # signalled during the final evaluation: requeue now, the rerun resumes here
        return final

    def setup_session(self) -> _Session:
        """Seed, resume, cut the train log back to the checkpoint and open the trackers."""
        acc, c = self.accelerator, self.cfg
        # Why device_specific (seed + process index): with one seed every rank drew the same latent samples (the
        # Gumbel noise of LPC, the continuous latent's eps) for its different pairs. Models and data order are
        # seeded before this; one process is unchanged (index 0).
        set_seed(c.seed, device_specific=True)
        resumed = self.maybe_resume()
        self._truncate_log()
        if self.tracker:
            acc.init_trackers(
                self.tracker["project"],
                config=self.tracker.get("config"),
                init_kwargs={"wandb": self.tracker["init_kwargs"]},
            )
        session = _Session(
            resumed=resumed,
            start_step=self.step,
            start_time=time.time(),
            # A live bar on a terminal; in a log file (SLURM, CI) one line per log step instead.
            interactive=acc.is_main_process and sys.stderr.isatty(),
        )
        if acc.is_main_process:
            log.info(
                "global batch %d pairs = batch_size %d x accumulation %d x %d process(es); %d steps, %d per epoch",
                self.global_batch,
                c.batch_size,
                c.gradient_accumulation_steps,
                self.world,
                self.total_steps,
                self.steps_per_epoch,
            )
        return session

    def _log_progress(self, lr: float, bar, interactive: bool) -> None:
        """One train-log line: every metric averaged over the micro-batches since the last line and over the
        processes; on the bar's postfix, or as a log line where no bar is shown."""
        acc = self.accelerator
        logged = {k: acc.reduce(torch.stack(v).float().mean(), "mean").item() for k, v in self._running.items()}
        logged["learning_rate"] = lr
        logged["epoch"] = self.step / self.steps_per_epoch
        if self.skipped_steps:
            logged["skipped_nonfinite_steps"] = self.skipped_steps
        self._running.clear()
        self._log(logged)
        nan = float("nan")
        bar.set_postfix(loss=f"{logged.get('loss', nan):.4f}", acc=f"{logged.get('rewards/accuracies', nan):.2f}")
        if not interactive and acc.is_main_process:
            log.info(
                "step %d/%d loss=%.4f rewards/accuracies=%.3f rewards/margins=%.3f lr=%.3g",
                self.step,
                self.total_steps,
                logged.get("loss", nan),
                logged.get("rewards/accuracies", nan),
                logged.get("rewards/margins", nan),
                lr,
            )

    def _after_step(self) -> None:
        """The periodic evaluation and checkpoint (the last step has its own), then the step hooks."""
        c = self.cfg
        if c.eval_every > 0 and self.step % c.eval_every == 0 and self.step < self.total_steps:
            ev = self.evaluate()
            self._log(ev)
            log.info(
                f"step {self.step}: eval/pref_accuracy={ev['eval/pref_accuracy']:.4f} "
                f"eval/margin={ev['eval/margin']:.4f}"
            )
        if c.save_every > 0 and self.step % c.save_every == 0 and self.step < self.total_steps:
            self.save_checkpoint()
        for hook in self.step_hooks:
            hook(self)

    def _answer_signals(self, preemption: PreemptionGuard, stop: StopGuard, bar) -> None:
        """Between two steps, where a checkpoint is whole: requeue on SLURM's warning, stop on SIGTERM/Ctrl-C.
        Every rank asks (``requested`` agrees across them), so all of them checkpoint together."""
        if preemption.requested(self.accelerator):
            log.warning("preempted: checkpointing step %d, then requeueing", self.step)
            self.save_checkpoint()
            preemption.release()  # submitit requeues the job and exits; the requeued job resumes here
        signum = stop.requested(self.accelerator)
        if signum is not None and self.step < self.total_steps:
            self.save_checkpoint()
            stop.restore()
            bar.close()
            raise Interrupted(
                f"stopped by {signal.Signals(signum).name} at step {self.step} of {self.total_steps}; the "
                f"checkpoint is saved: rerun the same command to resume",
                signum,
            )

    def final_evaluation(self, session: _Session) -> dict:
        """The eval set with the latent's ablations, the run's train/ figures, and the final hooks' metrics."""
        main = self.accelerator.is_main_process
        with phase(f"final evaluation ({len(self.eval_dataset)} pairs, with the latent's ablations)", log, main):
            final, pairs = self.evaluate(return_pairs=True, diagnostics=True)
        if not (session.resumed and session.start_step == self.total_steps):  # resumed from the end: logged already
            self._log(final)
        final.update(
            {
                "train/steps": self.step,
                "train/steps_this_session": self.step - session.start_step,
                "train/resumed": session.resumed,
                "train/num_processes": self.world,
                "train/global_batch_size": self.global_batch,
                "train/gradient_accumulation_steps": self.cfg.gradient_accumulation_steps,
                "train/skipped_nonfinite_steps": self.skipped_steps,
                "train/wall_time_s": time.time() - session.start_time,
            }
        )
        with phase("final analysis (per-type accuracy, code usage, NMI, embedding plot)", log, main):
            for hook in self.final_hooks:
                final.update(hook(self, pairs))
        return final
