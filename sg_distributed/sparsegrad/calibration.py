"""SparseGrad calibration: bases (HOSVD of streamed gradient Grams) and supports (top k of the summed rotated
gradient), from a few forward/backward passes over the frozen model.

Runs on every rank of a process group: Grams and scores are summed across ranks and rank 0's choices are
broadcast, so every rank ends with identical bases and supports, and N ranks that together see the
micro-batches of a one-rank run choose the same. Used by the peft tuner (``sparsegrad.model``) and by the
standalone ``SparseGradModel``.
"""
from __future__ import annotations

import hashlib
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch import nn

from sg_distributed.sparsegrad.basis import Bases, GramAccumulator, compute_dtype, identity_bases
from sg_distributed.sparsegrad.gradient_tap import gradient_tap, run_backward_passes
from ..io import tensor_bytes
from sg_distributed.distributed.process_group import in_place_collective, is_distributed
from sg_distributed.sparsegrad.selection import Support, choose_block, leading_block, select_support, top_k_in_block
from sg_distributed.sparsegrad.targets import layer_type
from .config import SparseGradConfig
from .layer import compute_dtype_of, master_dtype


def _all_reduce_sum(tensor: torch.Tensor) -> None:
    if is_distributed():
        in_place_collective(tensor, dist.all_reduce)


def _columns(basis: torch.Tensor, index: torch.Tensor | int) -> torch.Tensor:
    """The block's columns of a basis: the leading ``index`` ones (an int: a view), or a gather."""
    return basis[:, :index] if isinstance(index, int) else basis.index_select(1, index)


def _block_from_rank0(block: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank 0's budget rows and cols on every rank, before the block pass (the blocks' scores are summed)."""
    if is_distributed():
        for t in block:
            in_place_collective(t, lambda t: dist.broadcast(t, src=0))
    return block


def _from_rank0(support: Support) -> Support:
    """Rank 0's support (and budget block) on every rank: ranks select from identical summed scores, but a
    top-k tie could still break differently on different hardware; k indices are cheap to send."""
    if not is_distributed():
        return support
    tensors = [support.flat()] + (list(support.block) if support.block is not None else [])
    for t in tensors:  # the block's sizes are the budget: equal on every rank
        in_place_collective(t, lambda t: dist.broadcast(t, src=0))
    result = Support.from_flat(tensors[0], support.shape)
    result.block = (tensors[1], tensors[2]) if support.block is not None else None
    return result


def assign_basis_keys(targets: dict[str, nn.Module], sharing: str) -> dict[str, str]:
    """One basis per layer type (or per layer); a type whose layers differ in shape is split by shape."""
    if sharing == "layer":
        return {name: name for name in targets}
    shapes: dict[str, set] = {}
    for name, module in targets.items():
        shapes.setdefault(layer_type(name), set()).add((module.out_features, module.in_features))
    keys = {}
    for name, module in targets.items():
        kind = layer_type(name)
        keys[name] = kind if len(shapes[kind]) == 1 else f"{kind}@{module.out_features}x{module.in_features}"
    return keys


class Calibrator:
    """The passes of one calibration over ``modules`` (name -> frozen linear, in the same order on every rank)."""

    def __init__(self, model: nn.Module, modules: dict[str, nn.Module], basis_keys: dict[str, str],
                 config: SparseGradConfig, batches: list[Any], loss_fn: Callable | None = None,
                 show_progress: bool = False):
        self.model, self.modules, self.basis_keys, self.config = model, modules, basis_keys, config
        self.batches, self.loss_fn, self.show_progress = batches, loss_fn, show_progress

    def fit_bases(self, gram_dtype: torch.dtype) -> dict[str, Bases]:
        """Pass 1: the per-type Grams of dY and X, summed over ranks, solved for P and R."""
        batches, modules, loss_fn, show_progress = self.batches, self.modules, self.loss_fn, self.show_progress
        if self.config.basis == "identity":
            return {self.basis_keys[n]: identity_bases(m.out_features, m.in_features, dtype=torch.float64,
                                                      device=m.weight.device) for n, m in modules.items()}
        acc = GramAccumulator(dtype=gram_dtype)
        with gradient_tap(modules, lambda name, dy, x: acc.add_factors(self.basis_keys[name], dy, x)):
            run_backward_passes(self.model, batches, len(batches), loss_fn, "calibration: bases", show_progress)
        acc.all_reduce()
        return acc.bases(self.config.input_convention, self.basis_dtypes(), release=True)

    def basis_dtypes(self) -> dict[str, torch.dtype]:
        """float32 for a type whose layers all keep float32 masters (fp32/bf16/fp16/quantised bases) in fixed
        mode, else float64. Exact: the supports are scored in float32 there (``compute_dtype`` of the layers'
        activations, never float64 when the weight is not), from ``P.to(float32)`` -- the same single rounding
        of the float64 solution as storing it rounded -- and ``SharedBasis`` rounds its master to float32 too.
        Reference / dynamic layers keep float64 (their bases are checksummed and saved as they are)."""
        dtypes: dict[str, torch.dtype] = {}
        for name, module in self.modules.items():
            fp32 = self.config.support_mode == "fixed" and master_dtype(compute_dtype_of(module)) == torch.float32
            key = self.basis_keys[name]
            dtypes[key] = torch.float32 if fp32 and dtypes.get(key, torch.float32) == torch.float32 else torch.float64
        return dtypes

    def select_supports(self, bases: dict[str, Bases], dtype: torch.dtype) -> dict[str, Support]:
        """Score |G~| (or G~^2) summed over the calibration batches and keep the top k of each layer.

        Memory stays at what can be selected. Under a row/column budget one pass sums the score's rows and
        columns (m + n per layer), ``choose_block`` picks the budget's rows x cols, and a second pass scores
        only that block (r x c per layer, from the sliced factors: cheaper too); a ``leading`` block needs
        no first pass. Only layers without a budget keep a whole m x n score. Accumulated in ``dtype``
        (float64: order-insensitive).
        """
        config, square = self.config, self.config.score == "square"
        batches, modules, loss_fn, show_progress = self.batches, self.modules, self.loss_fn, self.show_progress
        shapes = {name: (module.out_features, module.in_features) for name, module in modules.items()}
        budgets = {name: config.block_budget(m, n) for name, (m, n) in shapes.items()}
        budgeted = {name for name, (m, n) in shapes.items() if budgets[name] != (m, n)}
        summed = set() if config.budget_block == "leading" else budgeted  # blocks chosen from row/column sums
        work_bases: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # bases cast once per type and dtype

        def factors(name, dy, x, rows=None, cols=None):
            work = compute_dtype(dy.dtype)
            key = (self.basis_keys[name], work, dy.device)
            if key not in work_bases:
                basis = bases[self.basis_keys[name]]
                if basis.P.dtype.itemsize < work.itemsize:
                    raise RuntimeError(f"calibration: {name!r} computes in {work} but its bases were kept in "
                                       f"{basis.P.dtype} (see basis_dtypes)")
                work_bases[key] = (basis.P.to(dy.device, work), basis.R.to(dy.device, work))
            P, R = work_bases[key]
            if rows is not None:  # the block's columns of P and R: views when leading, else gathered per use
                P, R = _columns(P, rows), _columns(R, cols)
            rotated = Bases(P, R).rotate_factors(dy.to(work), x.to(work))  # P^T (dY^T X) R, never forming G
            return rotated.square() if square else rotated.abs()

        sums: dict[str, list[torch.Tensor]] = {}
        full: dict[str, torch.Tensor] = {}

        def accumulate_sums(name, dy, x):
            if name in budgeted and name not in summed:
                return
            value = factors(name, dy, x)
            if name in budgeted:
                parts = [value.sum(1).to(dtype), value.sum(0).to(dtype)]
                sums[name] = parts if name not in sums else [a.add_(b) for a, b in zip(sums[name], parts)]
            else:
                value = value.to(dtype)
                full[name] = value if name not in full else full[name].add_(value)

        if summed or len(budgeted) < len(modules):
            with gradient_tap(modules, accumulate_sums):
                run_backward_passes(self.model, batches, len(batches), loss_fn, "calibration: supports",
                                    show_progress)
        blocks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for name in modules:  # same order on every rank
            if name in summed:
                for total in sums[name]:
                    _all_reduce_sum(total)
                blocks[name] = _block_from_rank0(choose_block(*sums[name], *budgets[name]))
            elif name in budgeted:
                blocks[name] = leading_block(*budgets[name], device=modules[name].weight.device)
        del sums
        # what the block pass slices P and R with: a leading block's sizes (views, no host read per call)
        columns = {name: budgets[name] if name not in summed else blocks[name] for name in blocks}

        scores: dict[str, torch.Tensor] = {}
        if budgeted:
            def accumulate_block(name, dy, x):
                if name in budgeted:
                    value = factors(name, dy, x, *columns[name]).to(dtype)
                    scores[name] = value if name not in scores else scores[name].add_(value)

            with gradient_tap(modules, accumulate_block):
                run_backward_passes(self.model, batches, len(batches), loss_fn, "calibration: budget blocks",
                                    show_progress)
        work_bases.clear()
        supports = {}
        for name in modules:
            (m, n), k = shapes[name], config.entries_for(*shapes[name], name)
            if name in budgeted:
                _all_reduce_sum(scores[name])
                support = top_k_in_block(scores.pop(name), k, *blocks[name], (m, n))
            else:
                _all_reduce_sum(full[name])
                support = select_support(full.pop(name), k)
            supports[name] = _from_rank0(support)
        return supports


def support_checksum(layers: dict[str, nn.Module], bases: dict[str, Any]) -> str:
    """SHA-256 of every layer's support (fixed-support layers) and every basis key's P and R (exact bytes, any
    dtype): equal on every rank after calibration."""
    digest = hashlib.sha256()
    for name, layer in layers.items():
        digest.update(name.encode())
        if hasattr(layer, "support_flat"):
            digest.update(tensor_bytes(layer.support_flat))
    for key in sorted(bases):
        digest.update(key.encode())
        digest.update(tensor_bytes(bases[key].P))
        digest.update(tensor_bytes(bases[key].R))
    return digest.hexdigest()
