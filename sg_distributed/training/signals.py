"""Stop on SIGTERM / SIGINT at a step boundary, with a checkpoint, instead of dying mid-step.

Slurm sends SIGTERM before a time limit (``--signal``, or at the limit itself), torchrun forwards it to every
rank, and Ctrl-C sends SIGINT. Inside ``GracefulStop`` the signal only sets ``requested``; the training loop
reads it once per optimizer step inside the step's existing collective (any rank asking stops all ranks at the
same step), saves a checkpoint and exits with 128 + the signal's number, as a shell reports a signal death.
"""
from __future__ import annotations

import signal
import threading


def rearm_sigterm() -> None:
    """Undo an inherited "ignore SIGTERM". The Slurm scripts start their launchers with SIGTERM ignored so that a
    launcher outlives its ranks' checkpoint (``launch/slurm/lib.sh``); an ignored disposition survives exec, and a
    rank must still die on SIGTERM before training starts and stop gracefully once it has."""
    if signal.getsignal(signal.SIGTERM) is signal.SIG_IGN and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class GracefulStop:
    """Context manager: while active (and ``enabled``), SIGTERM and SIGINT set ``requested`` to their number."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.requested: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        self.requested = signum

    def __enter__(self) -> "GracefulStop":
        if self.enabled and threading.current_thread() is threading.main_thread():  # handlers: main thread only
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, previous in self._previous.items():
            signal.signal(sig, previous)
        self._previous.clear()

    @property
    def exit_code(self) -> int:
        return 128 + int(self.requested or signal.SIGTERM)

    @property
    def name(self) -> str:
        return signal.Signals(self.requested or signal.SIGTERM).name
