#!/usr/bin/env python
"""One converted layer, timed next to its analytic MAC count: how close the delta is to its cost floor.

For each MLP shape (SmolLM2-135M and LLaMA-2-7B up_proj / down_proj) and ``--tokens`` tokens, one
forward + backward (upstream gradient given; dX always computed, as inside a network) of:

* ``base``        the frozen ``nn.Linear`` alone: forward T*m*n, dX T*m*n MACs;
* ``lora``        the frozen layer + a rank-rho update (rho = k / (m + n), the trainable count of SparseGrad);
* ``sparsegrad``  ``SparseGradLinear`` with a row/column budget (the dense-block kernel), products ordered by
                  cost (``layer.fold_into_output_side`` / ``fold_into_input_side``), in the default leading
                  block (``budget_block='leading'``): P_I^T and R_C^T are contiguous slices of the bases;
* ``sg_unfolded`` a scored-block layer forced into the fixed order of the kernel before, (B S^T) P_I^T and
                  (A S) R_C^T: what cost ordering saves, side by side;
* ``sg_scored``   ``sparsegrad`` in a scored block (``budget_block='scored'``: rows and columns anywhere), whose
                  P_I^T and R_C^T are gathered at every use, forward and backward.

Columns: median ms, GMAC of the whole layer (base + update), GMAC/s achieved, and the time and MAC ratio
to ``base``. Variants are interleaved round by round so machine noise hits all of them alike.

    OMP_NUM_THREADS=2 python benchmarks/bench_layer.py                       # SmolLM2 shapes, fp32 and bf16
    OMP_NUM_THREADS=2 python benchmarks/bench_layer.py --shapes llama7b --tokens 512 --reps 3
    OMP_NUM_THREADS=2 python benchmarks/bench_layer.py --budget_axes balanced    # the same block area, balanced
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from sg_distributed import SparseGradConfig  # noqa: E402
from sg_distributed.sparsegrad import layer as layer_module  # noqa: E402
from sg_distributed.sparsegrad.layer import SharedBasis, SparseGradLinear, fold_into_input_side, fold_into_output_side  # noqa: E402
from sg_distributed.sparsegrad.selection import Support, leading_block  # noqa: E402

SHAPES = {  # name -> [(layer, m = out_features, n = in_features)]
    "smollm2": [("up_proj", 1536, 576), ("down_proj", 576, 1536)],
    "llama7b": [("up_proj", 11008, 4096), ("down_proj", 4096, 11008)],
}
VARIANTS = ("base", "lora", "sparsegrad", "sg_scored", "sg_unfolded")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="smollm2", help=f"comma list of {sorted(SHAPES)}")
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--budget", type=float, default=0.25, help="row and column budget (fraction)")
    p.add_argument("--budget_axes", choices=["own", "balanced"], default="own",
                   help="fractions of m and n (own) or of n and m (balanced: SparseGradConfig.budget_axes)")
    p.add_argument("--reps", type=int, default=7, help="timed rounds (after one warm-up round)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    return p.parse_args(argv)


class LoRALinear(nn.Module):
    """Frozen base + B A (peft's LoRA forward, without dropout/scaling)."""

    def __init__(self, base: nn.Linear, rank: int):
        super().__init__()
        self.base = base
        self.A = nn.Parameter(torch.randn(rank, base.in_features, dtype=base.weight.dtype) * 0.01)
        self.B = nn.Parameter(torch.randn(base.out_features, rank, dtype=base.weight.dtype) * 0.01)

    def forward(self, x):
        return self.base(x) + (x @ self.A.T) @ self.B.T


def build(name: str, m: int, n: int, args, dtype: torch.dtype) -> tuple[nn.Module, dict]:
    g = torch.Generator().manual_seed(0)
    base = nn.Linear(n, m, bias=False, dtype=dtype).requires_grad_(False)
    k = int(args.density * m * n)
    r, c = SparseGradConfig(max_rows=args.budget, max_cols=args.budget, budget_axes=args.budget_axes).block_budget(m, n)
    if name == "base":
        return base, {}
    if name == "lora":
        rank = max(1, round(k / (m + n)))
        return LoRALinear(base, rank), {"rank": rank}
    rows = torch.randperm(m, generator=g)[:r].sort().values
    cols = torch.randperm(n, generator=g)[:c].sort().values
    if name == "sparsegrad":
        rows, cols = leading_block(r, c)
    picked = torch.randperm(r * c, generator=g)[:k]
    flat = rows[picked // c] * n + cols[picked % c]
    # timing only: any dense matrices do for P and R (orthogonality does not change the cost)
    basis = SharedBasis(torch.randn(m, m, generator=g) / m ** 0.5, torch.randn(n, n, generator=g) / n ** 0.5)
    layer = SparseGradLinear(base, None, None, Support.from_flat(flat, (m, n)), basis=basis, block=(rows, cols),
                             values=torch.randn(k, generator=g) * 0.01)
    return layer, {"r": r, "c": c, "k": k}


def delta_macs(T: int, m: int, n: int, r: int, c: int, ordered: bool) -> int:
    fwd = T * n * c + ((r * c * m + T * c * m) if ordered and fold_into_output_side(T, r, c, m) else T * (c * r + r * m))
    dx = (r * c * n + T * r * n) if ordered and fold_into_input_side(T, r, c, n) else T * (r * c + c * n)
    return fwd + T * m * r + T * r * c + dx  # + A = dY P_I, dL/dv = (A^T B) at the support


def macs(name: str, T: int, m: int, n: int, info: dict) -> int:
    base = 2 * T * m * n  # forward + dX of the frozen layer
    if name == "base":
        return base
    if name == "lora":
        rho = info["rank"]
        return base + 3 * T * rho * (m + n)  # fwd, dX, dA and dB
    return base + delta_macs(T, m, n, info["r"], info["c"], ordered=name != "sg_unfolded")


def step(module: nn.Module, x: torch.Tensor, upstream: torch.Tensor) -> float:
    x.grad = None
    for p in module.parameters():
        p.grad = None
    t0 = time.perf_counter()
    module(x).backward(upstream)
    return time.perf_counter() - t0


def measure(shape_name: str, layer_name: str, m: int, n: int, args, dtype: torch.dtype) -> list[dict]:
    T = args.tokens
    x = torch.randn(T, n, dtype=dtype, requires_grad=True)
    upstream = torch.randn(T, m, dtype=dtype)
    built = {name: build(name, m, n, args, dtype) for name in VARIANTS}
    times = {name: [] for name in VARIANTS}
    unfolded = (lambda *a: False)
    originals = (layer_module.fold_into_output_side, layer_module.fold_into_input_side)
    for rnd in range(args.reps + 1):
        for name in VARIANTS:
            if name == "sg_unfolded":
                layer_module.fold_into_output_side = layer_module.fold_into_input_side = unfolded
            try:
                t = step(built[name][0], x, upstream)
            finally:
                layer_module.fold_into_output_side, layer_module.fold_into_input_side = originals
            if rnd:  # round 0 warms up (allocator, oneDNN primitives, compute copies of the bases)
                times[name].append(t)
    base_ms = statistics.median(times["base"]) * 1e3
    rows = []
    for name in VARIANTS:
        ms = statistics.median(times[name]) * 1e3
        gmac = macs(name, T, m, n, built[name][1]) / 1e9
        rows.append({"shape": f"{shape_name} {layer_name} {m}x{n}", "dtype": str(dtype).split(".")[-1],
                     "variant": name, "ms": ms, "gmac": gmac, "gmacs": gmac / (ms / 1e3),
                     "x_base_time": ms / base_ms, "x_base_macs": gmac / (2 * T * m * n / 1e9)})
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
    print(f"tokens {args.tokens}, density {args.density}, budget {args.budget} ({args.budget_axes} axes), "
          f"threads {torch.get_num_threads()}, "
          f"median of {args.reps} interleaved rounds\n")
    print("| shape | dtype | variant | ms | GMAC | GMAC/s | time / base | MACs / base |")
    print("|---|---|---|---|---|---|---|---|")
    for shape_name in args.shapes.split(","):
        for layer_name, m, n in SHAPES[shape_name]:
            for dtype_name in args.dtypes.split(","):
                for row in measure(shape_name, layer_name, m, n, args, dtypes[dtype_name]):
                    print(f"| {row['shape']} | {row['dtype']} | {row['variant']} | {row['ms']:.2f} | {row['gmac']:.3f} "
                          f"| {row['gmacs']:.1f} | {row['x_base_time']:.2f} | {row['x_base_macs']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
