"""``metrics.jsonl``: one JSON line per logging interval, written by rank 0 as training goes.

Each line: ``step`` (optimizer steps done), ``loss`` (the last step's, mean over micro-batches and ranks),
``loss_interval`` (mean over the interval's steps), ``lr``, ``elapsed_s`` (since training started) and
``skipped_steps`` (non-finite steps so far). ``log_eval`` adds held-out lines: ``step``, ``"split": "eval"`` and
the metrics (``answer_loss``, ...). A resumed run first drops the lines of the steps it redoes, so the file reads
as one run. Any tool that reads JSON lines (pandas ``read_json(lines=True)``) plots it.

With ``report_to`` (``training/reporting.py``) every line also goes to TensorBoard / wandb, as ``train/<name>``
and ``eval/<name>`` scalars at its step.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Iterable

from sg_distributed.training.reporting import open_sinks, resolve_report_to


def lines_up_to(path: Path, step: int) -> list[str]:
    """The lines of ``path`` at steps <= ``step``. A line that does not parse is dropped: a kill can land
    mid-write (a torn last line), and nothing a kill leaves behind may stop a resume."""
    kept = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    return kept


class MetricsLog:
    """``every`` <= 0 or ``enabled=False`` (ranks other than 0) writes nothing and opens no sink; ``report_to``
    is checked on every rank all the same, so a bad name stops all of them. Usable as a context manager."""

    def __init__(self, path: str | Path, every: int, enabled: bool = True, start_step: int = 0,
                 report_to: Iterable[str] = (), run_config: dict | None = None):
        self.path, self.every, self.enabled = Path(path), every, enabled and every > 0
        self.interval: list[float] = []
        self.t0 = time.perf_counter()
        self.sinks = []
        names = resolve_report_to(list(report_to) or ["none"])
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            kept = []
            if start_step and self.path.exists():  # a resume: keep what happened before the checkpoint
                kept = lines_up_to(self.path, start_step)
            self.path.write_text("".join(line + "\n" for line in kept))
            self.sinks = open_sinks(names, self.path.parent, run_config, start_step=start_step)

    def log(self, step: int, loss: float, lr: float, skipped_steps: int) -> None:
        """Record the step just done (``step`` = optimizer steps done); writes every ``every`` steps."""
        self.interval.append(loss)
        if not self.enabled or step % self.every:
            return
        record = {"step": step, "loss": loss, "loss_interval": sum(self.interval) / len(self.interval), "lr": lr,
                  "elapsed_s": round(time.perf_counter() - self.t0, 3), "skipped_steps": skipped_steps}
        self._write(record, {f"train/{k}": v for k, v in record.items() if k != "step"})
        self.interval = []

    def log_eval(self, step: int, metrics: dict) -> None:
        """Held-out metrics after ``step`` optimizer steps (``evaluate_held_out``'s dict): a ``"split": "eval"``
        line of its numbers (other entries, such as predictions, are left out), ``eval/<name>`` in the sinks."""
        if not self.enabled:
            return
        numbers = {k.removeprefix("eval/"): v for k, v in metrics.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)}
        self._write({"step": step, "split": "eval", **numbers}, {f"eval/{k}": v for k, v in numbers.items()})

    def _write(self, record: dict, scalars: dict[str, float]) -> None:
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        for sink in self.sinks:
            sink.log(record["step"], scalars)

    def close(self) -> None:
        sinks, self.sinks = self.sinks, []
        for sink in sinks:
            sink.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
