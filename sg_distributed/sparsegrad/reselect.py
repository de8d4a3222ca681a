"""Drop-and-grow re-selection of a fixed support (``SparseGradConfig.reselect_every``).

A support fixed at calibration cannot follow the gradient once training moves the weights (measured:
the top-1 % energy of the calibration basis decays within ~10 steps, README "Does the basis work?").
Every ``reselect_every`` optimizer steps each SparseGradLinear swaps ``round(reselect_fraction * k)``
entries, in the manner of RigL / SpIEL (Evci et al. 2020; Ansell et al. 2024):

* drop: the trained entries with the smallest |v| (their update P_i v R_j^T leaves the model; it is
  the smallest one the layer has);
* grow: the entries of the layer's rows x cols block, not in the support, with the largest |G~| (or
  G~^2, ``score``) summed over every backward since the last re-selection and over all ranks.

A grown entry takes a dropped entry's *slot*: the k-vector, its optimizer state and their ZeRO/FSDP
partitioning keep their layout, and only the swapped slots' value and moments are reset to zero
(``reset_slots``, local on every rank). Scores come from the dense-block kernel, which forms G~ of
the block anyway, so re-selection needs a row/column budget. Every rank ends with the same support:
scores are all-reduced (one collective for all layers), values are replicated, ties break by index.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from sg_distributed.sparsegrad.layer import SparseGradLinear
from sg_distributed.distributed.process_group import is_distributed


def plan_swap(values: torch.Tensor, score: torch.Tensor, support_block: torch.Tensor, count: int):
    """Which slots to empty and which block entries to put there.

    values: the k trained values (slot order); score: growth score of every block entry (r*c);
    support_block: block index of each slot's entry. Returns ``(slots, grown)``, equally long: at most
    ``count``, fewer when fewer unused entries have a positive score. Ties break by the lower index.
    """
    candidates = score.detach().float().clone()
    candidates[support_block] = float("-inf")
    available = int((candidates > 0).sum())
    count = min(count, available, values.numel())
    if count <= 0:
        empty = torch.empty(0, dtype=torch.int64, device=values.device)
        return empty, empty
    grown = torch.sort(-candidates, stable=True).indices[:count]
    slots = torch.sort(values.detach().abs(), stable=True).indices[:count]
    return slots, grown


def _zero_at(tensor: torch.Tensor, slots: torch.Tensor) -> None:
    tensor.view(-1).index_fill_(0, slots, 0)


@torch.no_grad()
def reset_slots(param: torch.nn.Parameter, slots: torch.Tensor, optimizer: torch.optim.Optimizer | None) -> None:
    """Set ``param[slots]`` and its optimizer moments there to zero, wherever the engine keeps them.

    Plain torch optimizers (one process, DDP): ``optimizer.state[param]``. DeepSpeed ZeRO-1/2: the fp32
    master copy and the moments live in flat partitions; each rank zeroes the slots inside the fragment
    it owns (DeepSpeed's ``_hp_mapping`` tensor fragment, the mapping behind its ``safe_*`` API). ZeRO-3:
    the slots inside this rank's partition of the parameter, its master and moments (DeepSpeed's local
    API). No communication: every rank knows the slots.
    """
    if hasattr(param, "full_tensor") or hasattr(param, "_local_tensor"):
        raise NotImplementedError(
            "support re-selection runs in one process, under DDP, DeepSpeed ZeRO-1/2/3 and FSDP2 with replicated "
            "k-vectors; FSDP2-sharded k-vectors (DTensors) are not supported yet (shard_sparse_values=False)"
        )
    if hasattr(param, "ds_id"):  # DeepSpeed ZeRO-3: this rank's partition of param, master and moments
        _reset_zero3_slots(param, slots, optimizer)
        return
    _zero_at(param.data, slots)
    if hasattr(param, "_hp_mapping"):  # DeepSpeed ZeRO-1/2; None when this rank owns no part of param
        mapping = param._hp_mapping
        if mapping is not None:
            start, numel = mapping.lp_fragment_address.start, mapping.lp_fragment_address.numel
            local = slots[(slots >= start) & (slots < start + numel)] - start
            for key in (None, *mapping.get_optim_state_keys()):
                _zero_at(mapping.get_hp_fragment(key), local)
        return
    if optimizer is not None:
        for value in optimizer.state.get(param, {}).values():
            if torch.is_tensor(value) and value.shape == param.shape:
                _zero_at(value, slots)


def _state_keys(optimizer) -> list[str]:
    """Tensor state keys of the client optimizer (DeepSpeed keys its state by flat partitions)."""
    return sorted({key for state in (optimizer.state.values() if optimizer is not None else ())
                   for key, value in state.items() if torch.is_tensor(value) and value.dim() > 0})


def _reset_zero3_slots(param, slots: torch.Tensor, optimizer) -> None:
    """ZeRO-3 partitions every parameter flat and evenly: rank i holds [i*s, (i+1)*s) of it (s = the
    partition size) in low precision (``ds_tensor``) and in fp32 with its moments (DeepSpeed's local API)."""
    from deepspeed.utils import safe_get_local_fp32_param, safe_get_local_optimizer_state
    from deepspeed.utils import safe_set_local_fp32_param, safe_set_local_optimizer_state

    size = param.ds_tensor.numel()
    start = dist.get_rank(group=getattr(param, "ds_process_group", None)) * size if dist.is_initialized() else 0
    local = slots[(slots >= start) & (slots < start + size)] - start
    _zero_at(param.ds_tensor.data, local)
    if param.data.numel() == param.ds_numel:  # persistent (small) parameters also stay whole on every rank
        _zero_at(param.data, slots)
    master = safe_get_local_fp32_param(param)
    _zero_at(master, local)
    safe_set_local_fp32_param(param, master)
    for key in _state_keys(optimizer):
        state = safe_get_local_optimizer_state(param, key)
        _zero_at(state, local)
        safe_set_local_optimizer_state(param, state, key)


class SupportReselector:
    """Call ``step()`` after every optimizer step; every ``every`` steps it re-selects all supports."""

    def __init__(self, layers: dict[str, SparseGradLinear], every: int, fraction: float, square: bool = False,
                 optimizer: torch.optim.Optimizer | None = None):
        if every < 1:
            raise ValueError(f"SupportReselector: every must be >= 1, got {every}")
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"SupportReselector: fraction must be in (0, 1], got {fraction}")
        self.layers, self.every, self.fraction, self.optimizer = layers, every, fraction, optimizer
        self.steps = 0
        self.history: list[dict] = []
        for name, layer in layers.items():
            try:
                layer.start_scoring(square)
            except ValueError as err:
                raise ValueError(f"layer {name!r}: {err}") from None

    def step(self) -> dict | None:
        self.steps += 1
        if self.steps % self.every:
            return None
        return self.reselect()

    @torch.no_grad()
    def reselect(self) -> dict:
        swapped = total = 0
        distributed = is_distributed()
        if distributed:  # one all-reduce of every layer's scores
            scores = [layer.structure.score for layer in self.layers.values()]
            flat = torch.cat(scores)
            dist.all_reduce(flat)
            for score, summed in zip(scores, flat.split([s.numel() for s in scores])):
                score.copy_(summed)
        for layer, values in zip(self.layers.values(), self._full_values()):
            score = layer.structure.score
            count = round(self.fraction * values.numel())  # not layer.k: ZeRO-3 leaves an empty placeholder
            slots, grown = plan_swap(values, score, layer.structure.flat, count)
            if slots.numel():
                reset_slots(layer.sparsegrad_values, slots, self.optimizer)
                layer.replace_entries(slots, grown)
            score.zero_()
            swapped += slots.numel()
            total += values.numel()
        record = {"step": self.steps, "swapped": swapped, "entries": total}
        self.history.append(record)
        return record

    def _full_values(self) -> list[torch.Tensor]:
        """Every layer's whole k-vector (ZeRO-3 partitions them: gathered once for all layers)."""
        params = [layer.sparsegrad_values for layer in self.layers.values()]
        if not any(hasattr(p, "ds_id") for p in params):
            return [p.detach() for p in params]
        import deepspeed

        with deepspeed.zero.GatheredParameters(params):
            return [p.detach().clone() for p in params]

    # --- checkpoints: the schedule and this rank's partial scores (summed across ranks at re-selection) ----
    def state_dict(self) -> dict:
        return {"steps": self.steps, "history": list(self.history),
                "scores": {name: layer.structure.score.detach().cpu().clone() for name, layer in self.layers.items()}}

    def load_state_dict(self, state: dict, scores: bool = True) -> None:
        """``scores=False``: keep the schedule only (a resharded resume gives the old ranks' scores to
        one rank with ``add_scores`` so that their sum is unchanged)."""
        self.steps, self.history = int(state["steps"]), list(state["history"])
        for name, layer in self.layers.items():
            layer.structure.score.zero_()
        if scores:
            self.add_scores(state)

    def add_scores(self, state: dict) -> None:
        for name, layer in self.layers.items():
            layer.structure.score.add_(state["scores"][name].to(layer.structure.score.device))

