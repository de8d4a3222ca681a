"""Fault injection for the tests of the training loop: ``SG_FAULT_INJECT``, comma-separated.

* ``nan_loss_at_step_N``: every micro-batch loss of step N becomes NaN;
* ``kill_rankR_at_step_N``: rank R SIGKILLs itself at the start of step N;
* ``hang_at_step_N``: every rank sleeps at the start of step N, to be killed from outside;
* ``sigterm_at_step_N``: each rank sends itself SIGTERM at the start of step N (as Slurm before a time limit);
* ``crash_in_save_at_step_N``: SIGKILL while checkpoint ``step_N`` is half written.

N is the 0-based step index (for saves, the checkpoint's step). Nothing is injected when the variable is unset.
"""
from __future__ import annotations

import os
import re
import signal
import time

import torch

ENV = "SG_FAULT_INJECT"
_PATTERNS = {"nan": r"nan_loss_at_step_(\d+)", "kill": r"kill_rank(\d+)_at_step_(\d+)", "hang": r"hang_at_step_(\d+)",
             "crash_in_save": r"crash_in_save_at_step_(\d+)", "sigterm": r"sigterm_at_step_(\d+)"}


class Faults:
    def __init__(self, spec: str | None = None):
        spec = os.environ.get(ENV, "") if spec is None else spec
        self.planned: dict[str, set] = {kind: set() for kind in _PATTERNS}
        for token in filter(None, (t.strip() for t in spec.split(","))):
            for kind, pattern in _PATTERNS.items():
                if m := re.fullmatch(pattern, token):
                    self.planned[kind].add((int(m[1]), int(m[2])) if kind == "kill" else int(m[1]))
                    break
            else:
                raise SystemExit(f"error: {ENV}: unknown fault {token!r} (known: {', '.join(_PATTERNS.values())})")

    def at_step_start(self, step: int, rank: int) -> None:
        """SIGTERM, SIGKILL or a hang planned for the start of ``step``."""
        if step in self.planned["sigterm"]:
            os.kill(os.getpid(), signal.SIGTERM)  # handled by training.signals.GracefulStop when it is active
        if (rank, step) in self.planned["kill"]:
            print(f"fault injection: rank {rank} dies at step {step}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)
        if step in self.planned["hang"]:
            print(f"fault injection: rank {rank} hangs at step {step}", flush=True)
            time.sleep(120)  # long enough to be killed from outside; an orphan still ends
            raise SystemExit(f"fault injection: rank {rank} was not killed during its hang")

    def loss(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The micro-batch loss, NaN where planned."""
        return loss * float("nan") if step in self.planned["nan"] else loss

    def during_save(self, step: int) -> None:
        """Die with a half-written ``step_N.tmp`` where planned."""
        if step in self.planned["crash_in_save"]:
            os.kill(os.getpid(), signal.SIGKILL)
