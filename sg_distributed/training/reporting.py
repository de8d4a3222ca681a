"""``--report_to``: training metrics to TensorBoard and / or Weights & Biases, next to ``metrics.jsonl``.

Names as in the HF Trainer's ``report_to``: ``none``, ``tensorboard``, ``wandb`` and ``all`` (every one of them
whose package is installed). ``open_sinks`` returns one sink per name, each with ``log(step, metrics)`` and
``close()``; metric names are used as given (``MetricsLog`` passes ``train/loss``, ``eval/answer_loss``, ...).

* tensorboard: ``torch.utils.tensorboard.SummaryWriter`` in ``<output_dir>/runs`` (``tensorboard --logdir
  <output_dir>/runs``); the run config once, as text and as hparams. A resumed run (``start_step``) hides the
  events after its checkpoint, as ``metrics.jsonl`` drops their lines.
* wandb: ``wandb.init(project=$WANDB_PROJECT or "sg_distributed", config=run_config, dir=output_dir)``; wandb
  reads ``WANDB_MODE`` itself (``WANDB_MODE=offline`` needs no network). Not pinned: ``pip install wandb``.
"""
from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from typing import Iterable, Protocol

VALID = ("none", "tensorboard", "wandb", "all")
INTEGRATIONS = ("tensorboard", "wandb")  # what "all" may stand for
INSTALL = {"tensorboard": "pip install tensorboard (requirements.lock pins it; `make venv` installs it)",
           "wandb": "pip install wandb"}


def _installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def resolve_report_to(report_to: str | Iterable[str] | None) -> list[str]:
    """The integrations to open, in order, without duplicates (``[]`` for none).

    ValueError for a name not in ``VALID`` or ``none`` / ``all`` next to other names; ModuleNotFoundError,
    naming the ``pip install`` that fixes it, for a named integration whose package is missing. ``all`` takes
    the installed ones only, as in the HF Trainer.
    """
    names = [report_to] if isinstance(report_to, str) else list(report_to or ["none"])
    for name in names:
        if name not in VALID:
            raise ValueError(f"unknown reporting integration {name!r} (expected one or more of: {', '.join(VALID)})")
    names = list(dict.fromkeys(names))
    if len(names) > 1 and {"none", "all"} & set(names):
        alone = "none" if "none" in names else "all"
        raise ValueError(f"{alone!r} cannot be combined with other names, got: {' '.join(names)} (expected 'none', "
                         f"'all', or one or more of: {', '.join(INTEGRATIONS)})")
    if names == ["none"]:
        return []
    if names == ["all"]:
        return [name for name in INTEGRATIONS if _installed(name)]
    for name in names:
        if not _installed(name):
            raise ModuleNotFoundError(f"reporting to {name} needs the {name} package, which is not installed: "
                                      f"{INSTALL[name]}", name=name)
    return names


class Sink(Protocol):
    def log(self, step: int, metrics: dict[str, float]) -> None: ...

    def close(self) -> None: ...


def _hparam(value):
    """hparams take numbers, strings and bools; anything else (None, lists, paths) as its text."""
    return value if isinstance(value, (bool, int, float, str)) else str(value)


class TensorBoardSink:
    def __init__(self, log_dir: str | Path, run_config: dict | None = None, start_step: int = 0):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        # purge_step: TensorBoard hides this directory's earlier events from the resumed step on
        self.writer = SummaryWriter(str(log_dir), purge_step=start_step + 1 if start_step else None)
        if run_config and not start_step:  # once per run, not again on every resume
            text = json.dumps(run_config, indent=2, sort_keys=True, default=str)
            self.writer.add_text("run_config", f"```\n{text}\n```", 0)
            # add_hparams would write a second run in a sub-directory; these summaries go to this one
            for summary in hparams({k: _hparam(v) for k, v in run_config.items()}, {}):
                self.writer.file_writer.add_summary(summary)
        self.writer.flush()

    def log(self, step: int, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()  # on disk as soon as written, like the metrics.jsonl line: a killed run keeps it

    def close(self) -> None:
        self.writer.close()


class WandbSink:
    def __init__(self, output_dir: str | Path, run_config: dict | None = None):
        import wandb

        Path(output_dir).mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "sg_distributed"), config=run_config or {},
                              dir=str(output_dir))

    def log(self, step: int, metrics: dict[str, float]) -> None:
        self.run.log(dict(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def open_sinks(report_to: str | Iterable[str] | None, output_dir: str | Path, run_config: dict | None = None, *,
               tensorboard_dir: str | Path | None = None, start_step: int = 0) -> list[Sink]:
    """One sink per integration of ``resolve_report_to(report_to)``; TensorBoard logs to ``tensorboard_dir``
    (default ``<output_dir>/runs``). ``none`` opens nothing and creates no file."""
    sinks: list[Sink] = []
    try:
        for name in resolve_report_to(report_to):
            if name == "tensorboard":
                sinks.append(TensorBoardSink(tensorboard_dir or Path(output_dir) / "runs", run_config, start_step))
            else:
                sinks.append(WandbSink(output_dir, run_config))
    except BaseException:
        for sink in sinks:  # the ones already open (a wandb.init that fails leaves no writer behind)
            sink.close()
        raise
    return sinks
