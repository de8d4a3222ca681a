"""Calibration: hooks on the live model that hand each target's gradient factors (dY, X) to a callback.

Nothing is stacked: callers stream G into Gram matrices (bases) or into score matrices (support).
Works for float and bitsandbytes bases alike, since G is built from the layer's input and output
gradient rather than read from ``weight.grad``.
"""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm


def default_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    out = model(**batch) if isinstance(batch, dict) else model(batch)
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
    """Forward + backward over up to ``steps`` batches; returns how many ran."""
    loss_fn = loss_fn or default_loss
    count = 0
    for batch in tqdm(batches, total=steps, desc=desc, disable=not show_progress):
        if count >= steps:
            break
        loss = loss_fn(model, batch)
        if not loss.requires_grad:
            raise RuntimeError("calibration loss does not require grad: no target layer is on the loss path")
        loss.backward()
        count += 1
    if count == 0:
        raise ValueError("calibration got no batches")
    return count
