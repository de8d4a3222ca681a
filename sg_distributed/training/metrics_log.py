"""``metrics.jsonl``: one JSON line per logging interval, written by rank 0 as training goes.

Each line: ``step`` (optimizer steps done), ``loss`` (the last step's, mean over micro-batches and ranks),
``loss_interval`` (mean over the interval's steps), ``lr``, ``elapsed_s`` (since training started) and
``skipped_steps`` (non-finite steps so far). A resumed run first drops the lines of the steps it redoes, so the
file reads as one run. Any tool that reads JSON lines (pandas ``read_json(lines=True)``) plots it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, path: str | Path, every: int, enabled: bool = True, start_step: int = 0):
        self.path, self.every, self.enabled = Path(path), every, enabled and every > 0
        self.interval: list[float] = []
        self.t0 = time.perf_counter()
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if start_step and self.path.exists():  # a resume: keep what happened before the checkpoint
                kept = [line for line in self.path.read_text().splitlines()
                        if line.strip() and json.loads(line)["step"] <= start_step]
            self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, step: int, loss: float, lr: float, skipped_steps: int) -> None:
        """Record the step just done (``step`` = optimizer steps done); writes every ``every`` steps."""
        self.interval.append(loss)
        if not self.enabled or step % self.every:
            return
        record = {"step": step, "loss": loss, "loss_interval": sum(self.interval) / len(self.interval), "lr": lr,
                  "elapsed_s": round(time.perf_counter() - self.t0, 3), "skipped_steps": skipped_steps}
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        self.interval = []
