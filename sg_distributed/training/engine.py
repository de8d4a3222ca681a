"""The training engine seen through one small interface, and the data order of a run.

``Engine`` hides whether a step runs under DeepSpeed, FSDP2, DDP or a single process, so the training loop
is written once: ``loss = engine.forward(batch)``, ``engine.backward(loss)``, ``engine.step()``.
``global_batch_indices`` / ``rank_micro_batches``: the global batches as a pure function of (seed, step).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from sg_distributed.distributed.process_group import DistInfo, is_distributed


def epoch_and_offset(n_items: int, step: int, global_batch: int) -> tuple[int, int]:
    """(epoch, global batch within it) of optimizer step ``step``."""
    per_epoch = n_items // global_batch
    if per_epoch == 0:
        raise ValueError(f"global batch {global_batch} is larger than the {n_items} training examples")
    return divmod(step, per_epoch)


def global_batch_indices(n_items: int, step: int, global_batch: int, seed: int) -> list[int]:
    """Items of global batch ``step``: consecutive slices of a seeded permutation, reshuffled each epoch."""
    epoch, offset = epoch_and_offset(n_items, step, global_batch)
    order = torch.randperm(n_items, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return order[offset * global_batch:(offset + 1) * global_batch]


def rank_micro_batches(indices: list[int], info: DistInfo, micro_batch: int) -> list[list[int]]:
    """This rank's micro-batches of one global batch (rank-major, so 1 rank x N == N ranks x 1)."""
    per_rank = len(indices) // info.world_size
    mine = indices[info.rank * per_rank:(info.rank + 1) * per_rank]
    return [mine[i:i + micro_batch] for i in range(0, len(mine), micro_batch)]


def torch_compression_hook(name: str) -> tuple[object, object]:
    """(state, hook) of torch's DDP gradient compression: PowerSGD (rank 1, error feedback, warm start; plain
    all-reduce for the first 2 steps, as torch recommends) or bf16 compression."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks, powerSGD_hook

    if name == "powersgd":
        state = powerSGD_hook.PowerSGDState(process_group=None, matrix_approximation_rank=1, start_powerSGD_iter=2)
        if dist.get_backend() != "gloo":
            return state, powerSGD_hook.powerSGD_hook

        def powersgd_one_bucket_at_a_time(state, bucket):
            # PowerSGD issues its second all-reduce from the first one's completion callback; gloo runs that on
            # its own thread while autograd issues the next bucket's first all-reduce, so two ranks can order the
            # collectives differently and wait on each other for ever (seen: SmolLM2, 2 ranks, step 3). Waiting
            # here keeps one order on every rank, at the cost of overlapping the exchange with the backward.
            future = powerSGD_hook.powerSGD_hook(state, bucket)
            future.wait()
            return future

        return state, powersgd_one_bucket_at_a_time
    if name == "bf16":  # bf16_compress_hook itself refuses gloo (a CUDA/NCCL version check); same cast-reduce-cast
        def bf16_cast_hook(process_group, bucket):  # (DDP checks hooks named bf16_compress_hook by name)
            return default_hooks._compress_hook(torch.bfloat16, process_group, bucket)

        return None, bf16_cast_hook
    raise ValueError(f"unknown DDP comm hook {name!r}; choose powersgd or bf16")


class Engine:
    """A model + optimizer behind DeepSpeed, FSDP2, DDP or nothing.

    Precision: the model arrives in its weight dtype (fp32 / bf16 / fp16); ``autocast`` (bf16 or fp16)
    runs the forward under ``torch.autocast`` over those weights. ``kept_exchange`` (a
    ``graddrop.exchange.KeptEntries``) makes DDP and DeepSpeed ZeRO-2 reduce only the gradient entries it
    keeps; under FSDP2 it is also where GradDrop masks (``kept_compact=False``: the masked gradients travel
    dense). fp16 outside DeepSpeed (fp16 weights or fp16 autocast) scales the loss with ``torch.amp.GradScaler``, which skips steps whose gradients
    overflow; DeepSpeed brings its own loss scaler (``fp16`` block of its config).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, accumulation: int,
                 ds_config: dict | None = None, max_grad_norm: float | None = None, comm_counter=None,
                 fsdp: bool | dict = False, autocast: torch.dtype | None = None, loss_scaling: bool = False,
                 kept_exchange=None, kept_compact: bool = True, ddp_comm_hook: str = "none"):
        self.module, self.optimizer, self.accumulation = model, optimizer, accumulation
        self.max_grad_norm = max_grad_norm
        self.deepspeed = ds_config is not None
        self.fsdp, self._micro = bool(fsdp), 0
        self.device_type = next((p.device.type for p in model.parameters()), "cpu")
        self.autocast = autocast
        self.scaler = torch.amp.GradScaler(self.device_type) if loss_scaling and not self.deepspeed else None
        if self.fsdp:  # FSDP2: shard in place; the optimizer is re-pointed at the sharded parameters
            from sg_distributed.integrations.fsdp import apply_fsdp2

            self.wrapped = apply_fsdp2(model, optimizer=optimizer, **(fsdp if isinstance(fsdp, dict) else {}))
            if kept_exchange is not None:  # GradDrop masks inside FSDP2's reduce-scatter (its hooks do not survive)
                from sg_distributed.integrations.kept_exchange import install_on_fsdp2

                install_on_fsdp2(self.wrapped, kept_exchange, compact=kept_compact)
        elif self.deepspeed:
            from sg_distributed.integrations.deepspeed import initialize_engine

            if kept_exchange is not None:  # GradDrop: ZeRO-2 reduces only the kept gradient entries
                from sg_distributed.integrations.kept_exchange import install_on_deepspeed, kept_exchange_ds_config

                self.wrapped = initialize_engine(model, optimizer, kept_exchange_ds_config(ds_config))
                install_on_deepspeed(self.wrapped, kept_exchange)
            else:
                self.wrapped = initialize_engine(model, optimizer, ds_config)
        elif is_distributed():
            # Bases and supports are identical on every rank after calibration: no buffer broadcasts. Every rank
            # loaded the same weights: skip DDP's start-up broadcast of all of them when a checksum agrees.
            from sg_distributed.distributed.process_group import replicas_agree

            self.wrapped = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False,
                                                               init_sync=not replicas_agree(model))
            if kept_exchange is not None:  # GradDrop: all-reduce only the kept entries (a Python
                from sg_distributed.integrations.kept_exchange import ddp_comm_hook as kept_hook  # all_reduce)

                self.wrapped.register_comm_hook(None, kept_hook(kept_exchange))
            elif ddp_comm_hook != "none":  # torch's own compression hooks (their all_reduce calls are counted)
                self.wrapped.register_comm_hook(*torch_compression_hook(ddp_comm_hook))
            elif comm_counter is not None:  # DDP's reducer calls C++ collectives: count them in its hook
                self.wrapped.register_comm_hook(None, comm_counter.ddp_hook())
        else:  # one process (cli.parse_args refuses --ddp_comm_hook here)
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
                from sg_distributed.integrations.fsdp import set_gradient_sync

                self._micro += 1
                set_gradient_sync(self.wrapped, self._micro % self.accumulation == 0)
            loss = loss / self.accumulation
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> None:
        """Optimizer step (call once per global batch; DeepSpeed counts micro-steps itself)."""
        if self.deepspeed:
            return
        if self.fsdp:  # replicated k-vectors: one flat gradient all-reduce per step
            from sg_distributed.integrations.fsdp import sync_replicated_grads

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
