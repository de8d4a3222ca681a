"""Dynamic-support (reference-mode) SparseGrad under data parallelism.

Reference mode keeps the dense rotated weight W~ = P^T W R and, at every step, updates only the top-k
entries of |G~|. Making W~ an ``nn.Parameter`` lets DDP / ZeRO / FSDP all-reduce (or partition) the dense
m x n gradient, which wastes the sparsity, and each rank's top-k differs. Here instead:

* ``DynamicSparseGradLinear`` keeps W~ as a *buffer* (replicated, invisible to the engines' parameter
  handling). Its backward hands the local rotated gradient G~_r = (dY P)^T (x R) to an accumulator on the
  module (summed over micro-batches) and returns only dX to autograd. The bias stays an ordinary parameter.
* ``SparseExchange`` turns each rank's G~_r into the same sorted index set Omega (k entries) and values on
  every rank, either exactly (dense all-reduce, then top-k) or with a sparse all-gather of local top-k
  candidates plus one k-vector all-reduce of the exact values at the chosen indices.
* ``SparseStateAdam`` applies torch.optim.SparseAdam semantics to W~ at Omega, keeping Adam moments only
  for entries that have been selected at least once (sorted flat indices + two 1-D tensors per layer).

Training loop: ``loss.backward()`` (or ``engine.backward``), the engine's / dense optimizer step for the
remaining parameters (bias, norms), then ``sparse_optimizer.step()`` once per optimizer step.
"""
from __future__ import annotations

import math
from typing import Iterable

import torch
import torch.distributed as dist
from torch import nn

from sg_distributed.sparsegrad.layer import (
    ReferenceSparseGradLinear, _apply_keeping_precision, _RotatedBiasGrad, compute_dtype_for, linear_from_rotated,
    master_dtype)

# --------------------------------------------------------------------------------------------- layer


class _DynamicRotated(torch.autograd.Function):
    """y = ((x R) W~^T) P^T; backward accumulates G~ = (dY P)^T (x R) on the module, returns dX only."""

    @staticmethod
    def forward(ctx, x2d, anchor, weight, P, R, module):
        xr = x2d if R is None else x2d @ R
        z = xr @ weight.T
        ctx.save_for_backward(xr, weight, P, R)
        ctx.module = module
        return z if P is None else z @ P.T

    @staticmethod
    def backward(ctx, grad_out):
        xr, weight, P, R = ctx.saved_tensors
        grad_out = grad_out.to(xr.dtype)
        a = grad_out if P is None else grad_out @ P  # T x m
        ctx.module._accumulate(a.T @ xr)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_x = a @ weight
            if R is not None:
                grad_x = grad_x @ R.T
        return grad_x, None, None, None, None, None


class DynamicSparseGradLinear(nn.Module):
    """Reference-mode layer whose dense rotated weight ``rotated_weight`` is a buffer, not a parameter.

    ``P`` / ``R`` None means identity bases (MeProp: top-k of |dL/dW| in the original basis). The local
    rotated gradient of every backward is added to ``grad_accumulator`` (m x n, not a parameter grad);
    ``SparseStateAdam.step`` exchanges, applies and clears it.
    """

    def __init__(self, rotated_weight: torch.Tensor, k: int, P: torch.Tensor | None = None,
                 R: torch.Tensor | None = None, bias: torch.Tensor | None = None, rotated_bias_grad: bool = False):
        super().__init__()
        m, n = rotated_weight.shape
        if (P is None) != (R is None):
            raise ValueError("DynamicSparseGradLinear: give both bases P and R, or neither (identity)")
        if P is not None and (P.shape != (m, m) or R.shape != (n, n)):
            raise ValueError(f"DynamicSparseGradLinear: W~ is {m}x{n} but P is {tuple(P.shape)}, R is {tuple(R.shape)}")
        if not 0 < k <= m * n:
            raise ValueError(f"DynamicSparseGradLinear: k={k} must be in [1, {m * n}]")
        dtype = master_dtype(rotated_weight.dtype)  # W~ is updated in place: full precision (see layer.master_dtype)
        self.out_features, self.in_features, self.k = m, n, k
        self.identity = P is None
        self.register_buffer("rotated_weight", rotated_weight.detach().to(dtype).clone())
        if not self.identity:
            self.register_buffer("P", P.detach().to(dtype), persistent=False)
            self.register_buffer("R", R.detach().to(dtype), persistent=False)
        self.bias = nn.Parameter(bias.detach().to(dtype).clone()) if bias is not None else None
        self.rotated_bias_grad = rotated_bias_grad
        self.requires_rotated_grad = True  # the analogue of requires_grad for the buffer
        self.grad_accumulator: torch.Tensor | None = None
        self.backward_count = 0

    _full_precision = ("rotated_weight", "bias", "P", "R")

    def _apply(self, fn, recurse=True):
        _apply_keeping_precision(self, fn, recurse, self._full_precision, super()._apply)
        return self

    def _accumulate(self, grad: torch.Tensor) -> None:
        grad = grad.to(self.rotated_weight.dtype)  # summed over micro-batches in W~'s precision
        if self.grad_accumulator is None:
            self.grad_accumulator = grad.detach()
        else:
            self.grad_accumulator.add_(grad)
        self.backward_count += 1

    def zero_grad_accumulator(self) -> None:
        self.grad_accumulator = None
        self.backward_count = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype_for(x)
        P = None if self.identity else self.P.to(dtype)
        R = None if self.identity else self.R.to(dtype)
        weight = self.rotated_weight.to(dtype)
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)
        with torch.autocast(x.device.type, enabled=False):  # dtypes are chosen above, for both passes
            if torch.is_grad_enabled() and self.requires_rotated_grad:
                # The anchor is a throw-away leaf that requires grad, so the backward runs even when nothing
                # upstream of x requires grad (first layer) and no m x n parameter exists.
                anchor = torch.empty(0, device=x.device, requires_grad=True)
                out = _DynamicRotated.apply(x2d, anchor, weight, P, R, self)
            else:
                out = x2d if R is None else x2d @ R
                out = out @ weight.T
                out = out if P is None else out @ P.T
        out = out.reshape(*x.shape[:-1], self.out_features)
        if self.bias is not None:
            use_rotated = self.rotated_bias_grad and not self.identity
            out = out + (_RotatedBiasGrad.apply(self.bias, self.P) if use_rotated else self.bias).to(dtype)
        return out

    def merged_linear(self) -> nn.Linear:
        return linear_from_rotated(self.rotated_weight, None if self.identity else self.P,
                                   None if self.identity else self.R, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, k={self.k}, identity={self.identity}"


def make_dynamic(layer: ReferenceSparseGradLinear) -> DynamicSparseGradLinear:
    """A dynamic layer with the reference layer's W~, bases, bias, k and bias-gradient convention."""
    new = DynamicSparseGradLinear(
        layer.rotated_weight.detach(), layer.k,
        None if layer.identity else layer.P, None if layer.identity else layer.R,
        layer.bias.detach() if layer.bias is not None else None, rotated_bias_grad=layer.rotated_bias_grad)
    if new.bias is not None:
        new.bias.requires_grad_(layer.bias.requires_grad)
    return new.to(layer.rotated_weight.device)


def convert_to_dynamic(root: nn.Module) -> dict[str, DynamicSparseGradLinear]:
    """Replace every ReferenceSparseGradLinear under ``root`` (e.g. ``SparseGradModel.base_model``) in place."""
    targets = [(n, m) for n, m in root.named_modules() if isinstance(m, ReferenceSparseGradLinear)]
    converted = {}
    for name, module in targets:
        new = make_dynamic(module)
        parent_name, _, child = name.rpartition(".")
        setattr(root.get_submodule(parent_name) if parent_name else root, child, new)
        converted[name] = new
    return converted


# ------------------------------------------------------------------------------------------ exchange


def topk_indices(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Sorted indices of the k largest entries of a 1-D tensor; ties at the threshold go to lower indices."""
    if k >= scores.numel():
        return torch.arange(scores.numel(), device=scores.device)
    threshold = torch.topk(scores, k, sorted=False).values.min()
    above, tied = scores > threshold, scores == threshold
    # everything above the threshold plus the lowest-index ties up to k, in one nonzero: one host sync per
    # call (it runs per layer per step in SparseStateAdam), and nonzero's output is already sorted
    keep = above | (tied & (tied.cumsum(0) <= k - above.sum()))
    return keep.nonzero().squeeze(1)


def _ring_all_reduce_bytes(numel: int, itemsize: int, world: int) -> int:
    return 2 * (world - 1) * numel * itemsize // world


class SparseExchange:
    """Same top-k index set and (mean) values on every rank from each rank's local gradient.

    ``exact``: all-reduce the dense gradient (mean over ranks), top-k of |G~|; equals a single process on
    the global batch. ``sparse``: local top-k candidates (``oversample`` x k) are all-gathered as (int64
    index, value) pairs, summed per index (a rank contributes only where its own top-k held the index),
    the global top-k of that union is chosen, and one k-vector all-reduce makes the chosen values exact
    means. ``last_bytes`` holds the bytes each rank sent in the last call, by op (ring model for
    all-reduce: 2(p-1)/p * bytes); ``last_dense_bytes`` what a dense all-reduce would have sent.
    Without an initialised process group (or world size 1) both modes are a local top-k.
    """

    def __init__(self, k: int, mode: str = "sparse", group=None, oversample: float = 1.0):
        if mode not in ("sparse", "exact"):
            raise ValueError(f"SparseExchange: mode must be 'sparse' or 'exact', got {mode!r}")
        if oversample < 1.0:
            raise ValueError(f"SparseExchange: oversample must be >= 1, got {oversample}")
        self.k, self.mode, self.group, self.oversample = k, mode, group, oversample
        self.last_bytes: dict[str, int] = {}
        self.last_dense_bytes = 0

    def world_size(self) -> int:
        if dist.is_available() and dist.is_initialized():
            return dist.get_world_size(self.group)
        return 1

    @torch.no_grad()
    def __call__(self, grad: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(sorted int64 flat indices, values) of the selected entries; ``grad`` is this rank's m x n sum."""
        k = k or self.k
        flat = grad.reshape(-1)
        world = self.world_size()
        itemsize = flat.element_size()
        self.last_dense_bytes = _ring_all_reduce_bytes(flat.numel(), itemsize, world)
        if world == 1:
            self.last_bytes = {}
            idx = topk_indices(flat.abs(), k)
            return idx, flat[idx]
        if self.mode == "exact":
            dense = flat.clone()
            dist.all_reduce(dense, group=self.group)
            dense.div_(world)
            self.last_bytes = {"all_reduce": self.last_dense_bytes}
            idx = topk_indices(dense.abs(), k)
            return idx, dense[idx]

        k_local = min(flat.numel(), math.ceil(self.oversample * k))
        local_idx = topk_indices(flat.abs(), k_local)
        local_val = flat[local_idx].contiguous()
        all_idx = [torch.empty_like(local_idx) for _ in range(world)]
        all_val = [torch.empty_like(local_val) for _ in range(world)]
        dist.all_gather(all_idx, local_idx, group=self.group)
        dist.all_gather(all_val, local_val, group=self.group)
        union, inverse = torch.unique(torch.cat(all_idx), return_inverse=True)
        summed = flat.new_zeros(union.numel())
        for r in range(world):  # rank by rank: no duplicate index within one index_add_, so deterministic
            summed.index_add_(0, inverse[r * k_local:(r + 1) * k_local], all_val[r])
        idx = union[topk_indices(summed.abs(), k)]  # union is sorted, so idx is sorted
        values = flat[idx].contiguous()
        dist.all_reduce(values, group=self.group)
        values.div_(world)
        self.last_bytes = {
            "all_gather": (world - 1) * k_local * (local_idx.element_size() + itemsize),
            "all_reduce": _ring_all_reduce_bytes(k, itemsize, world),
        }
        return idx, values


# ----------------------------------------------------------------------------------------- optimizer


class SparseStateAdam:
    """SparseAdam on the W~ buffers of dynamic layers, with moments only for entries ever selected.

    Per layer: a global step counter, sorted flat ``indices`` and 1-D ``exp_avg`` / ``exp_avg_sq`` aligned
    with them. At each step only this step's selected entries move (m, v and W~), exactly as
    torch.optim.SparseAdam / ``LazyAdam``. Every registered layer steps on every call, so all ranks
    issue the same collectives (a layer without a backward this step contributes zeros).
    """

    def __init__(self, layers, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-8, mode: str = "sparse",
                 oversample: float = 1.0, group=None):
        if lr <= 0:
            raise ValueError(f"SparseStateAdam: lr must be > 0, got {lr}")
        if isinstance(layers, nn.Module):
            layers = {n: m for n, m in layers.named_modules() if isinstance(m, DynamicSparseGradLinear)}
        elif not isinstance(layers, dict):
            layers = {str(i): m for i, m in enumerate(layers)}
        if not layers:
            raise ValueError("SparseStateAdam: no DynamicSparseGradLinear layers given")
        self.layers: dict[str, DynamicSparseGradLinear] = layers
        self.lr, self.betas, self.eps = lr, tuple(betas), eps
        self.exchanges = {n: SparseExchange(m.k, mode, group, oversample) for n, m in layers.items()}
        self.state: dict[str, dict] = {}
        self.last_selected: dict[str, torch.Tensor] = {}

    def zero_grad(self) -> None:
        for layer in self.layers.values():
            layer.zero_grad_accumulator()

    @torch.no_grad()
    def step(self, grad_scale: float = 1.0) -> None:
        """Exchange, update and clear every layer's accumulated gradient (``grad_scale``: fp16 loss scale)."""
        for name, layer in self.layers.items():  # same order on every rank
            W = layer.rotated_weight
            grad = layer.grad_accumulator
            if grad is None:
                grad = torch.zeros(W.shape, dtype=W.dtype, device=W.device)
            idx, values = self.exchanges[name](grad, layer.k)
            if grad_scale != 1.0:
                values = values / grad_scale
            self.last_selected[name] = idx
            self._update(name, W, idx, values.to(W.dtype))
            layer.zero_grad_accumulator()

    def _update(self, name: str, W: torch.Tensor, idx: torch.Tensor, grad: torch.Tensor) -> None:
        beta1, beta2 = self.betas
        state = self.state.get(name)
        if state is None:
            empty = W.new_zeros(0)
            state = self.state[name] = {"step": 0, "indices": idx.new_zeros(0), "exp_avg": empty,
                                        "exp_avg_sq": empty.clone()}
        merged = torch.unique(torch.cat([state["indices"], idx]))  # sorted
        if merged.numel() != state["indices"].numel():
            old = torch.searchsorted(merged, state["indices"])
            for key in ("exp_avg", "exp_avg_sq"):
                grown = W.new_zeros(merged.numel())
                grown[old] = state[key]
                state[key] = grown
            state["indices"] = merged
        pos = torch.searchsorted(state["indices"], idx)
        state["step"] += 1
        exp_avg = state["exp_avg"][pos].mul(beta1).add_(grad, alpha=1 - beta1)
        exp_avg_sq = state["exp_avg_sq"][pos].mul(beta2).addcmul_(grad, grad, value=1 - beta2)
        step_size = self.lr * math.sqrt(1 - beta2 ** state["step"]) / (1 - beta1 ** state["step"])
        update = exp_avg / (exp_avg_sq.sqrt() + self.eps) * (-step_size)
        state["exp_avg"][pos] = exp_avg
        state["exp_avg_sq"][pos] = exp_avg_sq
        W.view(-1)[idx] += update

    def state_size(self) -> int:
        """Number of stored moment entries (per moment) over all layers."""
        return sum(s["indices"].numel() for s in self.state.values())

    def state_dict(self) -> dict:
        return {"hyper": {"lr": self.lr, "betas": list(self.betas), "eps": self.eps},
                "state": {n: {k: (v.clone() if torch.is_tensor(v) else v) for k, v in s.items()}
                          for n, s in self.state.items()}}

    def load_state_dict(self, state_dict: dict) -> None:
        unknown = set(state_dict["state"]) - set(self.layers)
        if unknown:
            raise ValueError(f"SparseStateAdam.load_state_dict: unknown layers {sorted(unknown)}")
        hyper = state_dict["hyper"]
        self.lr, self.betas, self.eps = hyper["lr"], tuple(hyper["betas"]), hyper["eps"]
        self.state = {}
        for name, s in state_dict["state"].items():
            device = self.layers[name].rotated_weight.device
            dtype = self.layers[name].rotated_weight.dtype
            self.state[name] = {"step": int(s["step"]), "indices": s["indices"].to(device, torch.int64),
                                "exp_avg": s["exp_avg"].to(device, dtype), "exp_avg_sq": s["exp_avg_sq"].to(device, dtype)}


def dense_parameters(layers: Iterable[DynamicSparseGradLinear]) -> list[nn.Parameter]:
    """The ordinary trainable parameters of dynamic layers (biases), for the engine's own optimizer."""
    return [p for layer in layers for p in layer.parameters() if p.requires_grad]
