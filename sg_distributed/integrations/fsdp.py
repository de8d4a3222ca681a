"""PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``) for SparseGrad models.

``apply_fsdp2(model)`` shards every decoder block and then the root, so the frozen float base weights
(attention, MLP, embeddings, norms) are sharded across ranks and all-gathered block by block in forward
(and again in backward when ``reshard_after_forward``).

Quantised bases
===============
A 4-bit (nf4 / fp4) base packed into a float storage dtype -- ``BitsAndBytesConfig(load_in_4bit=True,
bnb_4bit_quant_storage=torch.bfloat16)``, or ``Linear4bit(..., quant_storage=torch.bfloat16)`` -- is sharded
like any float weight (FSDP-QLoRA): FSDP2 splits the packed words along dim 0 and all-gathers them per block
before forward. The gathered weight is a plain ``nn.Parameter`` without the bnb ``quant_state``, so
``apply_fsdp2`` keeps that (small, whole) state on the ``Linear4bit`` module, where bitsandbytes' own forward
(``fix_4bit_weight_quant_state_from_module``) looks for it when the weight has lost it. FSDP2 never casts
the packed words: a ``param_dtype`` other than their storage dtype is refused (a float round trip could
change NaN bit patterns, i.e. the nf4 codes).
Other frozen bitsandbytes weights are passed to ``fully_shard`` as ``ignored_params`` and stay whole on
every rank: int8 (``Int8Params``: sharding loses its CB/SCB state and ``Linear8bitLt`` fails), 4-bit in the
default uint8 storage (only the float storage of FSDP-QLoRA is sharded here: the convention HF / accelerate
use, and the tested path), and any other non-floating parameter.

The k-vectors
=============
``shard_sparse_values=False`` (default, *replicated*): every ``sparsegrad_values`` is also an ignored
param: a plain tensor, whole on every rank, never all-gathered. After the last micro-batch of a step
``sync_replicated_grads(model)`` all-reduces all their gradients in **one** flat bucket (average over
ranks); ``Engine.step`` calls it, a hand-written loop must call it before ``optimizer.step()``.
``shard_sparse_values=True`` (*sharded*): the k-vectors are FSDP2 DTensor params of their block: every
micro-batch all-gathers them with the block's weights in forward (again in backward when resharding)
and reduce-scatters their gradients per block; the optimizer state is sharded (k/p per rank).

Measured on this machine (2 CPU ranks, gloo; ``CommCounter`` bytes per optimizer step on rank 0, ring
"wire" convention of sg_distributed/distributed/comm.py; the box was shared with other jobs, so times are noisy):

``benchmarks/bench_fsdp.py`` (random Llama, 4 blocks 256x1024, vocab 256, SparseGrad on MLP up/down at
density 1 %: k = 20,968 fp32 values = 83,872 B; micro-batch 4x64; 14 steps x 3 interleaved rounds)::

    grad_accum  k-vectors    calls/step  wire B/step   of which k-vectors  median step
    1           replicated   11          17,394,592     83,872 (1 all-reduce)      206 ms
    1           sharded      14          17,436,576    125,856 (AG fwd+bwd, RS)    223 ms
    2           replicated   21          34,705,312     83,872                     426 ms
    2           sharded      24          34,831,200    209,760                     591 ms

``train_qa.py --fsdp`` on the tiny test Llama (hidden 32, density 0.5: k = 4,096 values = 16,384 B,
grad_accum 1): replicated 6,390,400 B/step, of which 16,384 B k-vector all-reduce; sharded 6,398,592 B
wire (6,406,784 payload), of which 24,576 B k-vector (the rest is the frozen base, mostly the tied
49k-token embedding). Both equal the 1-rank run bit for bit.

So: the k-vector part is ``2(p-1)/p*k*b`` once per step when replicated against ``3(p-1)/p*k*b`` per
micro-batch when sharded (1.5x at grad_accum 1, 2.5x at grad_accum 2 with the reduce-scatter only on the
last micro-batch), plus one reduce-scatter call per block instead of one all-reduce in all. Either way
the k-vectors are < 1 % of FSDP's traffic, which is the all-gather of the frozen base; sharding them would
only save ~3k floats (values + Adam moments) per rank. Default: ``shard_sparse_values=False``.
Sharded mode stays available (dense trainable parameters alongside, or very large k).

Plain tensors in the autograd Function
======================================
Inside an FSDP2 block's forward the registered parameters are the *unsharded* plain ``nn.Parameter``
objects (FSDP2 swaps DTensors out in its pre-forward hook), so ``_SparseDelta`` receives ordinary
tensors in both modes; the index buffers are buffers, which FSDP2 never shards, and the shared bases
(``SharedBasis``) are plain attributes FSDP2 never sees (it moves buffers to the mesh device without
``_apply``: ``apply_fsdp2`` therefore moves the model with ``model.to`` first so the bases and
``SparseGradLinear.structure`` follow).
"""
from __future__ import annotations

import contextlib
import re
from typing import Iterable, Iterator

import torch
import torch.distributed as dist
from torch import nn

from sg_distributed.distributed.process_group import is_distributed

__all__ = ["FSDPSetupError", "apply_fsdp2", "find_blocks", "quantized_params", "shardable_4bit_weights",
           "sync_replicated_grads",
           "gathered_full_params", "set_gradient_sync", "is_fsdp_model", "find_root"]

# Names of repeated blocks: model.layers.3 (Llama/Mistral/Qwen), transformer.h.3 (GPT-2),
# encoder.layer.3 (BERT), blocks.3.
BLOCK_PATTERN = r"(?:^|\.)(?:layers|layer|h|blocks|block)\.\d+$"

_REPLICATED = "_sg_fsdp_replicated"


class FSDPSetupError(RuntimeError):
    """The model cannot be sharded as given (and what to do about it)."""


def _is_quantized_param(p: torch.Tensor) -> bool:
    return type(p).__name__ in ("Int8Params", "Params4bit") or not p.dtype.is_floating_point


def quantized_params(model: nn.Module) -> set[nn.Parameter]:
    """bitsandbytes int8 / 4-bit weights, every parameter of a bnb layer, and any non-floating parameter."""
    out = {p for p in model.parameters() if _is_quantized_param(p)}
    for module in model.modules():
        if type(module).__name__ in ("Linear8bitLt", "Linear4bit"):
            out.update(module.parameters(recurse=False))  # bnb may rewrite bias.data in its forward
    return out


def shardable_4bit_weights(model: nn.Module) -> set[nn.Parameter]:
    """The packed weights of the quantised ``Linear4bit`` layers whose storage dtype is a float
    (``bnb_4bit_quant_storage=torch.bfloat16``): the quantised weights FSDP2 can shard."""
    return {m.weight for m in model.modules() if type(m).__name__ == "Linear4bit"
            and type(m.weight).__name__ == "Params4bit" and m.weight.dtype.is_floating_point
            and m.weight.bnb_quantized}


def _prepare_sharded_4bit(model: nn.Module, weights: set[nn.Parameter], param_dtype: torch.dtype | None) -> None:
    """Make each ``Linear4bit`` whose packed weight FSDP2 will shard work on the gathered plain tensor."""
    for name, module in model.named_modules():
        if type(module).__name__ != "Linear4bit" or module.weight not in weights:
            continue
        if param_dtype is not None and module.weight.dtype != param_dtype:
            raise FSDPSetupError(
                f"apply_fsdp2: {name}.weight packs 4-bit codes into {module.weight.dtype} words, which "
                f"param_dtype={param_dtype} would cast (and could corrupt); load the base with "
                f"bnb_4bit_quant_storage={param_dtype} (or param_dtype=None), or pass the weight in ignored_params")
        # FSDP2 drops the Params4bit subclass with its quant_state; bnb's forward restores it from here
        module.quant_state = module.weight.quant_state
        # bnb's CPU eval fast path would repack the gathered buffer in place into another shape
        module.support_avx512bf16_for_cpu = False


def find_blocks(model: nn.Module, pattern: str = BLOCK_PATTERN) -> list[nn.Module]:
    """The outermost modules whose names match ``pattern`` (``...layers.<i>``): one FSDP unit each."""
    regex = re.compile(pattern)
    blocks, names = [], []
    for name, module in model.named_modules():
        if regex.search(name) and not any(name.startswith(n + ".") for n in names):
            blocks.append(module)
            names.append(name)
    return blocks


def _sparse_values(model: nn.Module) -> list[nn.Parameter]:
    from ..sparsegrad.layer import SparseGradLinear

    return [m.sparsegrad_values for m in model.modules() if isinstance(m, SparseGradLinear)]


def find_root(model: nn.Module) -> nn.Module:
    """The module that gets the root ``fully_shard``: unwrap single-child wrappers (SparseGradModel ->
    its HF model, PeftModel -> LoraModel -> HF model), so that ``generate`` -- which wrappers forward to
    the inner model, bypassing their own ``forward`` -- still runs the root's FSDP hooks."""
    root = model
    while True:
        children = list(root.children())
        if len(children) != 1 or list(root.parameters(recurse=False)):
            return root
        root = children[0]


def is_fsdp_model(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule) or any(isinstance(m, FSDPModule) for m in model.modules())


def apply_fsdp2(model: nn.Module, mesh=None, reshard_after_forward: bool = True, shard_sparse_values: bool = False,
                ignored_params: Iterable[nn.Parameter] = (), ignore_quantized: bool = True,
                block_pattern: str = BLOCK_PATTERN, optimizer: torch.optim.Optimizer | None = None,
                param_dtype: torch.dtype | None = None) -> nn.Module:
    """Shard ``model`` with FSDP2: ``fully_shard`` on every block (see ``find_blocks``), then on the root.

    mesh: a 1-D DeviceMesh (default: all ranks, on cuda when available else cpu).
    shard_sparse_values: False (default) keeps the SparseGrad k-vectors replicated, outside FSDP, with
        one gradient all-reduce per step by ``sync_replicated_grads``; True makes them sharded FSDP
        params. See the module docstring for the measurements behind the default.
    ignored_params: more parameters to keep out of FSDP (replicated, never synchronised by FSDP).
    ignore_quantized: keep the bitsandbytes / non-floating weights not sharded here (int8, uint8-stored
        4-bit) out of FSDP, whole on every rank; with False, any such weight not in ``ignored_params`` raises
        ``FSDPSetupError`` (strict mode). 4-bit weights in a float storage dtype (``shardable_4bit_weights``)
        are sharded either way unless they are in ``ignored_params``.
    optimizer: an optimizer built on the model's parameters *before* sharding (state still empty); its
        parameter groups are re-pointed at the parameters FSDP2 puts in their place.
    param_dtype: mixed precision (``MixedPrecisionPolicy``): blocks all-gather and compute in this dtype
        (e.g. bf16) while gradients are reduced in fp32; sharded parameters keep their own dtype. The
        replicated k-vectors stay fp32 and are reduced in fp32 by ``sync_replicated_grads``.

    Returns ``model``, sharded in place: the blocks and ``find_root(model)`` (the model itself, or the HF
    model inside a SparseGradModel / PeftModel) become ``FSDPModule``s.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if not dist.is_initialized():
        raise FSDPSetupError("apply_fsdp2 needs an initialised process group (launch with torchrun; "
                             "torch.distributed.init_process_group)")
    if mesh is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    if mesh.device_type == "cuda":  # FSDP2 moves tensors with .data =, bypassing SparseGradLinear._apply
        device = torch.device("cuda", torch.cuda.current_device())
        if any(p.device != device for p in model.parameters() if p.dtype.is_floating_point):
            model.to(device)
    replicated = [] if shard_sparse_values else _sparse_values(model)
    sharded_4bit = shardable_4bit_weights(model) - set(ignored_params)
    whole_quantized = quantized_params(model) - sharded_4bit
    ignored = set(ignored_params) | set(replicated) | (whole_quantized if ignore_quantized else set())
    if optimizer is not None and any(optimizer.state.values()):
        raise FSDPSetupError("apply_fsdp2(optimizer=...): the optimizer has already stepped; build it before "
                             "training (or after sharding) so its parameters can be re-pointed")
    old_names = {id(p): n for n, p in model.named_parameters()}

    unshardable = [n for n, p in model.named_parameters()
                   if _is_quantized_param(p) and p not in ignored and p not in sharded_4bit]
    if unshardable:
        # fully_shard itself accepts them, but turns each into a plain DTensor shard: bnb's int8 state (CB/SCB)
        # is lost and Linear8bitLt fails at the first forward ("'Parameter' object has no attribute 'CB'").
        # Refuse here, where the cause is still visible.
        p = model.get_parameter(unshardable[0])
        raise FSDPSetupError(
            f"apply_fsdp2: {len(unshardable)} quantised / non-floating parameter(s) are not sharded by apply_fsdp2 "
            f"(e.g. {unshardable[0]}: {type(p).__name__}, {p.dtype}): bitsandbytes int8 weights cannot be, and "
            f"4-bit weights only in a float storage dtype (load with BitsAndBytesConfig(load_in_4bit=True, "
            f"bnb_4bit_quant_storage=torch.bfloat16)). Keep ignore_quantized=True (the default: whole on every "
            f"rank) or pass them in ignored_params.")
    blocks = find_blocks(model, block_pattern)
    if not blocks:
        raise FSDPSetupError(f"apply_fsdp2: no block matches {block_pattern!r} in {type(model).__name__}; "
                             f"pass block_pattern= (a regex on module names such as 'model.layers.3')")
    _prepare_sharded_4bit(model, sharded_4bit, param_dtype)
    policy = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32 if param_dtype else None)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored,
                    mp_policy=policy)
    fully_shard(find_root(model), mesh=mesh, reshard_after_forward=reshard_after_forward, ignored_params=ignored,
                mp_policy=policy)

    setattr(model, _REPLICATED, replicated)
    if optimizer is not None:
        new = {n: p for n, p in model.named_parameters()}
        for group in optimizer.param_groups:
            group["params"] = [new[old_names[id(p)]] if id(p) in old_names else p for p in group["params"]]
    return model


def _replicated(model: nn.Module) -> list[nn.Parameter]:
    return model.__dict__.get(_REPLICATED, [])


@torch.no_grad()
def sync_replicated_grads(model: nn.Module) -> int:
    """Average the gradients of the replicated k-vectors over ranks in one flat all-reduce.

    Call once per optimizer step, after the last backward; returns the number of values reduced.
    A parameter without a gradient on this rank contributes zeros (every rank must take part).
    """
    params = [p for p in _replicated(model) if p.requires_grad]
    if not params or not is_distributed():
        return 0
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    dist.all_reduce(flat)
    flat.div_(dist.get_world_size())
    offset = 0
    for p in params:
        n = p.numel()
        p.grad = flat[offset:offset + n].view_as(p).clone()
        offset += n
    return offset


def set_gradient_sync(model: nn.Module, enabled: bool) -> None:
    """Skip (False) or do (True) FSDP2's reduce-scatter in the next backward (micro-batch accumulation)."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.set_requires_gradient_sync(enabled, recurse=False)


@contextlib.contextmanager
def gathered_full_params(model: nn.Module, params: Iterable[nn.Parameter] | None = None) -> Iterator[None]:
    """Within the block, the given sharded (DTensor) parameters are whole plain tensors on every rank.

    A collective: every rank must enter (like DeepSpeed's ``GatheredParameters``). Default: the trainable
    parameters. Used to save an adapter whose k-vectors are sharded; read-only (changes are dropped).
    """
    from torch.distributed.tensor import DTensor

    wanted = set(params) if params is not None else {p for p in model.parameters() if p.requires_grad}
    swapped = []
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p in wanted and isinstance(p, DTensor):
                full = nn.Parameter(p.detach().full_tensor(), requires_grad=p.requires_grad)
                module._parameters[name] = full
                swapped.append((module, name, p))
    try:
        yield
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p
