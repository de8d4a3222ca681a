"""Process-group set-up and the training engine seen through one small interface.

``Engine`` hides whether a step runs under DeepSpeed, DDP or a single process, so the training loop
is written once: ``loss = engine.forward(batch)``, ``engine.backward(loss)``, ``engine.step()``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_process_group(use_deepspeed: bool, timeout: float | None = None) -> DistInfo:
    """Initialise torch.distributed when launched by deepspeed/torchrun (gloo on CPU, nccl on GPU).

    ``timeout``: seconds a collective waits for the other ranks before it raises (gloo honours it; nccl
    with async error handling, the default in torch >= 2.2). None: torch's / DeepSpeed's default.
    """
    import datetime

    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    kwargs = {} if timeout is None else {"timeout": datetime.timedelta(seconds=timeout)}
    cpu = not torch.cuda.is_available() or (use_deepspeed and os.environ.get("DS_ACCELERATOR") == "cpu")
    if not cpu and world > 1 and not dist.is_initialized() and local_rank < torch.cuda.device_count():
        # NCCL's object collectives and barrier run on the *current* CUDA device: without this every
        # rank would use cuda:0 for the first broadcast_object_list / all_gather_object. (With one visible
        # device per process, LOCAL_RANK may exceed the count: that device is already the current one.)
        torch.cuda.set_device(local_rank)
    if use_deepspeed:
        from .integrations.deepspeed import init_distributed

        init_distributed(**kwargs)
    elif (world > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not dist.is_initialized():
        # torchrun with one process too: FSDP2 needs a process group even at world size 1
        dist.init_process_group(backend="gloo" if cpu else "nccl", **kwargs)
    if dist.is_initialized():
        from .comm import check_collective_devices_from_env

        check_collective_devices_from_env()
        return DistInfo(dist.get_rank(), dist.get_world_size(), local_rank)
    return DistInfo()


def destroy_process_group() -> None:
    """Tear the process group down at the end of a successful run (a no-op without one).

    PyTorch asks every trainer process to do this before it exits: a gloo/NCCL group left to the
    interpreter's finalisation can abort the process ("terminate called without an active exception")
    after all the work is done, and the launcher then reports the whole job as failed. Call it only on
    success: after an error the other ranks may still be inside a collective (torchtitan does the same).
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def collective_device(group=None) -> torch.device:
    """The device a tensor handed to a collective on ``group`` (default: the default group) must live on.

    NCCL takes CUDA tensors only (a CPU tensor kills the job), so under NCCL this is the current CUDA
    device (``torch.cuda.set_device`` picks it; ``init_process_group`` above sets it to LOCAL_RANK).
    Groups that take CPU tensors (gloo, or "cpu:gloo,cuda:nccl") get ``cpu``: the values are on the host
    already. Without an initialised process group: ``cpu``.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return torch.device("cpu")
    group = group if group is not None else dist.group.WORLD
    try:  # the device types the group's backends were registered for: nccl [cuda], gloo [cuda, cpu]
        types = [d.type for d in group._device_types]
    except (AttributeError, RuntimeError):
        types = []
    if not types:
        types = ["cuda"] if str(dist.get_backend(group)) == "nccl" else ["cpu"]
    if "cpu" in types:
        return torch.device("cpu")
    kind = types[0]
    module = getattr(torch, kind, None)
    index = module.current_device() if hasattr(module, "current_device") else None
    return torch.device(kind, index)


def is_distributed() -> bool:
    """A process group of more than one rank is up (collectives would talk to other ranks)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def in_place_collective(tensor: torch.Tensor, collective) -> None:
    """``collective(t)`` (an in-place all-reduce, broadcast...) on ``tensor``, staged through the collective
    device when the tensor lives elsewhere (a model calibrated on the host under NCCL)."""
    device = collective_device()
    if tensor.device == device:
        collective(tensor)
        return
    staged = tensor.to(device)
    collective(staged)
    tensor.copy_(staged)


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def assert_same_on_all_ranks(value: str, what: str) -> None:
    """Stop with a clear error when ranks disagree (e.g. on bases/support checksums before training)."""
    if not is_distributed():
        return
    values = [None] * dist.get_world_size()
    dist.all_gather_object(values, value)
    if len(set(values)) > 1:
        detail = ", ".join(f"rank {r}: {v[:12]}" for r, v in enumerate(values))
        raise RuntimeError(f"{what} differ across ranks ({detail}); refusing to train on inconsistent state")


def all_reduce_mean(values: dict[str, float], weight: float) -> dict[str, float]:
    """Weighted mean of per-rank metrics (weight = number of examples on this rank)."""
    keys = sorted(values)
    t = torch.tensor([values[k] * weight for k in keys] + [weight], dtype=torch.float64, device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(t)
    totals = t.tolist()  # one device-to-host copy for all metrics
    return {k: totals[i] / totals[-1] for i, k in enumerate(keys)} | {"num_examples": int(totals[-1])}


def global_batch_indices(n_items: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Items of global batch ``step``: consecutive slices of a seeded permutation, reshuffled each epoch."""
    per_epoch = n_items // global_batch
    if per_epoch == 0:
        raise ValueError(f"global batch {global_batch} is larger than the {n_items} training examples")
    epoch, offset = divmod(step, per_epoch)
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[offset * global_batch:(offset + 1) * global_batch]


def rank_micro_batches(indices: list[int], info: DistInfo, micro_batch: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch (rank-major, so 1 rank x N == N ranks x 1)."""
    per_rank = len(indices) // info.world_size
    mine = indices[info.rank * per_rank:(info.rank + 1) * per_rank]
    return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]


class Engine:
    """A model + optimizer behind DeepSpeed, FSDP2, DDP or nothing.

    Precision: the model arrives in its weight dtype (fp32 / bf16 / fp16); ``autocast`` (bf16 or fp16)
    runs the forward under ``torch.autocast`` over those weights. fp16 outside DeepSpeed (fp16 weights or
    fp16 autocast) scales the loss with ``torch.amp.GradScaler``, which skips steps whose gradients
    overflow; DeepSpeed brings its own loss scaler (``fp16`` block of its config).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, accumulation: int,
                 ds_config: dict | None = None, max_grad_norm: float | None = None, comm_counter=None,
                 fsdp: bool | dict = False, autocast: torch.dtype | None = None, loss_scaling: bool = False):
        self.module, self.optimizer, self.accumulation = model, optimizer, accumulation
        self.max_grad_norm = max_grad_norm
        self.deepspeed = ds_config is not None
        self.fsdp, self._micro = bool(fsdp), 0
        self.device_type = next((p.device.type for p in model.parameters()), "cpu")
        self.autocast = autocast
        self.scaler = torch.amp.GradScaler(self.device_type) if loss_scaling and not self.deepspeed else None
        if self.fsdp:  # FSDP2: shard in place; the optimizer is re-pointed at the sharded parameters
            from .integrations.fsdp import apply_fsdp2

            self.wrapped = apply_fsdp2(model, optimizer=optimizer, **(fsdp if isinstance(fsdp, dict) else {}))
        elif self.deepspeed:
            from .integrations.deepspeed import initialize_engine

            self.wrapped = initialize_engine(model, optimizer, ds_config)
        elif is_distributed():
            # Bases and supports are identical on every rank after calibration: no buffer broadcasts.
            self.wrapped = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False)
            if comm_counter is not None:  # DDP's reducer calls C++ collectives: count them in its hook
                self.wrapped.register_comm_hook(None, comm_counter.ddp_hook())
        else:
            self.wrapped = model

    def forward(self, batch: dict) -> torch.Tensor:
        if self.autocast is None:
            return self.wrapped(**batch).loss
        with torch.autocast(self.device_type, dtype=self.autocast):
            return self.wrapped(**batch).loss

    def backward(self, loss: torch.Tensor) -> None:
        if self.deepspeed:
            self.wrapped.backward(loss)
        else:
            if self.fsdp:  # reduce-scatter sharded grads only on the last micro-batch of a step
                from .integrations.fsdp import set_gradient_sync

                self._micro += 1
                set_gradient_sync(self.wrapped, self._micro % self.accumulation == 0)
            loss = loss / self.accumulation
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        """Optimizer step (call once per global batch; DeepSpeed counts micro-steps itself)."""
        if self.deepspeed:
            return
        if self.fsdp:  # replicated k-vectors: one flat gradient all-reduce per step
            from .integrations.fsdp import sync_replicated_grads

            sync_replicated_grads(self.wrapped)
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)  # clip the true gradients
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for p in self.module.parameters() if p.requires_grad], self.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)  # skipped when a gradient overflowed
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def discard_gradients(self) -> None:
        """Drop this step's accumulated gradients without an update (a skipped non-finite step).

        DeepSpeed keeps accumulated gradients in its own buffers: only a step skipped before its first
        backward can be discarded there (the caller checks)."""
        if self.deepspeed:
            return
        self._micro = 0
        self.optimizer.zero_grad(set_to_none=True)

    def micro_step(self) -> None:
        """DeepSpeed's step after every micro-batch (it applies the update at the accumulation boundary)."""
        if self.deepspeed:
            self.wrapped.step()
