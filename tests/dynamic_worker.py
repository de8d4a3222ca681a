"""Worker for tests/sparsegrad/test_dynamic.py: dynamic-support SparseGrad on 2 gloo ranks (CPU, float64).

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \
        --master_port 29531 tests/dynamic_worker.py --out /tmp/dynamic.json

Each rank trains on its half of every global batch (bias under DDP, W~ via SparseStateAdam); rank 0 also
runs the single-process reference (ReferenceSparseGradLinear + LazyAdam on the full global batch) and
writes JSON with the final weights of every run, the selected indices per rank and step, and bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

from sg_distributed.distributed.comm import check_collective_devices_from_env  # noqa: E402
from sg_distributed.sparsegrad.dynamic import (  # noqa: E402
    SparseExchange, SparseStateAdam, convert_to_dynamic, dense_parameters)
from sg_distributed.sparsegrad.layer import ReferenceSparseGradLinear  # noqa: E402
from sg_distributed.sparsegrad.optim import LazyAdam, clear_masks  # noqa: E402

K, LR, STEPS, GLOBAL_BATCH = 20, 0.05, 3, 8


def orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))[0]


def build_reference() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(12, 32), nn.GELU(), nn.Linear(32, 24)).double()
    net[0] = ReferenceSparseGradLinear(net[0], orthogonal(32, 1), orthogonal(12, 2), K)
    net[2] = ReferenceSparseGradLinear(net[2], orthogonal(24, 3), orthogonal(32, 4), K)
    return net


def data():
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(GLOBAL_BATCH, 12, generator=g, dtype=torch.float64),
             torch.randn(GLOBAL_BATCH, 24, generator=g, dtype=torch.float64)) for _ in range(STEPS)]


def weights(net) -> dict:
    return {f"{i}.{name}": t.detach().reshape(-1).tolist() for i in (0, 2)
            for name, t in (("rotated_weight", net[i].rotated_weight), ("bias", net[i].bias))}


def single_process() -> dict:
    net = build_reference()
    opt = LazyAdam(net.parameters(), lr=LR)
    for x, y in data():
        ((net(x) - y) ** 2).mean().backward()
        opt.step()
        opt.zero_grad()
        clear_masks(net.parameters())
    return weights(net)


def distributed(mode: str, rank: int, world: int) -> dict:
    net = build_reference()
    layers = convert_to_dynamic(net)
    model = DDP(net, broadcast_buffers=False)  # W~ is a buffer: DDP neither reduces nor broadcasts it
    dense_opt = LazyAdam(dense_parameters(layers.values()), lr=LR)
    sparse_opt = SparseStateAdam(layers, lr=LR, mode=mode)
    per = GLOBAL_BATCH // world
    selected, grads_seen = [], []
    for x, y in data():
        x, y = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        ((model(x) - y) ** 2).mean().backward()
        grads_seen.append(all(layer.grad_accumulator is not None for layer in layers.values()))
        dense_opt.step()
        dense_opt.zero_grad()
        sparse_opt.step()
        selected.append({n: idx.tolist() for n, idx in sparse_opt.last_selected.items()})
    return {"weights": weights(net), "selected": selected, "grads_seen": grads_seen,
            "bytes": {n: ex.last_bytes for n, ex in sparse_opt.exchanges.items()},
            "dense_bytes": {n: ex.last_dense_bytes for n, ex in sparse_opt.exchanges.items()},
            "state_size": sparse_opt.state_size(),
            "parameters": [n for n, _ in model.named_parameters()]}


def sparse_values_are_exact_means(rank: int, world: int) -> bool:
    g = torch.Generator().manual_seed(100 + rank)  # different local gradients per rank
    local = torch.randn(30, 40, generator=g, dtype=torch.float64)
    idx, values = SparseExchange(K, "sparse", oversample=1.5)(local)
    dense = local.clone()
    dist.all_reduce(dense)
    return bool(torch.allclose(values, (dense / world).reshape(-1)[idx], atol=1e-12, rtol=0))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    check_collective_devices_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    result = {"rank": rank, "exact": distributed("exact", rank, world), "sparse": distributed("sparse", rank, world),
              "sparse_values_exact": sparse_values_are_exact_means(rank, world)}
    gathered = [None] * world
    dist.all_gather_object(gathered, result)
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "single": single_process(), "ranks": gathered}, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
