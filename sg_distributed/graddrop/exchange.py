"""Kept-only gradient exchange: when every rank knows the mask, only the kept entries need to travel.

GradDrop's masks are a pure function of (seed, counter, parameter) (``masking.py``), so every data-parallel
rank drops exactly the same entries without talking; gradual unfreezing's frozen blocks are known to every
rank too. A reduction of such masked gradients only needs the kept entries: each rank packs them, in the
flat order of the buffer being reduced, into a compact buffer, the ranks reduce that buffer, and each rank
scatters the result back. No index travels. The result equals a dense reduction of the masked gradients
exactly: dropped entries come out 0 (the dense reduction sums zeros), and each kept entry is reduced from
the same operands (sums of 2 values are exact; with more ranks the order of a ring's partial sums may
differ by chunk position, as between two dense runs with different bucket sizes).

Payload per reduction is ``K`` values instead of ``N``: for ``element`` granularity ``K ~ Binomial(N,
1-p)``, for ``row`` the kept rows times the row length, for ``layer`` the kept tensors, and a frozen block
(gradual unfreezing) contributes nothing. A reduction whose every entry is dropped is skipped: all ranks
know it, so none waits.

Cost on the device: the reduction takes the flags the gradient hook drew for that parameter (held from
the hook to the reduction, ``GradDropController.share_flags_with_exchange``; drawn again from the seed only
where no hook ran, as under FSDP2), one boolean mask the size of the buffer, and one host read per reduced
buffer on CUDA (``masked_select`` must know its output size). The engine glue lives in
``sg_distributed.integrations.kept_exchange`` (DDP comm hook, DeepSpeed ZeRO-2, FSDP2).
"""
from __future__ import annotations

from typing import Sequence

import torch

from sg_distributed.graddrop.masking import GradDropController, GradualUnfreezing, _logical_shape

__all__ = ["KeptEntries", "pack", "unpack_"]


class KeptEntries:
    """Which gradient entries travel this step: GradDrop's kept entries and/or the unfrozen blocks'.

    Parameters that neither object manages are sent whole. Flags are read at call time, so a reduction
    issued after ``controller.step()`` would see the next step's masks: engines reduce inside the
    backward, before the optimizer step, which is where the loop advances the counters."""

    def __init__(self, graddrop: GradDropController | None = None, unfreezing: GradualUnfreezing | None = None):
        if graddrop is None and unfreezing is None:
            raise ValueError("KeptEntries needs a GradDropController, a GradualUnfreezing, or both")
        self.graddrop, self.unfreezing = graddrop, unfreezing
        if graddrop is not None:
            graddrop.share_flags_with_exchange()  # the hook's draw serves the reduction too

    def flags(self, param: torch.Tensor, device: torch.device | str, name: str | None = None
              ) -> torch.Tensor | None:
        """Keep flags of ``param`` in a shape that broadcasts to its logical shape; ``None``: all kept.

        ``name`` looks GradDrop targets up by name instead of identity (for engines that replace the
        parameter objects); gradual unfreezing is looked up by identity only."""
        ndim = len(_logical_shape(param))
        if self.unfreezing is not None and self.unfreezing.param_is_active(param) is False:
            return torch.zeros((1,) * ndim, dtype=torch.bool, device=device)
        if self.graddrop is None:
            return None
        if name is not None:
            return self.graddrop.keep_flags_by_name(name, device)
        return self.graddrop.keep_flags(param, device)

    def flat_keep(self, params: Sequence[torch.Tensor], device: torch.device | str,
                  names: Sequence[str | None] | None = None) -> torch.Tensor | None:
        """Bool flags over the concatenation of ``params``' flattened logical shapes (a flat gradient
        bucket's layout); ``None`` when every entry is kept (the dense reduction is then the same)."""
        names = names if names is not None else [None] * len(params)
        per_param = [self.flags(p, device, n) for p, n in zip(params, names)]
        if all(f is None for f in per_param):
            return None
        pieces = []
        for param, f in zip(params, per_param):
            shape = _logical_shape(param)
            if f is None:
                pieces.append(torch.ones(shape.numel(), dtype=torch.bool, device=device))
            else:
                pieces.append(f.expand(shape).reshape(-1))
        return torch.cat(pieces)


def pack(flat: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """The kept entries of ``flat`` in flat order (a new tensor)."""
    if flat.shape != keep.shape:
        raise ValueError(f"kept exchange: buffer of {flat.numel()} entries but keep flags for {keep.numel()}; "
                         "the buffer's layout is not the parameters' flat concatenation")
    return flat.masked_select(keep)


def unpack_(flat: torch.Tensor, keep: torch.Tensor, compact: torch.Tensor) -> torch.Tensor:
    """Write ``compact`` back to ``flat``'s kept positions and 0 elsewhere, in place; returns ``flat``."""
    return flat.zero_().masked_scatter_(keep, compact.to(flat.dtype))
