#!/usr/bin/env python
"""bf16 step time and peak GPU memory of SparseGrad vs LoRA vs full on LLaMA-2-7B-shaped blocks.

A ``LlamaForCausalLM`` with LLaMA-2-7B's shapes (hidden 4096, MLP 11008, 32 heads, vocab 32000,
rms_norm_eps 1e-5) but only ``--layers`` blocks, random weights, synthetic tokens (``--batch`` x
``--seq``). Every method trains the same target layers (the MLP up/down of every block) and is built by
``sg_distributed.training.methods.prepare``, so the library's own code is what is timed:

* ``sparsegrad``      ``SparseGradConfig()``: the library defaults (density 1 %, row/column budget 0.25, as
                      ``launch/train_qa.py``: the dense-block kernel), calibrated on ``--calib-batches``
                      synthetic batches;
* ``sparsegrad_b125`` ``max_rows = max_cols = 0.125``;
* ``sparsegrad_csr``  no row/column budget (``max_rows = max_cols = None``): the CSR kernels;
* ``lora``            peft LoRA, rank from ``sg_distributed.training.methods.matched_lora_rank`` (same trainable count);
* ``full``            dense AdamW on the target weights.

Per method: the time and peak memory of ``prepare`` (SparseGrad: calibration + conversion; LoRA: peft's
wrapping), median step time (forward + backward + optimizer step, CUDA-synchronised, after
``--warmup`` steps), peak GPU memory over those steps (``torch.cuda.reset_peak_memory_stats`` after
calibration; ``max_memory_allocated``), the resident "state" memory right after an optimizer step
(weights + buffers + gradients + optimizer state), and what ``sg_distributed.tools.estimate.estimate`` predicts
for the same model, layers and batch (p = 1, its ZeRO-2 accounting). The estimator models DeepSpeed's
mixed precision (fp32 master copy + fp32 Adam moments, 12 B per trained value when the dtype is 16-bit)
and activations by a rough formula without flash attention; this loop is plain torch (AdamW keeps its
moments in the trained tensor's dtype, SDPA attention), so the ratios say how far that accounting is
from a plain one-GPU run, term by term in the JSON output.

    python3 benchmarks/bench_gpu_blocks.py                      # 4 blocks, 4 x 512 tokens, bf16, cuda
    python3 benchmarks/bench_gpu_blocks.py --layers 8 --methods lora,sparsegrad
    python3 benchmarks/bench_gpu_blocks.py --device cpu --hidden 64 --intermediate 128 --layers 1 \\
        --vocab 128 --steps 2                                    # CPU smoke run (tests)

Each method's row is printed as soon as it is measured (a run stopped by a timeout keeps its rows);
a method that fails gets a row with its error and the others still run. Exit status 1 if any failed.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(_key, _value)

import torch  # noqa: E402

from sg_distributed.sparsegrad.config import DEFAULT_BUDGET  # noqa: E402

# method name -> (sg_distributed.training.methods.prepare name, SparseGradConfig overrides, estimator method)
VARIANTS = {
    "sparsegrad": ("sparsegrad", {}, "sparsegrad"),
    "sparsegrad_b125": ("sparsegrad", {"max_rows": 0.125, "max_cols": 0.125}, "sparsegrad"),
    "sparsegrad_csr": ("sparsegrad", {"max_rows": None, "max_cols": None}, "sparsegrad"),
    "lora": ("lora", {}, "lora"),
    "full": ("full", {}, "full"),
}
DEFAULT_METHODS = "lora,full,sparsegrad,sparsegrad_b125,sparsegrad_csr"  # most informative first: a timeout keeps those
LR = {"sparsegrad": 1e-3, "lora": 1e-3, "full": 2e-5}  # launch/train_qa.py's defaults
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
GIB = 2 ** 30


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="transformer blocks (LLaMA-2-7B has 32)")
    p.add_argument("--hidden", type=int, default=4096)
    p.add_argument("--intermediate", type=int, default=11008)
    p.add_argument("--heads", type=int, default=32)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--steps", type=int, default=10, help="timed steps per method")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps before them (first one allocates state)")
    p.add_argument("--calib-batches", "--calib_batches", dest="calib_batches", type=int, default=4,
                   help="synthetic batches SparseGrad calibrates on")
    p.add_argument("--methods", default=DEFAULT_METHODS, help=f"comma list of {', '.join(VARIANTS)}")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu (smoke runs: no memory figures)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="also write the markdown table here")
    p.add_argument("--json", help="also write every figure as JSON here")
    args = p.parse_args(argv)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in VARIANTS]
    if unknown or not methods:
        p.error(f"--methods: unknown {unknown}; choose from {list(VARIANTS)}")
    args.methods = methods
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda: torch sees no CUDA device (use --device cpu for a smoke run)")
    if min(args.layers, args.hidden, args.intermediate, args.heads, args.vocab, args.batch, args.seq, args.steps,
           args.calib_batches) < 1 or args.warmup < 0:
        p.error("sizes and --steps must be >= 1, --warmup >= 0")
    if args.hidden % args.heads:
        p.error(f"--hidden {args.hidden} is not a multiple of --heads {args.heads}")
    return args


def llama_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.intermediate,
                       num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.heads,
                       max_position_embeddings=max(4096, args.seq), rms_norm_eps=1e-5, tie_word_embeddings=False,
                       use_cache=False)


def build_model(args, device: torch.device):
    """Random-weight model, initialised on ``device`` (fast on a GPU), then cast to the run's dtype."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(args.seed)
    with torch.device(device):
        model = LlamaForCausalLM(llama_config(args))
    model.config.use_cache = False
    return model.to(DTYPES[args.dtype]).train()


def make_batches(args, n: int, device: torch.device, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, args.vocab, (args.batch, args.seq), generator=g)
        out.append({"input_ids": ids.to(device), "labels": ids.to(device)})
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def allocated(device: torch.device) -> int | None:
    return torch.cuda.memory_allocated(device) if device.type == "cuda" else None


def peak(device: torch.device) -> int | None:
    return torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None


def estimator_rows(args, config_overrides: dict, est_method: str, lora_rank: int | None) -> dict:
    """sg_distributed.tools.estimate for the same model (built on the meta device), layers and batch, p = 1."""
    from transformers import LlamaForCausalLM

    from sg_distributed.tools.estimate import estimate

    with torch.device("meta"):
        meta = LlamaForCausalLM(llama_config(args))
    return estimate(meta, est_method, p=1, zero=2, dtype=args.dtype, density=0.01,
                    max_rows=config_overrides.get("max_rows", DEFAULT_BUDGET),
                    max_cols=config_overrides.get("max_cols", DEFAULT_BUDGET),
                    micro_batch_size=args.batch, seq=args.seq, lora_rank=lora_rank)


def run_method(name: str, args, device: torch.device) -> dict:
    from sg_distributed import SparseGradConfig
    from sg_distributed.training.methods import matched_lora_rank, prepare

    method, overrides, est_method = VARIANTS[name]
    row: dict = {"method": name}
    free_memory(device)
    model = build_model(args, device)
    config = SparseGradConfig(**overrides)
    lora_rank = matched_lora_rank(model, config) if method == "lora" else None
    calibration = make_batches(args, args.calib_batches, device, seed=args.seed + 1) if method == "sparsegrad" else None
    free_memory(device)
    base_allocated = allocated(device)
    sync(device)
    t0 = time.perf_counter()
    prepared = prepare(method, model, config, calibration_batches=calibration, lora_rank=lora_rank)
    sync(device)
    row["calibration_s"] = time.perf_counter() - t0
    row["calibration_peak"] = peak(device)
    del calibration
    trainable = prepared.trainable_parameters()
    row["trainable"] = sum(p.numel() for p in trainable)
    row["trainable_dtype"] = ",".join(sorted({str(p.dtype).removeprefix("torch.") for p in trainable}))
    row["lora_rank"] = lora_rank
    if method == "sparsegrad":
        kernels = {"csr" if "kernel=csr" in m.extra_repr() else "dense-block"
                   for m in prepared.model.modules() if type(m).__name__ == "SparseGradLinear"}
        row["kernel"] = ",".join(sorted(kernels))
    optimizer = prepared.make_optimizer(LR[method])
    batches = make_batches(args, 2, device, seed=args.seed + 2)
    free_memory(device)
    row["loaded"] = allocated(device)

    losses, times, state = [], [], None
    for i in range(args.warmup + args.steps):
        batch = batches[i % len(batches)]
        sync(device)
        t0 = time.perf_counter()
        loss = prepared.model(**batch).loss
        loss.backward()
        optimizer.step()
        prepared.after_step()
        sync(device)
        elapsed = time.perf_counter() - t0
        if state is None:
            state = allocated(device)  # weights + buffers + gradients + optimizer state (+ nothing else alive)
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if i >= args.warmup:
            times.append(elapsed)
    row["step_s"] = statistics.median(times)
    row["step_s_all"] = times
    row["peak"] = peak(device)
    row["state"] = state
    row["loss_first_last"] = [losses[0], losses[-1]]
    row["finite"] = all(map(lambda v: v == v and abs(v) != float("inf"), losses))
    row["base_allocated"] = base_allocated
    row["estimate"] = est = estimator_rows(args, overrides, est_method, lora_rank)
    # The estimator's terms with this loop's optimizer: plain AdamW keeps 2 moments in the trained tensor's
    # dtype (no fp32 master copy), and the trained tensors (LoRA adapters, k-vectors) may be fp32 in a bf16 model.
    tb = max(p.element_size() for p in trainable)
    b = 2 if args.dtype == "bf16" else 4
    d = est["trainable"]
    own = d * (tb - b) if method in ("lora", "sparsegrad") else 0  # the estimator counts them in weights at b
    row["estimate_plain_state"] = est["weights"] + own + est["buffers"] + d * tb + 2 * d * tb
    del prepared, optimizer, model, batches, trainable, loss
    free_memory(device)
    return row


def fmt_gib(value) -> str:
    return "n/a" if value is None else f"{value / GIB:.2f}"


def fmt_ratio(a, b) -> str:
    return "n/a" if a is None or b in (None, 0) else f"{a / b:.2f}"


def markdown(rows: list[dict], args, device: torch.device, header_extra: str = "") -> str:
    lora = next((r for r in rows if r["method"] == "lora" and "error" not in r), None)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    lines = [f"LLaMA-2-7B-shaped model, {args.layers} block(s) (hidden {args.hidden}, MLP {args.intermediate}, "
             f"{args.heads} heads, vocab {args.vocab}), random weights, {args.dtype}, batch {args.batch} x "
             f"{args.seq} synthetic tokens, on {name}; torch {torch.__version__}{header_extra}. Targets: MLP up/down "
             f"of every block. Step = forward + backward + optimizer step, median of {args.steps} after "
             f"{args.warmup} warm-up. Memory in GiB; estimate = sg_distributed.tools.estimate (p=1, ZeRO-2 accounting: "
             f"fp32 master + moments, activation formula without flash attention); state = allocated right after "
             f"an optimizer step (weights, buffers, gradients, optimizer state); plain AdamW = the estimator's "
             f"terms with this loop's optimizer (2 moments in the trained tensor's dtype, no master copy).", "",
             "| method | kernel | trainable | dtype | prepare s | prepare peak | step ms | x LoRA | peak | x LoRA "
             "| est. peak | peak / est. | state | est. state | state / est. | state / est. (plain AdamW) "
             "| loss first -> last |",
             "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['method']} | | | | | | | | | | | | | | | | FAILED: {r['error']} |")
            continue
        est = r["estimate"]
        est_state = est["weights"] + est["buffers"] + est["gradients"] + est["optimizer"]
        kernel = r.get("kernel", "") + (f"r={r['lora_rank']}" if r.get("lora_rank") else "")
        first, last = r["loss_first_last"]
        lines.append(
            f"| {r['method']} | {kernel} | {r['trainable']:,} | {r['trainable_dtype']} | {r['calibration_s']:.1f} | "
            f"{fmt_gib(r['calibration_peak'])} | {1e3 * r['step_s']:.1f} | "
            f"{fmt_ratio(r['step_s'], lora['step_s'] if lora else None)} | {fmt_gib(r['peak'])} | "
            f"{fmt_ratio(r['peak'], lora['peak'] if lora else None)} | {fmt_gib(est['total_memory'])} | "
            f"{fmt_ratio(r['peak'], est['total_memory'])} | {fmt_gib(r['state'])} | {fmt_gib(est_state)} | "
            f"{fmt_ratio(r['state'], est_state)} | {fmt_ratio(r['state'], r['estimate_plain_state'])} | "
            f"{first:.3f} -> {last:.3f}{'' if r['finite'] else ' (non-finite)'} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        if device.index is None:  # torch.cuda.set_device wants an index
            device = torch.device("cuda", torch.cuda.current_device())
        torch.cuda.set_device(device)
    rows: list[dict] = []
    t_start = time.perf_counter()
    for name in args.methods:
        t0 = time.perf_counter()
        try:
            row = run_method(name, args, device)
        except Exception as err:  # noqa: BLE001 - one method's failure must not hide the others' rows
            traceback.print_exc()
            row = {"method": name, "error": f"{type(err).__name__}: {str(err).splitlines()[0][:200] if str(err) else ''}"}
            free_memory(device)
        row["wall_s"] = time.perf_counter() - t0
        rows.append(row)
        brief = {k: row.get(k) for k in ("method", "error", "kernel", "trainable", "trainable_dtype", "calibration_s",
                                         "step_s", "peak", "state", "loss_first_last", "wall_s")}
        print("BENCH_ROW " + json.dumps(brief, default=str), flush=True)
        if args.json:  # rewritten after every method: a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=2, default=str))
    table = markdown(rows, args, device, f"; {time.perf_counter() - t_start:.0f} s in all")
    print(table, flush=True)
    if args.out:
        Path(args.out).write_text(table + "\n")
    return 1 if any("error" in r or not r.get("finite", False) for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
