"""Command-line arguments checked before any work starts.

``ArgumentParser`` exits with code 1 (not argparse's 2) and no traceback: every error names the flag and what
would be valid, in the ``SystemExit`` itself (Python prints it), so an in-process caller can read it too. The ``type=`` functions below check a value's range as argparse converts it; ``check_paths``
checks the path flags of a parsed namespace. Shared by ``launch/train_qa.py`` and the Trainer / TRL examples.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Callable, NoReturn

class ArgumentParser(argparse.ArgumentParser):
    """argparse with exit code 1 on a bad argument (the launch scripts' code for bad input)."""

    def error(self, message: str) -> NoReturn:
        self.print_usage(sys.stderr)
        raise SystemExit(f"{self.prog}: error: {message}")  # a str exit status: printed, exit code 1


def _number(kind: type, test: Callable[[float], bool], valid: str) -> Callable[[str], float]:
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {'an integer' if kind is int else 'a number'} "
                                             f"(expected {valid})") from None
        if isinstance(value, float) and not math.isfinite(value) or not test(value):
            raise argparse.ArgumentTypeError(f"{text} is out of range (expected {valid})")
        return value

    convert.__name__ = valid  # argparse names the type in some messages
    return convert


positive_int = _number(int, lambda v: v >= 1, "an integer >= 1")
non_negative_int = _number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = _number(float, lambda v: v > 0, "a number > 0")
non_negative_float = _number(float, lambda v: v >= 0, "a number >= 0")
fraction = _number(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
probability_below_one = _number(float, lambda v: 0 <= v < 1, "a number in [0, 1)")
open_fraction = _number(float, lambda v: 0 < v < 1, "a number in (0, 1)")


def at_least(minimum: int) -> Callable[[str], int]:
    return _number(int, lambda v: v >= minimum, f"an integer >= {minimum}")


def check_paths(parser: argparse.ArgumentParser, args: argparse.Namespace, *, files: tuple[str, ...] = (),
                dirs: tuple[str, ...] = ()) -> None:
    """Every given path flag must exist: ``files`` name files, ``dirs`` directories (attribute names)."""
    for name, want_dir in [(n, False) for n in files] + [(n, True) for n in dirs]:
        value = getattr(args, name, None)
        if value is None:
            continue
        path = Path(value)
        flag = "--" + name
        if not path.exists():
            parser.error(f"argument {flag}: {value} does not exist")
        if want_dir and not path.is_dir():
            parser.error(f"argument {flag}: {value} is not a directory")
        if not want_dir and not path.is_file():
            parser.error(f"argument {flag}: {value} is not a file")


DATASET_ONLY = ("question_column", "answer_column", "context_column", "group_column", "eval_split")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The data flags the launch scripts share: FanOutQA (embedded, or ``--data``) or any ``--dataset``
    (``sg_distributed.data.sources.load_pairs`` reads them)."""
    data = parser.add_mutually_exclusive_group()
    data.add_argument("--data", help="FanOutQA-format JSON (default: the fanoutqa package's dev set)")
    data.add_argument("--dataset", help="any QA / chat data through datasets: a .json/.jsonl/.csv/.parquet file, a "
                      "save_to_disk folder, a folder of data files or a hub name (online); see --question_column ...")
    parser.add_argument("--question_column", help="--dataset: the question column (default: question, prompt or "
                        "instruction, whichever exists); without one, a 'messages' column of chat turns is used")
    parser.add_argument("--answer_column", help="--dataset: the answer column (default: answer, completion or output)")
    parser.add_argument("--context_column", help="--dataset: a column put before the question (e.g. Alpaca's input)")
    parser.add_argument("--messages_column", default="messages", help="--dataset: the chat column (the last "
                        "assistant turn is the answer; earlier turns are the prompt)")
    parser.add_argument("--system_prompt", help="a system turn for every example (chat rows with their own keep it)")
    parser.add_argument("--group_column", help="--dataset: rows with the same value stay on one side of the held-out "
                        "split")
    parser.add_argument("--eval_split", help="--dataset: the held-out split's name (default: --eval_fraction of train)")
    parser.add_argument("--eval_fraction", type=open_fraction, default=0.2,
                        help="share of the training rows (or groups) held out when there is no --eval_split")


def check_data_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    check_paths(parser, args, files=("data",))
    given = [f"--{name}" for name in DATASET_ONLY if getattr(args, name) is not None]
    if given and args.dataset is None:
        parser.error(f"argument {given[0]}: applies to --dataset, which is not given")


class _ReportTo(argparse.Action):
    """Checks the whole list at parse time (names, 'none'/'all' alone, the package installed), so a typo or a
    missing package stops the run before any model loads; stores the names as given."""

    def __call__(self, parser, namespace, values, option_string=None):
        from sg_distributed.training.reporting import resolve_report_to

        try:
            resolve_report_to(values)
        except (ValueError, ImportError) as err:
            raise argparse.ArgumentError(self, str(err)) from None
        setattr(namespace, self.dest, values)


def add_reporting_arguments(parser: argparse.ArgumentParser) -> None:
    """``--report_to`` as in the HF Trainer (``training/reporting.py`` ``resolve_report_to`` turns it into the
    integrations to open)."""
    parser.add_argument("--report_to", nargs="+", default=["none"], action=_ReportTo, metavar="NAME",
                        help="where metrics go besides the output directory's files: none (default), tensorboard "
                        "(<output_dir>/runs), wandb (when installed; WANDB_PROJECT, WANDB_MODE=offline), or all "
                        "(those installed)")


def add_resume_arguments(parser: argparse.ArgumentParser) -> None:
    """``--resume_from_checkpoint`` of the Trainer / TRL examples (``check_resume_argument`` resolves it)."""
    parser.add_argument("--resume_from_checkpoint", metavar="DIR|auto",
                        help="resume a Trainer run from a checkpoint-N directory (adapter, optimizer, LR schedule, "
                             "RNG and data position); \"auto\": the newest checkpoint-N in --output_dir, or a fresh "
                             "start when there is none")


def check_resume_argument(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Resolve ``args.resume_from_checkpoint`` to a checkpoint directory or None: ``auto`` takes the newest
    ``checkpoint-N`` in ``args.output_dir`` (None, with a message, when there is none); a given directory must
    be a Trainer checkpoint holding the SparseGrad adapter its k-vectors were trained with."""
    value = args.resume_from_checkpoint
    if value is None:
        return
    if value == "auto":
        import os

        from transformers.trainer_utils import get_last_checkpoint

        found = get_last_checkpoint(args.output_dir) if Path(args.output_dir).is_dir() else None
        if found is None and int(os.environ.get("RANK", "0")) == 0:
            print(f"--resume_from_checkpoint auto: no checkpoint-N in {args.output_dir}; starting fresh", flush=True)
        args.resume_from_checkpoint = found
        if found is None:
            return
    check_paths(parser, args, dirs=("resume_from_checkpoint",))
    missing = [name for name in ("trainer_state.json", "adapter_config.json")
               if not (Path(args.resume_from_checkpoint) / name).is_file()]
    if missing:
        parser.error(f"argument --resume_from_checkpoint: {args.resume_from_checkpoint} has no {missing[0]} "
                     f"(expected a Trainer checkpoint-N directory of a SparseGrad run)")
