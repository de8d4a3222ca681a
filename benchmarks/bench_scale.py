#!/usr/bin/env python
"""LLaMA-2-7B / 13B shapes with real memory on this machine: peak RSS per phase next to the estimator's figure.

One process, random weights in bf16 (the module tree of the real config, built on ``meta`` and materialised;
nothing is downloaded), the paper preset (up/down of every 3rd block, k per matrix from
``sg_distributed.tools.presets``) through the peft route: ``get_sparsegrad_model`` -> ``calibrate`` -> AdamW on
the k-vectors. Each phase starts with the kernel's peak-RSS counter reset (``/proc/self/clear_refs``), so its
peak is its own:

* load: the weights (estimator: ``weights``);
* calibrate: the peak above the loaded model (estimator: ``calibration_memory``, at its peak phase);
* step: the peak of a training step above the calibrated model (estimator: gradients + optimizer state +
  activations);

and seconds per token of a step, next to the same run on SmolLM2-135M's shape, to put CPU figures in scale.

    python benchmarks/bench_scale.py --model llama-2-7b            # ~7 min, 19 GB peak
    python benchmarks/bench_scale.py --model smollm2 --steps 3     # seconds

Not in CI (too long). Never run two 7B-shaped jobs at once on a 24 GB machine.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # random token batches: the suite's lm_batches

from sg_distributed import SparseGradConfig, get_sparsegrad_model  # noqa: E402
from sg_distributed.tools.estimate import DTYPE_BYTES, build_meta_model, estimate  # noqa: E402

from conftest import lm_batches  # noqa: E402

GB = 1e9


def rss_bytes(field: str = "VmRSS") -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def release_free_heap() -> int:
    """glibc's malloc_trim(0): give the free heap pages back to the kernel; the RSS after it."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    return rss_bytes()


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def materialise(meta_model, dtype: torch.dtype, seed: int = 0, quantize: str | None = None,
                quant_storage: torch.dtype = torch.uint8):
    """The meta module tree in real memory, one tensor at a time: random N(0, 0.02) weights, ones for norms,
    rotary buffers recomputed. ``quantize`` ("8bit" / "4bit"): every linear but the output head becomes a
    bitsandbytes Linear8bitLt / Linear4bit (nf4 packed into ``quant_storage`` words), each quantised from its own
    random bf16 weight as soon as that is drawn, so the whole float model never exists (13B in bf16 is 26 GB)."""
    from sg_distributed.tools.estimate import quantized_linears

    gen = torch.Generator().manual_seed(seed)
    if quantize:
        for name in quantized_linears(meta_model):
            parent, _, child = name.rpartition(".")
            setattr(meta_model.get_submodule(parent), child,
                    _quantized_linear(meta_model.get_submodule(name), dtype, quantize, quant_storage, gen))
    with torch.no_grad():
        for module_name, module in meta_model.named_modules():
            for name, param in list(module.named_parameters(recurse=False)):
                if not param.is_meta:  # a quantised weight
                    continue
                value = torch.empty(param.shape, dtype=dtype)
                value.fill_(1.0) if "norm" in f"{module_name}.{name}" else value.normal_(0.0, 0.02, generator=gen)
                setattr(module, name, nn.Parameter(value, requires_grad=param.requires_grad))
            for name, buffer in list(module.named_buffers(recurse=False)):
                if buffer.is_meta:
                    module.register_buffer(name, torch.zeros(buffer.shape, dtype=buffer.dtype),
                                           persistent=name not in module._non_persistent_buffers_set)
            if hasattr(module, "rope_init_fn") and hasattr(module, "inv_freq"):  # rotary inv_freq was on meta too
                inv_freq, _ = module.rope_init_fn(module.config, "cpu")
                module.inv_freq.copy_(inv_freq)
                if hasattr(module, "original_inv_freq"):
                    module.original_inv_freq = inv_freq
    return meta_model


def _quantized_linear(linear: nn.Linear, dtype: torch.dtype, quantize: str, quant_storage: torch.dtype, gen):
    import bitsandbytes as bnb

    from sg_distributed.quant import keep_cpu_nf4_trainable

    weight = torch.empty(linear.out_features, linear.in_features, dtype=dtype).normal_(0.0, 0.02, generator=gen)
    with torch.device("meta"):
        if quantize == "8bit":
            layer = bnb.nn.Linear8bitLt(linear.in_features, linear.out_features, bias=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=False, compute_dtype=dtype,
                                      quant_type="nf4", quant_storage=quant_storage, compress_statistics=False)
    if quantize == "8bit":
        layer.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False).to("cpu")
    else:
        layer.weight = bnb.nn.Params4bit(weight, requires_grad=False, quant_type="nf4", quant_storage=quant_storage,
                                         compress_statistics=False, module=layer).to("cpu")
    keep_cpu_nf4_trainable(layer)
    return layer


def with_adapter(model, calibration_steps: int, overrides: dict):
    """The SparseGrad peft model of ``model`` (the preset's layers and k) and AdamW on its k-vectors."""
    peft_model = get_sparsegrad_model(model, SparseGradConfig(calibration_steps=calibration_steps, **overrides))
    return peft_model, torch.optim.AdamW(peft_model.trainable_parameters(), lr=1e-3)


def warm_up(peft_model, batch) -> None:
    """One forward/backward as calibration runs it (frozen model, adapters passed through, no hooks): what it
    leaves resident (freed activations glibc keeps, kernels' caches) is the floor of every later phase, which a
    model of tensor bytes does not see."""
    from sg_distributed.sparsegrad.gradient_tap import gradients_flowing

    layers = peft_model.sparsegrad_layers()
    for layer in layers.values():
        layer.passthrough = True
    try:
        with gradients_flowing(peft_model.model, {name: layer.base_layer for name, layer in layers.items()}):
            peft_model(**batch).loss.backward()
    finally:
        for layer in layers.values():
            layer.passthrough = False


def zero3_config(model, micro_batch: int) -> dict:
    """ds_configs/zero3.json with its "auto" values filled for this model, bf16, one micro-batch per step, and every
    gathered parameter released after use: the shipped 1e9 live parameters / reuse distance keep up to 2 GB of a
    7B model's bf16 weights gathered per rank, and two such ranks ran out of this machine's 24 GB at the first
    training step (rank 1 OOM-killed at 12.3 GB)."""
    from sg_distributed.integrations.deepspeed import load_ds_config, resolve_auto

    cfg = resolve_auto(load_ds_config(ROOT / "ds_configs" / "zero3.json"), world_size=dist.get_world_size(),
                       micro_batch_size=micro_batch, gradient_accumulation_steps=1, max_grad_norm=None,
                       hidden_size=model.config.hidden_size, precision="bf16", model=model)
    cfg["zero_optimization"].update(stage3_max_live_parameters=0, stage3_max_reuse_distance=0)
    return cfg


def run(model_name: str, steps: int, calibration_steps: int, micro_batch: int, seq: int, solver: str,
        quantize: str | None = None, engine: str = "none") -> dict:
    """One rank's figures (each rank of a torchrun group measures its own process)."""
    world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
    meta, overrides = build_meta_model(model_name)
    sharded = engine in ("zero3", "fsdp2")
    predicted = estimate(meta, "sparsegrad", p=world, zero=3 if sharded else 2, dtype="bf16",
                         micro_batch_size=micro_batch, seq=seq, solver=solver, base_quant=quantize,
                         shard_quantized=engine == "fsdp2" and quantize == "4bit",
                         persistence_threshold=0 if engine == "fsdp2" else None, **overrides)
    vocab = meta.config.vocab_size
    row = {"model": model_name, "params": predicted["model_params"], "matrices": predicted["matrices"],
           "k_total": predicted["k_total"], "micro_batch": micro_batch, "seq": seq, "base": quantize or "bf16",
           "engine": engine, "ranks": world, "rank": rank, "calibration_steps": calibration_steps, "steps": steps,
           "solver": solver}
    say = print if rank == 0 else (lambda *a, **k: None)
    if quantize:
        from sg_distributed.quant import log_bnb_casts_once

        log_bnb_casts_once()

    reset_peak()
    t0 = time.perf_counter()
    base = rss_bytes()
    if engine == "zero3":  # each module partitioned as soon as it is built: no rank ever holds the whole model
        import deepspeed

        from transformers import AutoModelForCausalLM

        with deepspeed.zero.Init(config_dict_or_path=zero3_config(meta, micro_batch), dtype=torch.bfloat16):
            model = AutoModelForCausalLM.from_config(meta.config, dtype=torch.bfloat16)  # torch's default init
    else:  # FSDP2 shards a 4-bit base packed into bf16 words (FSDP-QLoRA); each rank first builds it whole
        # (one rank at a time under FSDP2: two whole 13B nf4 builds with their temporaries do not fit in 24 GB)
        for turn in range(world if engine == "fsdp2" else 1):
            if turn == rank or engine != "fsdp2":
                model = materialise(meta, torch.bfloat16, quantize=quantize,
                                    quant_storage=torch.bfloat16 if engine == "fsdp2" else torch.uint8)
                row["load_s"] = time.perf_counter() - t0
                row["load_peak_GB"] = (rss_bytes("VmHWM") - base) / GB
                peft_model, optimizer = with_adapter(model, calibration_steps, overrides)
                if engine == "fsdp2":
                    from sg_distributed.integrations.fsdp import apply_fsdp2

                    apply_fsdp2(peft_model, optimizer=optimizer)
                    gc.collect()
                    release_free_heap()
            if engine == "fsdp2":
                dist.barrier()
    row.setdefault("load_s", time.perf_counter() - t0)
    row.setdefault("load_peak_GB", (rss_bytes("VmHWM") - base) / GB)
    row["load_predicted_GB"] = predicted["weights"] / GB
    say(f"load: {row['load_s']:.0f}s, peak {row['load_peak_GB']:.2f} GB above the start on rank 0 "
        f"(estimator: weights per rank {row['load_predicted_GB']:.2f} GB)", flush=True)

    if engine == "zero3":
        from sg_distributed.integrations.deepspeed import initialize_engine

        peft_model, optimizer = with_adapter(model, calibration_steps, overrides)
        # resolved again on the adapter model: its k-vectors stay whole on every rank (persistence threshold >= k)
        wrapped = initialize_engine(peft_model, optimizer, zero3_config(peft_model, micro_batch))
    else:
        wrapped = peft_model
    gc.collect()
    row["weights_held_GB"] = (rss_bytes() - base) / GB  # what the rank keeps once its engine holds its shard
    loaded = release_free_heap()  # the quantisation's temporaries leave freed heap behind: not the weights'
    row["weights_held_after_malloc_trim_GB"] = (loaded - base) / GB
    say(f"{'after sharding, ' if engine != 'none' else ''}rank 0 holds {row['weights_held_GB']:.2f} GB, "
        f"{row['weights_held_after_malloc_trim_GB']:.2f} GB once glibc returned its free heap", flush=True)

    batches = lm_batches(calibration_steps, micro_batch, seq, vocab)[rank::world]  # the ranks share the batches
    warm_up(peft_model, batches[0])
    gc.collect()
    row["warm_up_GB"] = (rss_bytes() - loaded) / GB
    say(f"one plain forward/backward leaves {row['warm_up_GB']:.2f} GB more resident on rank 0", flush=True)
    reset_peak()
    t0 = time.perf_counter()
    peft_model.calibrate(batches, steps=len(batches), show_progress=rank == 0)
    row["calibrate_s"] = time.perf_counter() - t0
    row["calibrate_peak_above_weights_GB"] = (rss_bytes("VmHWM") - loaded) / GB
    row["calibrate_peak_above_warm_GB"] = row["calibrate_peak_above_weights_GB"] - row["warm_up_GB"]
    row["calibrate_predicted_GB"] = predicted["calibration_memory"] / GB
    row["calibrate_predicted_phase"] = predicted["calibration_peak_phase"]
    say(f"calibrate: {row['calibrate_s']:.0f}s, peak {row['calibrate_peak_above_weights_GB']:.2f} GB above the "
        f"loaded model on rank 0, {row['calibrate_peak_above_warm_GB']:.2f} GB above the warmed-up one "
        f"(estimator: {row['calibrate_predicted_GB']:.2f} GB, peak in its "
        f"'{row['calibrate_predicted_phase']}' phase)", flush=True)

    params = peft_model.trainable_parameters()
    calibrated_before_trim = rss_bytes()
    calibrated = release_free_heap()
    row["buffers_after_malloc_trim_GB"] = (calibrated - loaded) / GB  # how much of it is freed heap
    reset_peak()
    times = []
    for batch in lm_batches(steps * world, micro_batch, seq, vocab, seed=2)[rank::world]:
        t0 = time.perf_counter()
        loss = wrapped(**batch).loss
        if engine == "zero3":
            wrapped.backward(loss)
            wrapped.step()
        else:
            loss.backward()
            if engine == "fsdp2":
                from sg_distributed.integrations.fsdp import sync_replicated_grads

                sync_replicated_grads(peft_model)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    row["step_s"] = sorted(times)[len(times) // 2]
    row["s_per_token"] = row["step_s"] / (micro_batch * seq * world)
    row["step_peak_above_calibrated_GB"] = (rss_bytes("VmHWM") - calibrated) / GB
    # on the host the estimator's per-device figures move: the bases' float32 masters are kept from calibration
    # on, and their compute copy (b bytes per value) is made at the first step's forward
    compute_copy = DTYPE_BYTES["bf16"] * predicted["bases_numel"]
    row["step_predicted_GB"] = (predicted["gradients"] + predicted["optimizer"] + predicted["activations"]
                                + compute_copy) / GB
    row["trainable"] = sum(p.numel() for p in params)
    row["buffers_GB"] = (calibrated_before_trim - loaded) / GB
    row["buffers_predicted_GB"] = (predicted["buffers"] - compute_copy + 4 * predicted["bases_numel"]) / GB
    say(f"step: {row['step_s']:.2f}s median of {steps} ({row['s_per_token'] * 1e3:.1f} ms/token), peak "
        f"{row['step_peak_above_calibrated_GB']:.2f} GB above the calibrated model on rank 0 (estimator: gradients + "
        f"optimizer + activations + the bases' bf16 copy {row['step_predicted_GB']:.2f} GB); bases and supports "
        f"kept after calibration {row['buffers_GB']:.2f} GB, {row['buffers_after_malloc_trim_GB']:.2f} GB once glibc "
        f"returned its free heap (estimator: buffers with the bases as float32 masters "
        f"{row['buffers_predicted_GB']:.2f} GB)", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-2-7b", help="llama-2-7b, llama-2-13b (with --quantize on this 24 GB "
                   "machine), smollm2, or a config.json")
    p.add_argument("--quantize", choices=["8bit", "4bit"], help="a frozen bitsandbytes base: every linear but the "
                   "output head int8 or nf4, quantised as it is drawn")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--calibration_steps", type=int, default=2)
    p.add_argument("--micro_batch_size", type=int, default=1)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--solver", choices=["evr", "syevd"], default="evr",
                   help="host eigensolver of calibration: evr (the library's: LAPACK dsyevr in the Gram's memory) or "
                        "syevd (torch.linalg.eigh, what it used before and uses on CUDA), for a side-by-side")
    p.add_argument("--engine", choices=["none", "zero3", "fsdp2"], default="none",
                   help="zero3: DeepSpeed ZeRO-3, the bf16 base partitioned at build (zero.Init); fsdp2: FSDP2 over a "
                        "--quantize 4bit base packed into bf16 words, sharded. Both under torchrun, one rank per "
                        "process (gloo), each rank measuring its own memory")
    p.add_argument("--out", default="benchmarks/results/scale.jsonl")
    args = p.parse_args(argv)
    if args.solver == "syevd":
        from sg_distributed.sparsegrad import basis

        basis._scipy_eigh = lambda: None
    if args.engine != "none":
        if "WORLD_SIZE" not in os.environ:
            p.error(f"--engine {args.engine} runs one process per rank: launch it with torchrun --nproc_per_node 2")
        if args.engine == "fsdp2" and args.quantize == "8bit":
            p.error("--engine fsdp2 --quantize 8bit: FSDP2 keeps int8 weights whole on every rank (only a 4-bit base "
                    "packed into bf16 words is sharded): use --quantize 4bit")
        if args.engine == "zero3" and args.quantize:
            p.error("--engine zero3 builds a bf16 base partitioned by zero.Init; a quantised base is not partitioned")
        from sg_distributed.integrations.deepspeed import init_distributed

        init_distributed("gloo")
    row = run(args.model, args.steps, args.calibration_steps, args.micro_batch_size, args.seq, args.solver,
              args.quantize, args.engine)
    rows = [row]
    if dist.is_initialized():
        rows = [None] * dist.get_world_size()
        dist.all_gather_object(rows, row)
    if not dist.is_initialized() or dist.get_rank() == 0:
        out = ROOT / args.out
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as handle:
            for each in rows:
                handle.write(json.dumps(each) + "\n")
        for each in rows:
            print(json.dumps(each))
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
