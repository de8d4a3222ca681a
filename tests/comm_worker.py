"""Worker for tests/distributed/test_comm.py: bytes per step under DeepSpeed ZeRO, counted with CommCounter.

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 \
        --master_addr 127.0.0.1 --master_port 29531 tests/comm_worker.py --out /tmp/comm.json

For each method (default: ``full`` = every MLP weight dense-trainable, ``sparsegrad`` = fixed support at
density 0.01) a tiny Llama is trained for a few steps under ZeRO (``--stage``); after one uncounted
warm-up step the collectives of ``--steps`` steps are counted, split by the labels ``backward`` (gradient
reduction) and ``step`` (optimizer step + ZeRO's all-gather of updated partitions). Rank 0 writes JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
sys.path.insert(0, HERE)

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from conftest import lm_batches, make_tiny_llama  # noqa: E402
from sg_distributed.distributed.comm import CommCounter, check_collective_devices_from_env  # noqa: E402
from sg_distributed.sparsegrad.config import SparseGradConfig  # noqa: E402
from sg_distributed.integrations.deepspeed import init_distributed, initialize_engine  # noqa: E402
from sg_distributed.training.methods import prepare  # noqa: E402


def ds_config(stage: int, micro: int, world: int) -> dict:
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True, "reduce_scatter": True,
            "reduce_bucket_size": 500_000_000, "allgather_bucket_size": 500_000_000}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=50_000_000)
        zero.pop("reduce_scatter")
        zero.pop("allgather_bucket_size")
    return {"train_batch_size": micro * world, "train_micro_batch_size_per_gpu": micro,
            "gradient_accumulation_steps": 1, "gradient_clipping": 0.0, "zero_optimization": zero,
            "zero_allow_untested_optimizer": True, "steps_per_print": 10**9}


def run_method(method: str, args, rank: int, world: int) -> dict:
    model = make_tiny_llama(layers=2, hidden=args.hidden, intermediate=args.intermediate)
    config = SparseGradConfig(density=args.density, calibration_steps=2)
    calib = lm_batches(n=2, batch=2, seq=12, seed=7)
    prepared = prepare(method, model, config, calibration_batches=calib)
    trainable = prepared.trainable_parameters()
    optimizer = prepared.make_optimizer(1e-3)
    engine = initialize_engine(prepared.model, optimizer, ds_config(args.stage, 2, world))
    batches = lm_batches(n=(args.steps + 1) * world, batch=2, seq=12, seed=11)

    def one_step(i: int, counter: CommCounter | None) -> None:
        batch = batches[i * world + rank]
        loss = engine(**batch).loss
        ctx = counter.label("backward") if counter else _null()
        with ctx:
            engine.backward(loss)
        ctx = counter.label("step") if counter else _null()
        with ctx:
            engine.step()
        prepared.after_step()

    one_step(0, None)  # warm-up (lazy buffers, first all-gathers) not counted
    with CommCounter(layer=args.layer) as counter:
        for i in range(1, args.steps + 1):
            one_step(i, counter)
    snap = counter.per_step(args.steps)
    d = snap.to_dict()
    d["backward_by_op"] = {op: vars(s) for (lab, op), s in snap.stats.items() if lab == "backward"}
    d["step_by_op"] = {op: vars(s) for (lab, op), s in snap.stats.items() if lab == "step"}
    d["trainable_numel"] = int(sum(getattr(p, "ds_numel", p.numel()) for p in trainable))
    d["trainable_tensors"] = len(trainable)
    d["table"] = counter.table(steps=args.steps)
    return d


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--methods", default="full,sparsegrad")
    parser.add_argument("--stage", type=int, default=2)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--density", type=float, default=0.01)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--layer", default="python", choices=["python", "dispatch"])
    parser.add_argument("--local_rank", type=int, default=-1)
    args = parser.parse_args()

    init_distributed()
    check_collective_devices_from_env()
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {m: run_method(m, args, rank, world) for m in args.methods.split(",")}
    gathered: list = [None] * world
    dist.all_gather_object(gathered, results)
    if rank == 0:
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump({"world_size": world, "stage": args.stage, "ranks": gathered}, fh, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
