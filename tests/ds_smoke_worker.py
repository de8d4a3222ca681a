"""Worker for tests/integrations/test_integrations_deepspeed.py: train a tiny MLP under DeepSpeed ZeRO on CPU ranks.

Launch with either launcher (2 ranks, gloo on CPU)::

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 tests/ds_smoke_worker.py \
        --config ds_configs/zero2.json --out /tmp/ds_smoke.json
    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 \
        --master_addr 127.0.0.1 --master_port 29512 tests/ds_smoke_worker.py --config ds_configs/zero3.json --out ...

Rank 0 writes JSON: the full-data loss before/after training as seen by every rank, per-step training
losses, timings, whether a torch extension was JIT-built, and what DeepSpeed did to ``p.grad`` and to
frozen / 1-D parameters.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

T_START = time.time()

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from sg_distributed.distributed.comm import check_collective_devices_from_env  # noqa: E402
from sg_distributed.integrations.deepspeed import (  # noqa: E402
    init_distributed,
    initialize_engine,
    load_ds_config,
    resolve_auto,
    validate_ds_config,
)

HIDDEN = 16


class TinyMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(HIDDEN, HIDDEN)
        self.fc2 = torch.nn.Linear(HIDDEN, 1)
        self.frozen = torch.nn.Linear(HIDDEN, HIDDEN)  # requires_grad=False, kept out of the optimizer
        self.frozen.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x))) + 0.0 * self.frozen(x).sum(-1, keepdim=True)


def torch_extensions_built() -> list[str]:
    root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.expanduser("~/.cache/torch_extensions")
    found = []
    for dirpath, _, files in os.walk(root):
        found += [os.path.join(dirpath, f) for f in files if f.endswith(".so")]
    return sorted(found)


def probe_grads(engine, info: dict) -> None:
    """Record what p.grad and deepspeed.utils.safe_get_full_grad give right after engine.backward."""
    from deepspeed.utils import safe_get_full_grad

    info["p_grad_is_none_after_backward"] = {n: p.grad is None for n, p in engine.module.named_parameters()}
    full: dict = {}
    for n, p in engine.module.named_parameters():
        if p.requires_grad:
            g = safe_get_full_grad(p)
            full[n] = None if g is None else list(g.shape)
    info["safe_get_full_grad_shapes"] = full


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=12, help="optimizer steps")
    parser.add_argument("--micro-batch-size", type=int, default=4)
    parser.add_argument("--accum", type=int, default=2)
    parser.add_argument("--lr", type=float, default=3e-2)
    parser.add_argument("--local_rank", type=int, default=-1)  # passed by the deepspeed launcher
    args = parser.parse_args()

    ext_before = torch_extensions_built()
    t0 = time.time()
    init_distributed()
    check_collective_devices_from_env()
    t_init_dist = time.time() - t0
    rank, world = dist.get_rank(), dist.get_world_size()

    cfg = load_ds_config(args.config)
    validate_ds_config(cfg)
    cfg = resolve_auto(cfg, world_size=world, micro_batch_size=args.micro_batch_size,
                       gradient_accumulation_steps=args.accum, max_grad_norm=1.0, hidden_size=HIDDEN,
                       precision="fp32")

    torch.manual_seed(0)  # same initial weights and same data on every rank
    model = TinyMLP()
    x_all = torch.randn(256, HIDDEN)
    y_all = (x_all[:, :1] * 2.0 - x_all[:, 1:2]).tanh()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)

    t0 = time.time()
    engine = initialize_engine(model, optimizer, cfg)
    t_init_engine = time.time() - t0
    stage = engine.zero_optimization_stage()

    def full_loss() -> float:
        with torch.no_grad():
            return float(torch.nn.functional.mse_loss(engine(x_all), y_all))

    info: dict = {"rank": rank, "stage": stage, "initial_loss": full_loss()}
    info["param_shapes_after_init"] = {n: list(p.shape) for n, p in engine.module.named_parameters()}
    info["ds_numel"] = {n: int(getattr(p, "ds_numel", p.numel())) for n, p in engine.module.named_parameters()}
    info["frozen_is_zero3_param"] = hasattr(engine.module.frozen.weight, "ds_id")

    step_losses: list[float] = []
    t0 = time.time()
    micro = 0
    shard = x_all.shape[0] // world
    for step in range(args.steps):
        for _ in range(args.accum):
            lo = rank * shard + (micro * args.micro_batch_size) % shard
            xb, yb = x_all[lo:lo + args.micro_batch_size], y_all[lo:lo + args.micro_batch_size]
            loss = torch.nn.functional.mse_loss(engine(xb), yb)
            engine.backward(loss)
            # safe_get_full_grad is a collective that is only valid at the accumulation boundary: inside
            # the window ZeRO-2 raises on the ranks owning a fragment and all-reduces on the others (hang).
            if micro == args.accum - 1:
                probe_grads(engine, info)
            engine.step()
            micro += 1
        step_losses.append(float(loss.detach()))
    t_train = time.time() - t0

    info["param_shapes_after_training"] = {n: list(p.shape) for n, p in engine.module.named_parameters()}
    info["optimizer_offloaded_to_cpu"] = bool(engine.zero_cpu_offload())
    info.update(final_loss=full_loss(), step_losses=step_losses, global_steps=int(engine.global_steps),
                time_init_distributed_s=round(t_init_dist, 2), time_initialize_s=round(t_init_engine, 2),
                time_train_s=round(t_train, 2), time_script_s=round(time.time() - T_START, 2),
                new_torch_extensions=sorted(set(torch_extensions_built()) - set(ext_before)))

    gathered: list = [None] * world
    dist.all_gather_object(gathered, info)
    if rank == 0:
        result = {"config": args.config, "world_size": world, "resolved_config": cfg, "ranks": gathered}
        with open(args.out, "w", encoding="utf-8") as fh:
            json.dump(result, fh, indent=2)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
