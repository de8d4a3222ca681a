"""Engine glue of the kept-only gradient exchange (``sg_distributed.graddrop.exchange``): DDP, DeepSpeed ZeRO-2.

* **DDP**: :func:`ddp_comm_hook` is a communication hook (``model.register_comm_hook(None, hook)``, as
  PowerSGD is installed): per bucket it packs the kept entries of the flat bucket, averages them with one
  ``all_reduce`` and scatters them back; a bucket whose entries are all dropped (a frozen block, a dropped
  layer) sends nothing.
* **DeepSpeed ZeRO-2**: :func:`install_on_deepspeed` overrides one method of the engine's ZeRO optimizer
  instance, ``gradient_reduction_w_predivide(tensor, dtype)``, the all-reduce of one flat gradient bucket
  that ZeRO-2 runs when ``zero_optimization.reduce_scatter`` is false (DeepSpeed 0.19.8,
  ``stage_1_and_2.average_tensor``). The override packs the bucket's kept entries, hands the compact
  buffer to DeepSpeed's own method (dtype cast, pre/post-division, ``all_reduce`` on the data-parallel
  group) and scatters the result back; everything around it (streams, bucketing, partition copy-out,
  overflow checks, the all-gather of updated partitions) stays DeepSpeed's. The bucket's parameters are
  read from the live ``ipg_buckets[dtype].params`` (flat concatenation, in that order; checked).
  ``reduce_scatter: true`` reduces each rank's slice with a separate ``reduce`` to its owner, which would
  need the same packing per slice: :func:`kept_exchange_ds_config` sets it to false instead (for ZeRO-2
  the dense cost of both is one all-reduce's worth of bytes). ZeRO-3 reduces partitioned flat buffers in
  its own reduce-scatter and is not covered (kept dense).
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.distributed as dist

from sg_distributed.graddrop.exchange import KeptEntries, pack, unpack_

__all__ = ["ddp_comm_hook", "install_on_deepspeed", "kept_exchange_ds_config"]


def ddp_comm_hook(kept: KeptEntries, process_group: dist.ProcessGroup | None = None):
    """A DDP communication hook averaging only the kept entries of each gradient bucket."""

    def hook(_state, bucket):  # no annotations: DDP compares them to the real types, postponed ones are strings
        group = process_group if process_group is not None else dist.group.WORLD
        world = dist.get_world_size(group)
        flat = bucket.buffer()
        keep = kept.flat_keep(bucket.parameters(), flat.device)
        compact = flat if keep is None else pack(flat, keep)
        if compact.numel() == 0:  # every rank knows the whole bucket is dropped: nothing to send
            done = torch.futures.Future()
            done.set_result(flat.zero_())
            return done
        compact.div_(world)  # as DDP's default all-reduce hook: divide, then sum
        fut = dist.all_reduce(compact, group=group, async_op=True).get_future()

        def scatter_back(f: torch.futures.Future) -> torch.Tensor:
            reduced = f.value()[0]
            return reduced if keep is None else unpack_(flat, keep, reduced)

        return fut.then(scatter_back)

    return hook


def kept_exchange_ds_config(cfg: Mapping[str, Any]) -> dict:
    """A copy of a DeepSpeed config the kept exchange can serve: ZeRO stage 2, ``reduce_scatter`` false,
    ``contiguous_gradients`` true. Raises ValueError naming the setting that rules it out."""
    out = copy.deepcopy(dict(cfg))
    zero = dict(out.get("zero_optimization") or {})
    stage = zero.get("stage", 0)
    if stage != 2:
        raise ValueError(f"GradDrop's kept-only exchange runs under ZeRO stage 2; this config has stage {stage!r} "
                         "(use --graddrop_exchange dense, or a stage-2 config such as ds_configs/zero2.json)")
    if zero.get("contiguous_gradients") is False:
        raise ValueError("GradDrop's kept-only exchange needs zero_optimization.contiguous_gradients true "
                         "(the flat bucket it packs); this config sets it to false")
    zero["reduce_scatter"] = False  # one all-reduce per bucket: the call the exchange packs
    zero.setdefault("contiguous_gradients", True)
    out["zero_optimization"] = zero
    return out


def install_on_deepspeed(engine: Any, kept: KeptEntries) -> None:
    """Make a ZeRO-2 DeepSpeed engine reduce only the kept gradient entries (see the module docstring)."""
    from deepspeed.runtime.zero.stage_1_and_2 import DeepSpeedZeroOptimizer

    zero = engine.optimizer
    if not isinstance(zero, DeepSpeedZeroOptimizer) or not zero.partition_gradients:
        raise ValueError(f"GradDrop's kept-only exchange needs a ZeRO stage-2 engine, got {type(zero).__name__} "
                         f"(stage {engine.zero_optimization_stage()})")
    if zero.reduce_scatter or not zero.contiguous_gradients:
        raise ValueError("GradDrop's kept-only exchange needs zero_optimization.reduce_scatter false and "
                         "contiguous_gradients true; build the config with kept_exchange_ds_config()")
    dense_reduction = zero.gradient_reduction_w_predivide  # the bound DeepSpeed method

    def kept_reduction(tensor: torch.Tensor, communication_data_type: torch.dtype) -> torch.Tensor:
        bucket = zero.ipg_buckets[communication_data_type]
        params = [zero.bit16_groups[i][j] for i, j, _ in bucket.params]
        if sum(p.numel() for p in params) != tensor.numel():
            raise RuntimeError(f"kept exchange: DeepSpeed reduces a flat buffer of {tensor.numel()} entries but its "
                               f"bucket lists parameters of {sum(p.numel() for p in params)}; this DeepSpeed "
                               "version lays buckets out differently (use --graddrop_exchange dense)")
        keep = kept.flat_keep(params, tensor.device)
        if keep is None:
            return dense_reduction(tensor, communication_data_type)
        reduced = dense_reduction(pack(tensor, keep), communication_data_type)  # empty: no collective
        if reduced.dtype == tensor.dtype:
            return unpack_(tensor, keep, reduced)
        full = unpack_(torch.empty_like(tensor, dtype=reduced.dtype), keep, reduced)
        tensor.copy_(full)
        return full

    zero.gradient_reduction_w_predivide = kept_reduction
