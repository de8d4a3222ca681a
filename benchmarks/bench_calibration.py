#!/usr/bin/env python
"""What calibration costs: against the training run it precedes, and as the hidden size grows.

Part 1 (``--part run``): SmolLM2-135M-Instruct, FanOutQA batches (micro-batch 8 x 64 tokens), SparseGrad
defaults of launch/train_qa.py (density 1 %, max_rows = max_cols = 0.25). One process: wall time and
peak RSS of ``calibrate`` (``--calibration_steps`` batches: the Gram pass, eigh, then the scoring passes),
then ``--steps`` training steps (median step time after ``--warmup``) and their peak RSS (VmHWM reset
after calibration). Each peak is above the live memory before its phase (weights paged in by a first
forward, freed blocks returned to the OS by ``malloc_trim``). Printed: calibration time as a fraction of N training steps, N = 100 and 1000
(extrapolated from the measured median step time), and both peaks above the loaded model.

Part 2 (``--part synthetic``): HOSVD bases of S = 16 gradients of an m x n layer, each gradient given as
the factors of one micro-batch (dY: T x m, X: T x n, T = ``--tokens``), for (m, n) = (256, 688),
(512, 1376), (1024, 2752), (2048, 5504):

* ours (streaming Grams, ``sg_distributed.sparsegrad.basis.GramAccumulator.add_factors`` + ``bases()``): sum of
  G G^T and G^T G accumulated in float64 from the factors (O(m^2 + n^2) memory), then two ``eigh``.
* the authors' (stacked tensor): materialise every G_s = dY_s^T X_s in fp32, stack them (S x m x n) and
  take the left singular vectors of the two unfoldings (m x S n and n x S m) with
  ``torch.linalg.svd(full_matrices=False)``.

Each (method, size) runs in its own subprocess: time of the basis computation (factors are made
before the clock starts) and its peak RSS above the RSS just before it.

    .venv/bin/python benchmarks/bench_calibration.py                     # both parts
    .venv/bin/python benchmarks/bench_calibration.py --part synthetic --sizes 256x688,512x1376
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
sys.path.insert(0, str(ROOT / "benchmarks"))

SIZES = "256x688,512x1376,1024x2752,2048x5504"


from bench_methods import reset_peak, status_mib  # noqa: E402  (same /proc readings as the methods table)


# --------------------------------------------------------------------------------------------- part 1


def release_freed_memory() -> None:
    """Return the allocator's free blocks to the OS (glibc ``malloc_trim``), so RSS is live memory."""
    import ctypes

    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: RSS keeps the freed blocks, peaks are upper bounds
        pass


def run_worker(args) -> dict:
    import torch

    from bench_methods import build_model, make_batches
    from sg_distributed import SparseGradConfig, get_sparsegrad_model

    torch.manual_seed(0)
    model, tok = build_model("smollm2")
    batches = make_batches(tok, args.calibration_steps + args.warmup + args.steps, args.micro_batch_size, args.seq)
    config = SparseGradConfig(density=0.01, max_rows=0.25, max_cols=0.25, calibration_steps=args.calibration_steps)
    # Both peaks are taken above the live memory before their phase: the weights are paged in first (the
    # safetensors load maps them lazily, so the first forward would otherwise count the model), and freed
    # blocks are handed back to the OS (glibc keeps them: the training peak would start above calibration's).
    with torch.no_grad():
        model(**batches[0])
    release_freed_memory()
    reset_peak()
    rss0 = status_mib("VmRSS")
    t0 = time.perf_counter()
    wrapped = get_sparsegrad_model(model, config)
    wrapped.calibrate(batches[:args.calibration_steps])
    calib_s = time.perf_counter() - t0
    calib_peak = status_mib("VmHWM") - rss0
    release_freed_memory()
    reset_peak()
    rss1 = status_mib("VmRSS")
    opt = torch.optim.AdamW(wrapped.trainable_parameters(), lr=1e-2)
    times = []
    for i, batch in enumerate(batches[args.calibration_steps:]):
        t = time.perf_counter()
        wrapped(**batch).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= args.warmup:
            times.append(time.perf_counter() - t)
    return {"calibration_s": calib_s, "calibration_peak_mib": calib_peak, "step_s": statistics.median(times),
            "train_peak_mib": status_mib("VmHWM") - rss1, "loaded_rss_mib": rss0, "steps_timed": len(times)}


def report_run(r: dict, args) -> str:
    lines = [f"### Calibration vs training, SmolLM2-135M-Instruct, micro-batch {args.micro_batch_size} x {args.seq} "
             f"tokens, {args.calibration_steps} calibration batches, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
             "", "| quantity | value |", "|---|---:|",
             f"| calibration wall time | {r['calibration_s']:.1f} s |",
             f"| training step (median of {r['steps_timed']}) | {r['step_s']:.2f} s |",
             f"| calibration = training steps | {r['calibration_s'] / r['step_s']:.1f} |"]
    for n in (100, 1000):
        lines.append(f"| calibration / {n}-step run | {100 * r['calibration_s'] / (n * r['step_s']):.2f} % |")
    lines += [f"| peak RSS above the live memory before it, calibration | {r['calibration_peak_mib']:.0f} MiB |",
              f"| peak RSS above the live memory before it, training | {r['train_peak_mib']:.0f} MiB |",
              f"| calibration peak / training peak | {r['calibration_peak_mib'] / r['train_peak_mib']:.2f} |",
              f"| loaded model RSS | {r['loaded_rss_mib']:.0f} MiB |"]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- part 2


def synthetic_worker(args) -> dict:
    import torch

    from sg_distributed.sparsegrad.basis import GramAccumulator

    m, n = (int(v) for v in args.size.split("x"))
    g = torch.Generator().manual_seed(0)
    factors = [(torch.randn(args.tokens, m, generator=g), torch.randn(args.tokens, n, generator=g))
               for _ in range(args.S)]
    reset_peak()
    rss0 = status_mib("VmRSS")
    t0 = time.perf_counter()

    def give_up():  # report the peak so far and stop: the row says "> budget"
        Path(args.worker_out).write_text(json.dumps({"size": args.size, "method": args.method, "seconds": float("inf"),
                                                     "peak_mib": status_mib("VmHWM") - rss0, "timed_out": True,
                                                     "budget_s": args.timeout}))
        os._exit(0)

    import threading

    watchdog = threading.Timer(args.timeout, give_up)
    watchdog.daemon = True
    watchdog.start()
    if args.method == "streaming":
        acc = GramAccumulator(dtype=torch.float64)
        for dy, x in factors:
            acc.add_factors("mlp", dy, x)
        b = acc.bases()["mlp"]
        shape = (tuple(b.P.shape), tuple(b.R.shape))
    else:
        stack = torch.stack([dy.T @ x for dy, x in factors])  # S x m x n, fp32
        U1 = torch.linalg.svd(stack.permute(1, 0, 2).reshape(m, -1), full_matrices=False).U
        U2 = torch.linalg.svd(stack.permute(2, 0, 1).reshape(n, -1), full_matrices=False).U
        shape = (tuple(U1.shape), tuple(U2.shape))
    seconds = time.perf_counter() - t0
    watchdog.cancel()
    return {"size": args.size, "method": args.method, "seconds": seconds,
            "peak_mib": status_mib("VmHWM") - rss0, "shapes": shape}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=["run", "synthetic", "both"], default="both")
    p.add_argument("--calibration_steps", type=int, default=8)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--micro_batch_size", type=int, default=8)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--sizes", default=SIZES)
    p.add_argument("--S", type=int, default=16)
    p.add_argument("--tokens", type=int, default=512, help="tokens per synthetic gradient (micro-batch 8 x 64)")
    p.add_argument("--timeout", type=int, default=240,
                   help="per synthetic computation, seconds: past it the worker reports its peak so far and '> budget'")
    p.add_argument("--out", default="benchmarks/results/calibration.json")
    p.add_argument("--worker", choices=["run", "synthetic"], help=argparse.SUPPRESS)
    p.add_argument("--size", help=argparse.SUPPRESS)
    p.add_argument("--method", help=argparse.SUPPRESS)
    p.add_argument("--worker_out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        res = run_worker(args) if args.worker == "run" else synthetic_worker(args)
        Path(args.worker_out).write_text(json.dumps(res))
        return
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    out = ROOT / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp.json")
    results: dict = {"args": vars(args), "threads": env["OMP_NUM_THREADS"]}
    common = [f"--{k}={getattr(args, k)}" for k in ("calibration_steps", "steps", "warmup", "micro_batch_size", "seq",
                                                      "S", "tokens")]
    texts = []
    if args.part in ("run", "both"):
        subprocess.run([sys.executable, __file__, "--worker", "run", "--worker_out", str(tmp), *common],
                       check=True, env=env, stdout=subprocess.DEVNULL)
        results["run"] = json.loads(tmp.read_text())
        texts.append(report_run(results["run"], args))
        print(texts[-1], flush=True)
    if args.part in ("synthetic", "both"):
        rows = []
        for size in args.sizes.split(","):
            row = {"size": size}
            for method in ("streaming", "stacked"):
                try:
                    subprocess.run([sys.executable, __file__, "--worker", "synthetic", "--size", size, "--method",
                                    method, "--worker_out", str(tmp), f"--timeout={args.timeout}", *common],
                                   check=True, env=env, stdout=subprocess.DEVNULL, timeout=args.timeout + 120)
                    row[method] = json.loads(tmp.read_text())
                except subprocess.TimeoutExpired:
                    row[method] = {"seconds": float("inf"), "peak_mib": float("nan"), "timed_out": True}
                print(f"{size} {method}: {row[method]['seconds']:.2f} s, {row[method]['peak_mib']:.0f} MiB",
                      file=sys.stderr, flush=True)
            rows.append(row)
        results["synthetic"] = rows
        lines = [f"### HOSVD bases of S = {args.S} gradients (each from {args.tokens} tokens), "
                 f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}", "",
                 "| m x n | streaming Grams s | stacked SVD s | time ratio (stacked / ours) | streaming peak MiB | "
                 "stacked peak MiB | memory ratio |", "|---|---:|---:|---:|---:|---:|---:|"]
        for r in rows:
            a, b = r["streaming"], r["stacked"]
            sec = lambda d: f"> {args.timeout}" if d.get("timed_out") else f"{d['seconds']:.2f}"
            ratio = "-" if a.get("timed_out") else (f"> {args.timeout / a['seconds']:.0f}x" if b.get("timed_out")
                                                    else f"{b['seconds'] / a['seconds']:.1f}x")
            lines.append(f"| {r['size']} | {sec(a)} | {sec(b)} | {ratio} | "
                         f"{a['peak_mib']:.0f} | {b['peak_mib']:.0f}{' (so far)' if b.get('timed_out') else ''} | "
                         f"{b['peak_mib'] / max(a['peak_mib'], 1):.1f}x |")
        lines += ["", "Peak = VmHWM above the RSS before the basis computation (factors already in memory). "
                  "Stacked: fp32 stack S x m x n (S m n x 4 B) + the two unfoldings' SVD workspaces; streaming: "
                  "two float64 Grams (8 (m^2 + n^2) B) + eigh workspace."]
        texts.append("\n".join(lines))
        print(texts[-1], flush=True)
    tmp.unlink(missing_ok=True)
    out.write_text(json.dumps(results, indent=2))
    (out.with_suffix(".md")).write_text("\n\n".join(texts) + "\n")


if __name__ == "__main__":
    main()
