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
* **FSDP2**: ``fully_shard`` replaces every parameter object, so GradDrop's tensor hooks never fire there
  (checked: the reduced gradients were not masked). :func:`install_on_fsdp2` therefore applies GradDrop
  where FSDP2 reduces: a custom reduce-scatter (``FSDPModule.set_custom_reduce_scatter``) per parameter
  group, which masks (and rescales) each rank's accumulated unsharded gradients and reduce-scatters only
  the kept entries. FSDP2's input is ``world`` rows, row ``r`` holding every parameter's padded dim-0
  shard ``r``; each row's kept entries are packed into a row of ``K = max_r K_r`` values (rows differ by
  a few binomial standard deviations; every rank computes every row's count, so the padding is agreed
  without talking), reduce-scattered, and unpacked into this rank's shard. ``compact=False`` masks and
  reduce-scatters the zero-filled rows instead (the dense exchange, for comparison). FSDP2 skips the
  reduce-scatter on one rank (it copies), so GradDrop under FSDP2 needs two or more ranks.
"""
from __future__ import annotations

import copy
from typing import Any, Mapping

import torch
import torch.distributed as dist

from sg_distributed.graddrop.exchange import KeptEntries, pack, unpack_

__all__ = ["ddp_comm_hook", "install_on_deepspeed", "install_on_fsdp2", "kept_exchange_ds_config"]


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


class _MaskingReduceScatter:
    """FSDP2 custom reduce-scatter of one parameter group that applies GradDrop (see the module docstring)."""

    def __init__(self, kept: KeptEntries, param_group: Any, compact: bool):
        self.kept, self.param_group, self.compact = kept, param_group, compact
        self.scale = kept.graddrop.config.scale

    def allocate(self, size, *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.empty(*size, dtype=dtype, device=device)

    def _row_keep(self, world: int, device: torch.device) -> torch.Tensor:
        """Keep flags laid out as FSDP2's reduce-scatter input viewed as (world, shard numel)."""
        rows = []
        for fsdp_param in self.param_group.fsdp_params:
            if not fsdp_param.sharded_param.requires_grad:  # frozen: never has a gradient to reduce
                continue
            if fsdp_param.fsdp_placement.dim != 0:
                raise ValueError(f"GradDrop under FSDP2 needs dim-0 sharding; {fsdp_param._param_fqn} is sharded "
                                 f"as {fsdp_param.fsdp_placement}")
            shape = fsdp_param._orig_size
            flags = self.kept.graddrop.keep_flags_by_name(fsdp_param._param_fqn, device)
            keep = (torch.ones(shape, dtype=torch.bool, device=device) if flags is None
                    else flags.expand(shape).contiguous())
            padded_rows = fsdp_param.padded_sharded_param_size[0] * world
            if padded_rows > shape[0]:  # FSDP2 pads dim 0 to a multiple of world: padding is never kept
                pad = torch.zeros((padded_rows - shape[0], *shape[1:]), dtype=torch.bool, device=device)
                keep = torch.cat([keep, pad])
            rows.append(keep.reshape(world, -1))
        return torch.cat(rows, dim=1)

    def __call__(self, output_tensor: torch.Tensor, input_tensor: torch.Tensor, group: dist.ProcessGroup,
                 op: Any, async_op: bool = False):
        world, rank = group.size(), group.rank()
        keep = self._row_keep(world, input_tensor.device)
        rows = input_tensor.view(world, -1)
        if keep.shape != rows.shape:
            raise RuntimeError(f"kept exchange: FSDP2 reduce-scatters {tuple(rows.shape)} (ranks x shard) but its "
                               f"trainable parameters lay out {tuple(keep.shape)}; a parameter without a gradient "
                               "this step, or another FSDP2 layout (use --graddrop_exchange dense without --fsdp)")
        if self.scale != 1.0:
            rows.mul_(self.scale)
        if not self.compact:  # the dense exchange: mask, then FSDP2's own reduce-scatter of zero-filled rows
            rows.masked_fill_(~keep, 0)
            return dist.reduce_scatter_tensor(output_tensor, input_tensor, op=op, group=group, async_op=async_op)
        counts = keep.sum(dim=1).tolist()  # one host read: every rank's row length, hence the padding
        width = max(counts)
        if width == 0:  # every entry of every shard is dropped: all ranks know it, nothing to send
            output_tensor.zero_()
            return None
        packed = torch.zeros((world, width), dtype=rows.dtype, device=rows.device)
        for r in range(world):
            packed[r, :counts[r]] = rows[r].masked_select(keep[r])
        reduced = torch.empty(width, dtype=rows.dtype, device=rows.device)
        dist.reduce_scatter_tensor(reduced, packed.view(-1), op=op, group=group)
        unpack_(output_tensor, keep[rank], reduced[:counts[rank]])
        return None


def install_on_fsdp2(model: Any, kept: KeptEntries, compact: bool = True) -> int:
    """Apply GradDrop inside FSDP2's gradient reduce-scatter of every ``FSDPModule`` in ``model`` (see the
    module docstring); ``compact=False`` keeps the dense exchange of the masked gradients. Returns the
    number of parameter groups hooked."""
    from torch.distributed.fsdp import FSDPModule

    if kept.graddrop is None or kept.unfreezing is not None:
        raise ValueError("install_on_fsdp2 applies GradDrop masks only (gradual unfreezing's tensor hooks do not "
                         "survive fully_shard either; it is not supported under FSDP2)")
    if not dist.is_initialized() or dist.get_world_size() < 2:
        raise ValueError("GradDrop under FSDP2 needs two or more ranks: on one rank FSDP2 copies the gradients "
                         "instead of reduce-scattering them, and the reduce-scatter is where GradDrop masks")
    kept.graddrop.remove()  # its hooks sit on the parameter objects fully_shard replaced: the comm masks instead
    hooked = 0
    for module in model.modules():
        if not isinstance(module, FSDPModule):
            continue
        groups = module._get_fsdp_state()._fsdp_param_groups
        trainable = [g for g in groups if any(fp.sharded_param.requires_grad for fp in g.fsdp_params)]
        if trainable:  # one group per module unless a shard_placement_fn splits meshes (refused by the setter)
            module.set_custom_reduce_scatter(_MaskingReduceScatter(kept, trainable[0], compact))
            hooked += 1
    return hooked
