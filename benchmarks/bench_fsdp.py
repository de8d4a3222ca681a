#!/usr/bin/env python
"""FSDP2 with SparseGrad: replicated vs sharded k-vectors, 2 ranks (CPU / gloo), bytes and step time.

    .venv/bin/python benchmarks/bench_fsdp.py                       # ~40 s on 2 CPU cores
    .venv/bin/python benchmarks/bench_fsdp.py --grad_accum 2 --steps 20

Started with plain python it relaunches itself under ``torch.distributed.run`` (2 ranks, OMP_NUM_THREADS=1).
A random Llama (``--layers`` blocks, ``--hidden`` / ``--intermediate``, vocab 256 so the embedding does not
dominate) is calibrated once per mode with SparseGrad (MLP up/down of every block, ``--density``), sharded
with ``apply_fsdp2(shard_sparse_values=...)`` and trained; the two modes alternate ``--rounds`` times so
machine noise hits both alike. Printed (rank 0): collectives, payload and ring-wire bytes per optimizer step
(``CommCounter``), the part of it that carries k-vectors (sharded: measured minus the frozen-only traffic
of the replicated run; replicated: its all-reduce), and the median step time.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--density", type=float, default=0.01)
    p.add_argument("--steps", type=int, default=15)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--micro_batch_size", type=int, default=4)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--grad_accum", type=int, default=1)
    return p.parse_args(argv)


def worker(args):
    import torch
    import torch.distributed as dist
    from transformers import LlamaConfig, LlamaForCausalLM

    from sg_distributed import SparseGradConfig
    from sg_distributed.distributed.comm import CommCounter
    from sg_distributed.integrations.fsdp import apply_fsdp2, set_gradient_sync, sync_replicated_grads
    from sg_distributed.sparsegrad.wrapper import get_sparsegrad_model

    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.intermediate,
                      num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=args.seq)
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (args.micro_batch_size, args.seq), generator=g) for _ in range(8)]

    def build(shard: bool):
        torch.manual_seed(0)
        model = get_sparsegrad_model(LlamaForCausalLM(cfg), SparseGradConfig(density=args.density))
        model.calibrate([{"input_ids": b, "labels": b} for b in batches[:2]])
        k = sum(p.numel() for p in model.trainable_parameters())
        opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
        apply_fsdp2(model, shard_sparse_values=shard, optimizer=opt)
        return model, opt, k

    def train(model, opt, steps, counter=None):
        times = []
        for step in range(steps):
            if counter is not None and step == 1:
                counter.reset()
            t0 = time.perf_counter()
            for micro in range(args.grad_accum):
                b = batches[(step * args.grad_accum + micro) % len(batches)]
                set_gradient_sync(model, micro == args.grad_accum - 1)
                (model(input_ids=b, labels=b).loss / args.grad_accum).backward()
            sync_replicated_grads(model)
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return times

    results = {"replicated": {"t": []}, "sharded": {"t": []}}
    for rnd in range(args.rounds):
        for mode in ("replicated", "sharded"):
            model, opt, k = build(mode == "sharded")
            counter = CommCounter()
            with counter:
                times = train(model, opt, args.steps, counter)
            results[mode]["t"] += times[1:]
            results[mode]["k"] = k
            snap = counter.per_step(args.steps - 1)
            results[mode]["payload"], results[mode]["wire"] = snap.total().payload, snap.total().wire
            results[mode]["calls"] = sum(v.calls for v in snap.by_op().values())
            results[mode]["ops"] = {op: (v.calls, v.payload) for op, v in snap.by_op().items()}
            del model, opt
    if rank == 0:
        rep, sh = results["replicated"], results["sharded"]
        k_rep = rep["ops"].get("all_reduce", (0, 0))[1]
        frozen_wire = rep["wire"] - 2 * (world - 1) / world * k_rep
        print(f"{args.layers} blocks {args.hidden}x{args.intermediate}, k = {rep['k']:,d} values ({4 * rep['k']:,d} B), "
              f"{world} ranks, micro-batch {args.micro_batch_size}x{args.seq}, grad_accum {args.grad_accum}, "
              f"{args.steps - 1} counted steps x {args.rounds} rounds")
        print("| k-vectors | calls/step | payload B/step | wire B/step | k-vector wire B/step | median step ms |")
        print("|---|---:|---:|---:|---:|---:|")
        for name, r in (("replicated", rep), ("sharded", sh)):
            kwire = r["wire"] - frozen_wire
            print(f"| {name} | {r['calls']:.0f} | {r['payload']:,.0f} | {r['wire']:,.0f} | {kwire:,.0f} | "
                  f"{1000 * statistics.median(r['t']):.1f} |")
        for name, r in (("replicated", rep), ("sharded", sh)):
            print(f"  {name} by op (calls, payload B):", {op: (round(c, 2), round(b)) for op, (c, b) in r["ops"].items()})
    dist.destroy_process_group()


def main():
    args = parse()
    if "RANK" in os.environ:
        return worker(args)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(port), __file__, *sys.argv[1:]]
    sys.exit(subprocess.call(cmd, env=env, cwd=ROOT))


if __name__ == "__main__":
    main()
