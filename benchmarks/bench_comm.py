#!/usr/bin/env python
"""Bytes between ranks per optimizer step, every method, 2 ranks under DeepSpeed ZeRO (CPU / gloo).

    .venv/bin/python benchmarks/bench_comm.py                      # tiny Llama, ZeRO-2, ~30 s
    .venv/bin/python benchmarks/bench_comm.py --stage 3
    .venv/bin/python benchmarks/bench_comm.py --model smollm2 --steps 2   # embedded SmolLM2-135M

Started with plain python it relaunches itself with ``torch.distributed.run`` (2 ranks, OMP_NUM_THREADS=1,
DS_ACCELERATOR=cpu). Every method trains the same target layers (SparseGradConfig defaults: the MLP
up/down projections of every block) with the same data; after one uncounted warm-up step the collectives
of ``--steps`` steps are counted on every rank with ``sg_distributed.comm.CommCounter``, split into
``forward`` / ``backward`` (gradient reduction) / ``step`` (optimizer + ZeRO's all-gather of updated
partitions). Printed per method (rank 0; ranks agree to a few bytes): payload bytes per step by op,
total payload, ring "wire" bytes per step (see sg_distributed/comm.py for both conventions), the ratio to
full fine-tuning, and the analytic value next to the measurement.

Analytic column (p ranks, D trainable fp32 values): ZeRO-2 = gradient all-reduce ``2(p-1)/p*4D`` +
all-gather of the updated partitions ``(p-1)/p*4D`` (scalar all-reduces for norms/overflow ignored);
ZeRO-3 = gradient reduce-scatter ``(p-1)/p*4D`` only (its parameter all-gathers touch every partitioned
parameter, frozen ones included, and are shown measured). ``sparsegrad_reference`` and ``graddrop`` still
exchange the dense gradient ("dense exchange"); their column "sparse exchange (planned)" is the
all-gather of (int32 index, fp32 value) pairs of DESIGN §2, ``(p-1)*k*(4+4)``.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS = ("full", "lora", "sparsegrad", "graddrop", "sparsegrad_reference", "sparsegrad_dynamic",
           "sparsegrad_dynamic_sparse")
NOTES = {"sparsegrad_reference": "dense exchange through ZeRO (per-step top-k on flat partitions: use dynamic)",
         "graddrop": "dense exchange (masked entries still travel as zeros)",
         "sparsegrad_dynamic": "exact exchange: dense all-reduce of G~, then top-k (equals 1 rank)",
         "sparsegrad_dynamic_sparse": "sparse exchange: local top-k, all-gather (int64 idx, fp32 val), k-vector all-reduce"}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", choices=["tiny", "smollm2"])
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--stage", type=int, default=2, choices=[1, 2, 3])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--micro-batch-size", type=int, default=2)
    ap.add_argument("--seq", type=int, default=32)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--out", default=None, help="write the raw JSON here")
    ap.add_argument("--local_rank", type=int, default=-1)
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------ worker


def build_model(name: str):
    import torch

    torch.manual_seed(0)
    if name == "smollm2":
        from transformers import AutoModelForCausalLM

        from sg_distributed.assets import smollm2_dir

        return AutoModelForCausalLM.from_pretrained(smollm2_dir(), dtype=torch.float32), 49152
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=256, num_hidden_layers=4,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    return LlamaForCausalLM(config), 256


def batches(n: int, micro: int, seq: int, vocab: int, seed: int):
    import torch

    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(0, vocab, (micro, seq), generator=g)
        out.append({"input_ids": ids, "labels": ids.clone()})
    return out


def ds_config(stage: int, micro: int, world: int) -> dict:
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
            "reduce_bucket_size": 500_000_000}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=50_000_000)
    else:
        zero.update(reduce_scatter=True, allgather_bucket_size=500_000_000)
    return {"train_batch_size": micro * world, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def run_method(method: str, args, rank: int, world: int) -> dict:
    import torch.distributed as dist

    from sg_distributed.comm import CommCounter
    from sg_distributed.config import SparseGradConfig
    from sg_distributed.integrations.deepspeed import initialize_engine
    from sg_distributed.methods import prepare
    from sg_distributed.targets import find_target_linears

    model, vocab = build_model(args.model)
    exchange = "sparse" if method.endswith("_sparse") else "exact"
    method = method.removesuffix("_sparse")
    config = SparseGradConfig(density=args.density, calibration_steps=2, exchange=exchange)
    targets = find_target_linears(model, config.target_modules, config.blocks, config.block_stride)
    dense_numel = sum(m.weight.numel() for m in targets.values())
    k_total = sum(config.entries_for(m.out_features, m.in_features, n) for n, m in targets.items())
    total_numel = sum(p.numel() for p in model.parameters())
    calib = batches(2, args.micro_batch_size, args.seq, vocab, seed=7)
    prepared = prepare(method, model, config, calibration_batches=calib)
    trainable = prepared.trainable_parameters()
    optimizer = prepared.make_optimizer(1e-4)
    engine = initialize_engine(prepared.model, optimizer, ds_config(args.stage, args.micro_batch_size, world))
    data = batches((args.steps + 1) * world, args.micro_batch_size, args.seq, vocab, seed=11)

    def one_step(i: int, counter) -> None:
        with counter.label("forward"):
            loss = engine(**data[i * world + rank]).loss
        with counter.label("backward"):
            engine.backward(loss)
        with counter.label("step"):
            engine.step()
        prepared.after_step()

    with CommCounter() as warm:  # warm-up (lazy buffers, first gathers), not reported
        one_step(0, warm)
    t0 = time.perf_counter()
    with CommCounter() as counter:
        for i in range(1, args.steps + 1):
            one_step(i, counter)
    seconds = (time.perf_counter() - t0) / args.steps
    snap = counter.per_step(args.steps)
    d = snap.to_dict()
    d["by_label_op"] = {f"{lab}/{op}": vars(s) for (lab, op), s in snap.stats.items()}
    d.update(method=method + ("_sparse" if exchange == "sparse" and method == "sparsegrad_dynamic" else ""),
             trainable_numel=int(sum(getattr(p, "ds_numel", p.numel()) for p in trainable)),
             dense_numel=dense_numel, k_total=k_total, model_numel=total_numel, step_s=seconds,
             world=world, info={k: v for k, v in prepared.info.items() if k == "lora_rank"})
    dist.barrier()
    return d


def worker(args) -> None:
    import torch.distributed as dist

    from sg_distributed.integrations.deepspeed import init_distributed

    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = [run_method(m, args, rank, world) for m in args.methods.split(",")]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"stage": args.stage, "model": args.model, "steps": args.steps, "density": args.density,
                       "ranks": gathered}, fh, indent=2)
    dist.barrier()
    dist.destroy_process_group()


# ------------------------------------------------------------------------------------------------ report


def analytic(res: dict, stage: int) -> tuple[float, float | None]:
    """(ring wire bytes/step of the gradient + trainable-parameter exchange, planned sparse exchange or None)."""
    from sg_distributed.comm import dense_allreduce_bytes, sparse_allgather_bytes

    p, D = res["world"], res["trainable_numel"]
    if stage == 3:
        grad = (p - 1) / p * 4 * D
    else:
        grad = dense_allreduce_bytes(D, p, 4) + (p - 1) / p * 4 * D
    planned = None
    if res["method"] == "sparsegrad_reference":
        planned = sparse_allgather_bytes(res["k_total"], p, 4, 4)
    if res["method"] == "sparsegrad_dynamic":  # engine: norms only; exchange: dense all-reduce of every G~
        grad += dense_allreduce_bytes(res["dense_numel"], p, 4)
    if res["method"] == "sparsegrad_dynamic_sparse":  # all-gather of (int64, fp32) pairs + k-vector all-reduce
        grad += sparse_allgather_bytes(res["k_total"], p, 8, 4) + dense_allreduce_bytes(res["k_total"], p, 4)
    return grad, planned


def bw_payload(r: dict) -> float:
    """Payload of the collectives issued during engine.backward (the gradient reduction)."""
    return sum(s["payload"] for k, s in r["by_label_op"].items() if k.startswith("backward/"))


def report(data: dict) -> str:
    from sg_distributed.comm import fmt_bytes

    stage = data["stage"]
    r0 = data["ranks"][0]
    full = next((r for r in r0 if r["method"] == "full"), None)
    ops = sorted({op for r in r0 for op in r["by_op"]})
    head = ["method", "trainable", *[f"{op} payload" for op in ops], "grad-reduce payload (backward)",
            "total payload", "total wire (ring)", "wire vs full", "grad-reduce vs full",
            "analytic wire (grad+param exchange)", "note"]
    lines = [f"ZeRO-{stage}, {r0[0]['world']} ranks, model={data['model']} ({r0[0]['model_numel']:,} params; "
             f"targets {r0[0]['dense_numel']:,} values, sum k = {r0[0]['k_total']:,} at density {data['density']}), "
             f"bytes per optimizer step per rank (mean of {data['steps']} steps, rank 0)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in r0:
        bw = bw_payload(r)
        full_bw = bw_payload(full) if full else None
        grad, planned = analytic(r, stage)
        note = NOTES.get(r["method"], "")
        if planned is not None:
            note += f"; sparse exchange (planned) {fmt_bytes(planned)}"
        if r["info"].get("lora_rank"):
            note += f"LoRA rank {r['info']['lora_rank']}"
        cells = [r["method"], f"{r['trainable_numel']:,}"]
        cells += [fmt_bytes(r["by_op"].get(op, {}).get("payload", 0)) for op in ops]
        cells += [fmt_bytes(bw), fmt_bytes(r["total"]["payload"]), fmt_bytes(r["total"]["wire"]),
                  f"{r['total']['wire'] / full['total']['wire']:.4f}" if full else "-",
                  f"{bw / full_bw:.4f}" if full_bw else "-", fmt_bytes(grad), note]
        lines.append("| " + " | ".join(cells) + " |")
    agree = all(abs(bw_payload(a) - bw_payload(b)) <= 64 and abs(a["total"]["wire"] - b["total"]["wire"]) <= 1024
                for a, b in zip(data["ranks"][0], data["ranks"][-1]))
    lines += ["", f"ranks agree on gradient-reduce payload (64 B) and total wire (1 kB): {agree} "
              "(broadcast payload counts on the source rank only)"]
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    args = parse_args()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        worker(args)
        return
    out = args.out or str(ROOT / "outputs" / f"bench_comm_{args.model}_zero{args.stage}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    argv, skip = [], False
    for a in sys.argv[1:]:  # drop "--out X" and "--out=X": the worker gets its own --out
        if skip or a.startswith("--out"):
            skip = a == "--out" and not skip
            continue
        argv.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(args.nproc),
           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), __file__, *argv, "--out", out]
    t0 = time.time()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-6000:])
        sys.exit(proc.returncode)
    with open(out, encoding="utf-8") as fh:
        data = json.load(fh)
    print(report(data))
    command = " ".join(["python", "benchmarks/bench_comm.py", *argv])
    print(f"\n({time.time() - t0:.0f} s; raw JSON: {out}; command: {command})")


if __name__ == "__main__":
    main()
