"""Worker for tests/distributed/test_comm.py: CommCounter against two independent counters, on 2 gloo ranks.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 \
        --master_addr 127.0.0.1 --master_port 29532 tests/comm_crosscheck_worker.py --out /tmp/x.json --engines ddp

For each engine (``eager``: the c10d functions called by hand; ``ddp``, ``fsdp2``, ``zero2``, ``zero3``: one
training step of a tiny MLP after one uncounted warm-up step) the same collectives are counted at once by
``CommCounter`` (python layer, and for DDP its ``ddp_hook`` as ``Engine`` registers it), by its dispatch layer,
by torch's ``CommDebugMode`` (op counts only) and, under DeepSpeed, by DeepSpeed's comms logger (op counts
and message sizes). Every counter is entered around each step separately: ``CommDebugMode`` in torch 2.13
fails (IndexError in its module tracker) when one context spans two forwards of a module. Rank 0 writes
every rank's counts as JSON; the test compares them.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch import nn  # noqa: E402
from torch.distributed.tensor.debug import CommDebugMode  # noqa: E402

from sg_distributed.distributed.comm import CommCounter  # noqa: E402

X = torch.randn(4, 16, generator=torch.Generator().manual_seed(0))


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def count(step, hook_counter: CommCounter | None = None) -> dict:
    """Run ``step()`` under every counter at once; per-op {calls, payload} (CommDebugMode: calls only)."""
    with CommCounter() as py, CommCounter(layer="dispatch") as dsp, CommDebugMode() as cdm:
        if hook_counter is not None:
            with hook_counter:
                step()
        else:
            step()
    out = {"python": _by_op(py), "dispatch": _by_op(dsp),
           "commdebugmode": {str(op): n for op, n in cdm.get_comm_counts().items()}}
    if hook_counter is not None:
        out["ddp_hook"] = _by_op(hook_counter.reset())
    return out


def _by_op(counter_or_snapshot) -> dict:
    snap = counter_or_snapshot.snapshot() if isinstance(counter_or_snapshot, CommCounter) else counter_or_snapshot
    return {op: {"calls": s.calls, "payload": s.payload, "wire": s.wire} for op, s in snap.by_op().items()}


def eager(rank: int, world: int) -> dict:
    def step():
        dist.all_reduce(torch.ones(10))
        dist.all_gather_into_tensor(torch.empty(3 * world), torch.ones(3))
        dist.reduce_scatter_tensor(torch.empty(3), torch.ones(3 * world))
        dist.broadcast(torch.ones(4), src=0)
        dist.all_gather([torch.empty(5) for _ in range(world)], torch.ones(5))
        dist.barrier()
        if rank == 0:
            dist.send(torch.ones(7), dst=1)
        elif rank == 1:
            dist.recv(torch.empty(7), src=0)

    return count(step)


def ddp(rank: int, world: int) -> dict:
    model = nn.parallel.DistributedDataParallel(mlp(), broadcast_buffers=False)  # as Engine builds it
    hook_counter = CommCounter()
    model.register_comm_hook(None, hook_counter.ddp_hook())
    model(X).sum().backward()  # warm-up; the next backward rebuilds DDP's buckets (a C++ broadcast)
    return count(lambda: model(X).sum().backward(), hook_counter)


def fsdp2(rank: int, world: int) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = mlp()
    for module in (model[0], model[2], model):
        fully_shard(module, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)

    def step():  # as Engine.step with max_grad_norm: the norm of DTensor gradients is a functional all-reduce
        model(X).sum().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()

    step()
    return count(step)


def zero(stage: int):
    def run(rank: int, world: int) -> dict:
        import deepspeed.comm as ds_comm

        from sg_distributed.integrations.deepspeed import initialize_engine

        block = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
                 "reduce_bucket_size": 500_000_000}
        if stage == 3:
            block["stage3_param_persistence_threshold"] = 0
        else:
            block.update(reduce_scatter=True, allgather_bucket_size=500_000_000)
        config = {"train_batch_size": 4 * world, "train_micro_batch_size_per_gpu": 4,
                  "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "zero_optimization": block,
                  "zero_allow_untested_optimizer": True, "steps_per_print": 10**9,
                  "comms_logger": {"enabled": True, "verbose": False, "prof_all": True}}
        model = mlp()
        engine = initialize_engine(model, torch.optim.AdamW(model.parameters(), lr=1e-3), config)

        def step():
            engine.backward(engine(X).sum())
            engine.step()

        step()
        ds_comm.comms_logger.reset_data()
        out = count(step)
        # {op: {message bytes: calls}}: the size of each call's ``tensor`` argument, as DeepSpeed logs it
        out["ds_comms_logger"] = {op: {str(size): v[0] for size, v in sizes.items()}
                                  for op, sizes in ds_comm.comms_logger.get_raw_data().items()}
        ds_comm.comms_logger.enabled = False
        return out

    return run


ENGINES = {"eager": eager, "ddp": ddp, "fsdp2": fsdp2, "zero2": zero(2), "zero3": zero(3)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--engines", default="eager,ddp,fsdp2")
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()
    engines = args.engines.split(",")
    if any(e.startswith("zero") for e in engines):
        from sg_distributed.integrations.deepspeed import init_distributed

        init_distributed()
    else:
        dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {e: ENGINES[e](rank, world) for e in engines}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"world_size": world, "ranks": gathered}, fh, indent=1)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
