"""LazyAdam: Adam that moves only the entries selected at this step (torch.optim.SparseAdam semantics).

Used by reference mode, whose dense rotated weights carry a boolean ``_sg_mask`` set by the top-k
gradient hook. Parameters without a mask get the same update on every entry. Unlike SparseAdam it
takes dense (zero-filled) gradients, which DeepSpeed and FSDP can reduce.
"""
from __future__ import annotations

import math

import torch


class LazyAdam(torch.optim.Optimizer):
    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8):
        if lr <= 0:
            raise ValueError(f"LazyAdam: lr must be > 0, got {lr}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps))

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                mask = getattr(p, "_sg_mask", None)
                grad = p.grad
                exp_avg = state["exp_avg"].mul(beta1).add_(grad, alpha=1 - beta1)
                exp_avg_sq = state["exp_avg_sq"].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
                update = exp_avg / (exp_avg_sq.sqrt() + group["eps"]) * (-step_size)
                if mask is not None:  # dense where(): no data-dependent shapes, so no host sync per parameter
                    exp_avg = torch.where(mask, exp_avg, state["exp_avg"])
                    exp_avg_sq = torch.where(mask, exp_avg_sq, state["exp_avg_sq"])
                    update = torch.where(mask, update, 0.0)
                state["exp_avg"].copy_(exp_avg)
                state["exp_avg_sq"].copy_(exp_avg_sq)
                p.add_(update)
        return loss


def clear_masks(params) -> None:
    """Forget the selections of the last step (call after ``optimizer.step``)."""
    for p in params:
        if hasattr(p, "_sg_mask"):
            del p._sg_mask
