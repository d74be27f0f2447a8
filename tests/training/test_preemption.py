"""lpc.training.preemption without SLURM: the guard turns submitit's handler into a flag and calls it on release."""

import os
import signal

from lpc.training.preemption import PreemptionGuard


def test_guard_defers_the_submitit_handler_to_release(monkeypatch):
    calls = []
    previous = signal.signal(signal.SIGUSR2, lambda signum, frame: calls.append(signum))
    try:
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        guard = PreemptionGuard().install()
        assert guard.active and not guard.requested()
        os.kill(os.getpid(), signal.SIGUSR2)
        assert guard.requested() and calls == []  # only flagged: the step finishes and checkpoints first
        guard.release()
        assert calls == [signal.SIGUSR2]  # now submitit's handler (requeue + exit) runs, once
        os.kill(os.getpid(), signal.SIGUSR2)  # and the handler is submitit's again
        assert calls == [signal.SIGUSR2, signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)


def test_guard_is_inert_outside_submitit(monkeypatch):
    monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
    guard = PreemptionGuard().install()
    assert not guard.active and not guard.requested()
    assert signal.getsignal(signal.SIGUSR2) is not guard._on_signal
    guard.release()  # no-op
