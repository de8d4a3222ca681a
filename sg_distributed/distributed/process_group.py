"""Process-group set-up and the small collectives every part uses (world info, the collective's device,
in-place collectives on host tensors, barriers, agreement checks, metric averaging)."""
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
        from sg_distributed.integrations.deepspeed import init_distributed

        init_distributed(**kwargs)
    elif (world > 1 or "TORCHELASTIC_RUN_ID" in os.environ) and not dist.is_initialized():
        # torchrun with one process too: FSDP2 needs a process group even at world size 1
        dist.init_process_group(backend="gloo" if cpu else "nccl", **kwargs)
    if dist.is_initialized():
        from sg_distributed.distributed.comm import check_collective_devices_from_env

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


def replicas_agree(module: nn.Module) -> bool:
    """Whether every rank holds the same parameters and buffers, by a checksum (per tensor: the float64 sum and
    sum of squares, on the collective device, no host read). DDP broadcasts every parameter from rank 0 at
    start-up, frozen ones included (540 MB for SmolLM2 in fp32, 13.5 GB for a 7B model in bf16), though each rank
    has loaded the same weights: where this says they agree, that broadcast can be skipped (docs/cluster.md)."""
    if not is_distributed():
        return True
    device, sums = collective_device(), []
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            if tensor.numel() == 0 or tensor.is_meta:
                continue
            total = torch.zeros(2, dtype=torch.float64, device=tensor.device)
            for chunk in tensor.detach().reshape(-1).split(1 << 24):  # float64 temporaries of 128 MB at most
                chunk = chunk.double()
                total += torch.stack([chunk.sum(), chunk.square().sum()])
            sums.append(total.to(device))
    local = torch.cat(sums) if sums else torch.zeros(1, dtype=torch.float64, device=device)
    gathered = [torch.empty_like(local) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, local)
    return all(torch.equal(g, gathered[0]) for g in gathered[1:])


def all_reduce_mean(values: dict[str, float], weight: float) -> dict[str, float]:
    """Weighted mean of per-rank metrics (weight = number of examples on this rank)."""
    keys = sorted(values)
    t = torch.tensor([values[k] * weight for k in keys] + [weight], dtype=torch.float64, device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(t)
    totals = t.tolist()  # one device-to-host copy for all metrics
    return {k: totals[i] / totals[-1] for i, k in enumerate(keys)} | {"num_examples": int(totals[-1])}
