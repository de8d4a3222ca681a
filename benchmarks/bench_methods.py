#!/usr/bin/env python
"""Step time, peak memory, trainable parameters and optimizer-state bytes of every method, side by side.

Each method runs in its own subprocess (so peak RSS is its own), all in one invocation, in rounds
that interleave the methods (the machine is noisy). Ratios are to LoRA with the same trainable budget.

    .venv/bin/python benchmarks/bench_methods.py                 # SmolLM2-135M on FanOutQA batches
    .venv/bin/python benchmarks/bench_methods.py --model llama-shaped --steps 4   # no assets needed
    .venv/bin/python benchmarks/bench_methods.py --precision fp32,bf16              # bf16 weights beside fp32

``--precision bf16`` loads the model in bf16 (SparseGrad's k-vectors and basis masters stay fp32; LoRA's
adapters are fp32 in peft); every ratio is to LoRA at the same precision, and ``x fp32`` compares a method
with itself in fp32 when both precisions run.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = {
    "full": ("full", {}),
    "lora": ("lora", {}),
    "sparsegrad": ("sparsegrad", {"max_rows": 0.25, "max_cols": 0.25}),
    "sparsegrad_b125": ("sparsegrad", {"max_rows": 0.125, "max_cols": 0.125}),  # half the rotated products
    "sparsegrad_balanced": ("sparsegrad", {"max_rows": 0.25, "max_cols": 0.25, "budget_axes": "balanced"}),
    "sparsegrad_scored": ("sparsegrad", {"max_rows": 0.25, "max_cols": 0.25, "budget_block": "scored"}),
    "sparsegrad_nobudget": ("sparsegrad", {"max_rows": None, "max_cols": None}),  # CSR kernels
    # swaps every 3 steps: with --steps 6 two swaps fall in the timed steps (pessimistic vs N = 10+)
    "sparsegrad_reselect": ("sparsegrad", {"max_rows": 0.25, "max_cols": 0.25, "reselect_every": 3}),
    "meprop": ("meprop", {}),
    "graddrop": ("graddrop", {}),
}


def status_mib(field: str) -> float:
    """VmRSS (now) or VmHWM (peak since start or since reset_peak) of this process, in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> None:
    """Linux: return freed heap to the OS, then make VmHWM restart from the current RSS, so training's
    peak is not calibration's."""
    import ctypes

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_model(name: str, precision: str = "fp32"):
    import torch

    model, tokenizer = _build_model(name)
    return model.to({"fp32": torch.float32, "bf16": torch.bfloat16}[precision]), tokenizer


def _build_model(name: str):
    import torch

    if name == "smollm2":
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from sg_distributed.data.assets import smollm2_dir

        path = smollm2_dir()
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), AutoTokenizer.from_pretrained(path)
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)  # SmolLM2-135M's shape, random weights
    config = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)
    return LlamaForCausalLM(config), None


def make_batches(tokenizer, n: int, micro: int, seq: int):
    import torch

    if tokenizer is not None:
        from sg_distributed.data.qa import QACollator, load_qa_pairs

        pairs = load_qa_pairs()
        collate = QACollator(tokenizer, max_length=seq)
        return [collate(pairs[i * micro:(i + 1) * micro]) for i in range(n)]
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n):
        ids = torch.randint(0, 49152, (micro, seq), generator=g)
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()})
    return out


def optimizer_state_bytes(optimizer) -> int:
    import torch

    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if torch.is_tensor(t) and t.dim() > 0)


def worker(args) -> dict:
    import torch

    from sg_distributed import SparseGradConfig
    from sg_distributed.training.methods import prepare
    from sg_distributed.sparsegrad.targets import find_target_linears

    torch.manual_seed(0)
    method, overrides = VARIANTS[args.worker]
    model, tokenizer = build_model(args.model, args.precision)
    batches = make_batches(tokenizer, args.calibration_steps + args.warmup + args.steps, args.micro_batch_size, args.seq)
    config = SparseGradConfig(density=args.density, calibration_steps=args.calibration_steps, **overrides)
    targets = find_target_linears(model, config.target_modules)
    dense_adam_bytes = sum(2 * m.weight.numel() * 4 for m in targets.values())
    lora_rank = None
    if method == "lora":  # rank matched to SparseGrad's trainable count
        from sg_distributed.training.methods import matched_lora_rank

        lora_rank = matched_lora_rank(model, config)
    rss_loaded = status_mib("VmRSS")
    t0 = time.perf_counter()
    prepared = prepare(method, model, config, calibration_batches=batches[: args.calibration_steps],
                       lora_rank=lora_rank)
    calibration_s = time.perf_counter() - t0
    calibration_peak = status_mib("VmHWM")
    reset_peak()
    optimizer = prepared.make_optimizer(1e-4)
    times = []
    for i, batch in enumerate(batches[args.calibration_steps:]):
        t0 = time.perf_counter()
        loss = prepared.model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        prepared.after_step()
        if i >= args.warmup:
            times.append(time.perf_counter() - t0)
    peak = status_mib("VmHWM")
    index_bytes = sum(b.numel() * b.element_size() for n, b in prepared.model.named_buffers() if n.endswith("support_flat"))
    return {"variant": args.worker, "precision": args.precision, "step_s": statistics.median(times), "peak_rss_mib": peak,
            "peak_over_loaded_mib": peak - rss_loaded, "trainable": prepared.trainable_count(),
            "opt_state_bytes": optimizer_state_bytes(optimizer), "dense_adam_bytes": dense_adam_bytes,
            "support_index_bytes": index_bytes, "calibration_s": calibration_s, "lora_rank": lora_rank,
            "calibration_peak_over_loaded_mib": calibration_peak - rss_loaded,
            "train_step_fraction_calibration": calibration_s / statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=["smollm2", "llama-shaped"], default="smollm2")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--precision", default="fp32", help="comma-separated weight dtypes to compare: fp32, bf16")
    p.add_argument("--rounds", type=int, default=2, help="interleaved repetitions; the median is reported")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--calibration_steps", type=int, default=4)
    p.add_argument("--out", default="benchmarks/results/methods.json")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        Path(args.worker_out).write_text(json.dumps(worker(args)))
        return

    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    variants = args.variants.split(",")
    precisions = args.precision.split(",")
    unknown = [p for p in precisions if p not in ("fp32", "bf16")] + [v for v in variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"error: unknown precision/variant {unknown}; precisions: fp32, bf16; variants: {list(VARIANTS)}")
    runs: dict[tuple[str, str], list[dict]] = {(v, prec): [] for prec in precisions for v in variants}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for r in range(args.rounds):
        for v, prec in runs:
            tmp = out.with_suffix(f".{v}.{prec}.tmp.json")
            cmd = [sys.executable, __file__, "--worker", v, "--worker_out", str(tmp), f"--precision={prec}"] + [
                f"--{k}={getattr(args, k)}" for k in ("model", "steps", "warmup", "micro_batch_size", "seq",
                                                      "density", "calibration_steps")]
            print(f"round {r + 1}/{args.rounds}: {v} {prec}", file=sys.stderr, flush=True)
            subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
            runs[v, prec].append(json.loads(tmp.read_text()))
            tmp.unlink()

    rows = {key: {k: (statistics.median(r[k] for r in rs) if isinstance(rs[0][k], (int, float)) and rs[0][k] is not None
                      else rs[0][k]) for k in rs[0]} for key, rs in runs.items()}
    print(f"\nmodel {args.model}, micro batch {args.micro_batch_size} x seq {args.seq}, density {args.density}, "
          f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}, medians of {args.rounds} rounds\n")
    header = ("| method | precision | trainable | step s | x LoRA | x fp32 | training peak RSS MiB | peak over loaded MiB | "
              "x LoRA | opt state MiB | % of dense AdamW (targets) | calibration s (= steps) | "
              "calibration peak over loaded MiB |")
    print(header)
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    nan = float("nan")
    for (v, prec), row in rows.items():
        lora, fp32 = rows.get(("lora", prec)), rows.get((v, "fp32"))
        ratio_t = row["step_s"] / lora["step_s"] if lora else nan
        ratio_m = row["peak_over_loaded_mib"] / lora["peak_over_loaded_mib"] if lora else nan
        vs_fp32 = row["step_s"] / fp32["step_s"] if fp32 else nan
        print(f"| {v} | {prec} | {row['trainable']:,.0f} | {row['step_s']:.3f} | {ratio_t:.2f} | {vs_fp32:.2f} | "
              f"{row['peak_rss_mib']:.0f} | {row['peak_over_loaded_mib']:.0f} | {ratio_m:.2f} | "
              f"{row['opt_state_bytes'] / 2**20:.2f} | {100 * row['opt_state_bytes'] / row['dense_adam_bytes']:.2f}% | "
              f"{row['calibration_s']:.1f} ({row['train_step_fraction_calibration']:.0f}) | "
              f"{row['calibration_peak_over_loaded_mib']:.0f} |")
    out.write_text(json.dumps({"args": vars(args), "rows": list(rows.values()),
                               "runs": [r for rs in runs.values() for r in rs]}, indent=2))
    print(f"\nraw results: {out}")


if __name__ == "__main__":
    main()
