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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # random token batches: the suite's lm_batches

from sg_distributed import SparseGradConfig, get_sparsegrad_model  # noqa: E402
from sg_distributed.tools.estimate import build_meta_model, estimate  # noqa: E402

from conftest import lm_batches  # noqa: E402

GB = 1e9


def rss_bytes(field: str = "VmRSS") -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def materialise(meta_model, dtype: torch.dtype, seed: int = 0):
    """The meta module tree in real memory: random N(0, 0.02) weights, ones for norms, rotary buffers recomputed."""
    model = meta_model.to_empty(device="cpu").to(dtype)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=gen)
        for module in model.modules():  # rotary inv_freq was on meta too
            if hasattr(module, "rope_init_fn") and hasattr(module, "inv_freq"):
                inv_freq, _ = module.rope_init_fn(module.config, "cpu")
                module.inv_freq.copy_(inv_freq)
                if hasattr(module, "original_inv_freq"):
                    module.original_inv_freq = inv_freq
    return model


def run(model_name: str, steps: int, calibration_steps: int, micro_batch: int, seq: int, solver: str) -> dict:
    meta, overrides = build_meta_model(model_name)
    predicted = estimate(meta, "sparsegrad", p=1, zero=2, dtype="bf16", micro_batch_size=micro_batch, seq=seq,
                         solver=solver, **overrides)
    vocab = meta.config.vocab_size
    row = {"model": model_name, "params": predicted["model_params"], "matrices": predicted["matrices"],
           "k_total": predicted["k_total"], "micro_batch": micro_batch, "seq": seq,
           "calibration_steps": calibration_steps, "steps": steps, "solver": solver}

    reset_peak()
    t0 = time.perf_counter()
    base = rss_bytes()
    model = materialise(meta, torch.bfloat16)
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
    row["step_predicted_GB"] = (predicted["gradients"] + predicted["optimizer"] + predicted["activations"]) / GB
    row["trainable"] = sum(p.numel() for p in params)
    row["buffers_GB"] = (calibrated - loaded) / GB
    row["buffers_predicted_GB"] = predicted["buffers"] / GB
    print(f"step: {row['step_s']:.2f}s median of {steps} ({row['s_per_token'] * 1e3:.1f} ms/token), peak "
          f"{row['step_peak_above_calibrated_GB']:.2f} GB above the calibrated model (estimator: gradients + "
          f"optimizer + activations {row['step_predicted_GB']:.2f} GB); bases and supports kept after calibration "
          f"{row['buffers_GB']:.2f} GB (estimator: buffers {row['buffers_predicted_GB']:.2f} GB)", flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-2-7b", help="llama-2-7b, llama-2-13b (needs a quantized base: not "
                   "built here yet), smollm2, or a config.json")
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
    row = run(args.model, args.steps, args.calibration_steps, args.micro_batch_size, args.seq, args.solver)
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as handle:
        handle.write(json.dumps(row) + "\n")
    print(json.dumps(row))
    return 0


if __name__ == "__main__":
    sys.exit(main())
