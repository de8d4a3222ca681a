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
import json
import re
import sys
import time
from pathlib import Path

import torch
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


def run(model_name: str, steps: int, calibration_steps: int, micro_batch: int, seq: int, solver: str,
        quantize: str | None = None) -> dict:
    meta, overrides = build_meta_model(model_name)
    predicted = estimate(meta, "sparsegrad", p=1, zero=2, dtype="bf16", micro_batch_size=micro_batch, seq=seq,
                         solver=solver, base_quant=quantize, **overrides)
    vocab = meta.config.vocab_size
    row = {"model": model_name, "params": predicted["model_params"], "matrices": predicted["matrices"],
           "k_total": predicted["k_total"], "micro_batch": micro_batch, "seq": seq, "base": quantize or "bf16",
           "calibration_steps": calibration_steps, "steps": steps, "solver": solver}
    if quantize:
        from sg_distributed.quant import log_bnb_casts_once

        log_bnb_casts_once()

    reset_peak()
    t0 = time.perf_counter()
    base = rss_bytes()
    model = materialise(meta, torch.bfloat16, quantize=quantize)
    row["load_s"] = time.perf_counter() - t0
    row["load_peak_GB"] = (rss_bytes("VmHWM") - base) / GB
    row["load_predicted_GB"] = predicted["weights"] / GB
    print(f"load: {row['load_s']:.0f}s, peak {row['load_peak_GB']:.2f} GB above the start "
          f"(estimator: weights {row['load_predicted_GB']:.2f} GB)", flush=True)

    config = SparseGradConfig(calibration_steps=calibration_steps, **overrides)
    peft_model = get_sparsegrad_model(model, config)
    loaded = rss_bytes()
    reset_peak()
    t0 = time.perf_counter()
    peft_model.calibrate(lm_batches(calibration_steps, micro_batch, seq, vocab), show_progress=True)
    row["calibrate_s"] = time.perf_counter() - t0
    row["calibrate_peak_above_weights_GB"] = (rss_bytes("VmHWM") - loaded) / GB
    row["calibrate_predicted_GB"] = predicted["calibration_memory"] / GB
    row["calibrate_predicted_phase"] = predicted["calibration_peak_phase"]
    print(f"calibrate: {row['calibrate_s']:.0f}s, peak {row['calibrate_peak_above_weights_GB']:.2f} GB above the "
          f"loaded model (estimator: {row['calibrate_predicted_GB']:.2f} GB, peak in its "
          f"'{row['calibrate_predicted_phase']}' phase)", flush=True)

    params = peft_model.trainable_parameters()
    optimizer = torch.optim.AdamW(params, lr=1e-3)
    calibrated = rss_bytes()
    reset_peak()
    times = []
    for batch in lm_batches(steps, micro_batch, seq, vocab, seed=2):
        t0 = time.perf_counter()
        peft_model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    row["step_s"] = sorted(times)[len(times) // 2]
    row["s_per_token"] = row["step_s"] / (micro_batch * seq)
    row["step_peak_above_calibrated_GB"] = (rss_bytes("VmHWM") - calibrated) / GB
    # on the host the estimator's per-device figures move: the bases' float32 masters are kept from calibration
    # on, and their compute copy (b bytes per value) is made at the first step's forward
    compute_copy = DTYPE_BYTES["bf16"] * predicted["bases_numel"]
    row["step_predicted_GB"] = (predicted["gradients"] + predicted["optimizer"] + predicted["activations"]
                                + compute_copy) / GB
    row["trainable"] = sum(p.numel() for p in params)
    row["buffers_GB"] = (calibrated - loaded) / GB
    row["buffers_predicted_GB"] = (predicted["buffers"] - compute_copy + 4 * predicted["bases_numel"]) / GB
    print(f"step: {row['step_s']:.2f}s median of {steps} ({row['s_per_token'] * 1e3:.1f} ms/token), peak "
          f"{row['step_peak_above_calibrated_GB']:.2f} GB above the calibrated model (estimator: gradients + "
          f"optimizer + activations + the bases' bf16 copy {row['step_predicted_GB']:.2f} GB); bases and supports kept "
          f"after calibration {row['buffers_GB']:.2f} GB (estimator: buffers with the bases as float32 masters "
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
    p.add_argument("--out", default="benchmarks/results/scale.jsonl")
    args = p.parse_args(argv)
    if args.solver == "syevd":
        from sg_distributed.sparsegrad import basis

        basis._scipy_eigh = lambda: None
    row = run(args.model, args.steps, args.calibration_steps, args.micro_batch_size, args.seq, args.solver,
              args.quantize)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
