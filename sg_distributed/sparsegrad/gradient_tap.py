"""Calibration: hooks on the live model that hand each target's gradient factors (dY, X) to a callback.

Nothing is stacked: callers stream G into Gram matrices (bases) or into score matrices (support).
Works for float and bitsandbytes bases alike, since G is built from the layer's input and output
gradient rather than read from ``weight.grad``.
"""
from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


def model_device(model: nn.Module) -> torch.device:
    """Where the model computes: its first floating parameter's device (bitsandbytes weights are
    integer), else its input embeddings', else its first parameter's, else cpu."""
    first = None
    for p in model.parameters():
        if p.dtype.is_floating_point:
            return p.device
        first = p if first is None else first
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.device
    return first.device if first is not None else torch.device("cpu")


def move_to_device(batch: Any, device: torch.device | str) -> Any:
    """``batch`` with every tensor (through Mappings, lists and tuples) on ``device``, dtypes kept.

    Containers keep their type where it can be rebuilt from its items (dict, BatchEncoding, named
    tuples); other leaves are returned as they are.
    """
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        items = {k: move_to_device(v, device) for k, v in batch.items()}
        try:
            return type(batch)(items)
        except TypeError:  # a Mapping type that cannot be built from a dict
            return items
    if isinstance(batch, (list, tuple)):
        items = [move_to_device(v, device) for v in batch]
        if hasattr(batch, "_fields"):  # named tuple
            return type(batch)(*items)
        try:
            return type(batch)(items)
        except TypeError:
            return items
    return batch


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """The loss a transformers model computes for a batch of keyword inputs with labels."""
    if not isinstance(batch, Mapping):
        raise TypeError(f"calibration got a batch of type {type(batch).__name__}: without a loss_fn, batches must be "
                        f"dicts (any Mapping, e.g. a tokenizer's BatchEncoding) of model inputs with labels, called "
                        f"as model(**batch); for other batches pass loss_fn(model, batch) -> scalar loss")
    out = model(**move_to_device(batch, model_device(model)))
    loss = out.loss if hasattr(out, "loss") else (out[0] if isinstance(out, (tuple, list)) else out)
    if loss is None or not torch.is_tensor(loss) or loss.dim() != 0:
        raise ValueError("calibration needs a scalar loss: pass batches with labels, or a loss_fn(model, batch)")
    return loss


@contextlib.contextmanager
def gradient_tap(modules: dict[str, nn.Module], on_grad: Callable[[str, torch.Tensor, torch.Tensor], None]):
    """While active, every backward through ``modules[name]`` calls ``on_grad(name, dY, X)``.

    dY (T x m) and X (T x n) are the 2-D output gradient and input; the weight gradient is dY^T X.
    Consumers use the factors directly, which is cheaper than forming G when T < min(m, n).
    """

    def make_hook(name):
        def hook(module, inputs, output):
            if not output.requires_grad:
                return
            x2d = inputs[0].detach().reshape(-1, inputs[0].shape[-1])

            def on_output_grad(grad):
                on_grad(name, grad.reshape(-1, grad.shape[-1]).to(x2d.dtype), x2d)

            output.register_hook(on_output_grad)

        return hook

    handles = [m.register_forward_hook(make_hook(n)) for n, m in modules.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


@contextlib.contextmanager
def gradients_flowing(model: nn.Module, modules: dict[str, nn.Module]):
    """Make backward reach the targets while every parameter stays frozen.

    The input embeddings' output is marked as requiring grad (like transformers'
    ``enable_input_require_grads``); models without embeddings get their float target weights
    temporarily trainable instead.
    """
    handles, touched = [], []
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    if embeddings is not None:
        handles.append(embeddings.register_forward_hook(lambda m, i, o: o.requires_grad_(True)))
    else:
        for name, module in modules.items():
            if not module.weight.dtype.is_floating_point:
                raise ValueError(f"cannot calibrate quantised layer {name!r} in a model without input embeddings")
            if not module.weight.requires_grad:
                module.weight.requires_grad_(True)
                touched.append(module.weight)
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for p in touched:
            p.requires_grad_(False)
            p.grad = None


def run_backward_passes(model: nn.Module, batches: Iterable[Any], steps: int,
                        loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
                        desc: str = "calibration", show_progress: bool = False) -> int:
    """Forward + backward over up to ``steps`` batches; returns how many ran.

    Every tensor of a batch (through Mappings, lists, tuples) is first moved to the model's device, so
    batches built on the CPU (a DataLoader's, a tokenizer's) calibrate a model on the GPU.
    """
    loss_fn = loss_fn or default_loss
    device = model_device(model)
    count = 0
    for batch in tqdm(batches, total=steps, desc=desc, disable=not show_progress):
        if count >= steps:
            break
        loss = loss_fn(model, move_to_device(batch, device))
        if not loss.requires_grad:
            raise RuntimeError("calibration loss does not require grad: no target layer is on the loss path")
        loss.backward()
        count += 1
    if count == 0:
        raise ValueError("calibration got no batches")
    return count
