"""Checkpoint, then requeue, when SLURM warns that a job is about to be preempted or timed out.

Under hydra-submitit-launcher, SLURM sends SIGUSR2 ``signal_delay_s`` seconds before it stops a job
(``--signal=USR2@<delay>``; also ``scancel --signal=USR2 <jobid>``). submitit's handler for that signal
pickles the job again (the launcher's ``checkpoint()`` resubmits the same sweep job), runs
``scontrol requeue`` and exits at once, wherever the training loop happens to be. The requeued job
then reruns in the same run directory and resumes from the newest checkpoint, which could be up to
``trainer.save_every`` steps old.

:class:`PreemptionGuard` defers that handler to the next optimizer-step boundary: the signal only sets
a flag; the trainer sees the flag, writes a checkpoint of the current step and then calls submitit's
handler, so the requeued job loses no steps. Outside a submitit job the guard does nothing.
"""

from __future__ import annotations

import logging
import os
import signal
import threading

log = logging.getLogger(__name__)


def preemption_signal() -> signal.Signals:
    """The signal submitit treats as "checkpoint and requeue" (it reads the same variable)."""
    return signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]


class PreemptionGuard:
    def __init__(self):
        self.signum = preemption_signal()
        self.previous = None  # submitit's handler while the guard is installed
        self._flag = False

    def install(self) -> PreemptionGuard:
        """Take over the preemption signal if submitit handles it in this process (main thread only)."""
        handler = signal.getsignal(self.signum)
        if (
            "SUBMITIT_EXECUTOR" in os.environ
            and callable(handler)
            and threading.current_thread() is threading.main_thread()
        ):
            self.previous = handler
            signal.signal(self.signum, self._on_signal)
        return self

    @property
    def active(self) -> bool:
        return self.previous is not None

    def _on_signal(self, signum, frame):
        log.warning("received %s: checkpointing at the end of this step, then requeueing", self.signum.name)
        self._flag = True

    def requested(self, accelerator=None) -> bool:
        """True once the signal arrived, on every process (all processes must write the checkpoint)."""
        if not self.active:
            return False
        if accelerator is not None and accelerator.num_processes > 1:
            import torch

            flag = torch.tensor(float(self._flag), device=accelerator.device)
            self._flag = accelerator.reduce(flag, "max").item() > 0
        return self._flag

    def release(self):
        """Give the signal to submitit's handler: it requeues the job and exits (on rank 0)."""
        previous, self.previous = self.previous, None
        if previous is None:
            return
        signal.signal(self.signum, previous)
        if self._flag:
            previous(self.signum, None)


class StopGuard:
    """SIGTERM (``kill``, ``scancel``, a node shutdown) and Ctrl-C: checkpoint at the end of the current step,
    then stop with :class:`lpc.errors.Interrupted`, so a rerun of the same command resumes where it stopped.
    A second Ctrl-C stops at once. Installed only in the main thread (signal handlers cannot be set elsewhere)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.previous: dict = {}
        self.signum: int | None = None

    def install(self) -> StopGuard:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self.previous[s] = signal.getsignal(s)
                signal.signal(s, self._on_signal)
        return self

    def _on_signal(self, signum, frame):
        if self.signum is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now, without a checkpoint
        log.warning("received %s: checkpointing at the end of this step, then stopping", signal.Signals(signum).name)
        self.signum = signum

    def requested(self, accelerator=None) -> int | None:
        """The signal that asked to stop, agreed on by every process (all of them write the checkpoint)."""
        signum = self.signum or 0
        if accelerator is not None and accelerator.num_processes > 1:
            import torch

            flag = torch.tensor(float(signum), device=accelerator.device)
            signum = int(accelerator.reduce(flag, "max").item())
        return signum or None

    def restore(self):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        self.previous = {}
