"""One switch for every fine-tuning method, so baselines run through the same harness.

Each method trains the same target layers (default: the MLP pair of every selected block):

* ``sparsegrad``: k entries per matrix in the HOSVD basis, fixed support (this library).
* ``sparsegrad_reference``: the paper's algorithm (dense rotated weight, per-step top-k, LazyAdam).
* ``sparsegrad_dynamic``: the same, made data-parallel (exchange of rotated gradients, SparseStateAdam).
* ``meprop``: per-step top-k of |dL/dW| in the original basis (dynamic mode with identity bases).
* ``graddrop``: dense training of the target weights with stochastically masked gradients.
* ``lora``: peft LoRA on the same layers, rank matched to SparseGrad's trainable parameters.
* ``shira``: peft's SHiRA (a fixed random sparse high-rank adapter) on the same layers, r(m+n) trainable entries
  per matrix with LoRA's matched r; its mask seed is the run's seed, so every rank draws the same mask.
* ``full``: dense AdamW on the target weights.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from sg_distributed.sparsegrad.config import SparseGradConfig
from sg_distributed.graddrop import GradDropConfig, apply_graddrop
from sg_distributed.sparsegrad.wrapper import get_sparsegrad_model
from sg_distributed.sparsegrad.optim import clear_masks
from sg_distributed.sparsegrad.targets import find_target_linears

METHODS = ("sparsegrad", "sparsegrad_reference", "sparsegrad_dynamic", "meprop", "graddrop", "lora", "shira", "full")


@dataclass
class Prepared:
    """A model ready to train: its trainable parameters, optimizer factory and per-step hook."""

    method: str
    model: nn.Module
    make_optimizer: Callable[[float], torch.optim.Optimizer]
    after_step: Callable[[], None] = lambda: None
    info: dict[str, Any] = field(default_factory=dict)

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_count(self) -> int:
        return sum(p.numel() for p in self.trainable_parameters())


def matched_lora_rank(model: nn.Module, config: SparseGradConfig) -> int:
    """LoRA rank whose parameter count r*(m+n) summed over targets best matches SparseGrad's sum of k."""
    targets = find_target_linears(model, config.target_modules, config.blocks, config.block_stride)
    k_total = sum(config.entries_for(m.out_features, m.in_features, n) for n, m in targets.items())
    per_rank = sum(m.out_features + m.in_features for m in targets.values())
    return max(1, round(k_total / per_rank))


def _dense_targets(model: nn.Module, config: SparseGradConfig) -> dict[str, nn.Linear]:
    targets = find_target_linears(model, config.target_modules, config.blocks, config.block_stride)
    for p in model.parameters():
        p.requires_grad_(False)
    for module in targets.values():
        module.weight.requires_grad_(True)
    return targets


def sparsegrad_config(model: nn.Module) -> SparseGradConfig:
    """The SparseGradConfig of a peft SparseGrad model (its active adapter's) or of the research wrapper."""
    from peft import PeftModel

    return model.active_peft_config if isinstance(model, PeftModel) else model.peft_config


def prepared_sparsegrad(method: str, wrapped, weight_decay: float = 0.0) -> Prepared:
    """The training form of a calibrated (or restored) SparseGrad model: optimizer factory and step hook.

    ``wrapped``: a peft ``PeftModel`` with a SparseGrad adapter (fixed support), or the research wrapper
    ``SparseGradModel`` (reference / dynamic mode)."""
    config = sparsegrad_config(wrapped)
    info: dict[str, Any] = {"config": config.to_dict()}
    if config.support_mode == "fixed":
        def make(lr):  # the k-vectors and any modules_to_save; the re-selector resets moments in this optimizer
            optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=lr, weight_decay=weight_decay)
            if config.reselect_every:
                info["reselector"] = wrapped.make_reselector(optimizer)
            return optimizer

        after = (lambda: info["reselector"].step()) if config.reselect_every else (lambda: None)
        return Prepared(method, wrapped, make, after, info)
    if config.support_mode == "dynamic":
        info["sparse"] = sparse = {}

        def make_dynamic(lr):  # the engine gets the dense optimizer (norms, biases); W~ buffers step here
            sparse["optimizer"] = wrapped.make_sparse_optimizer(lr)  # SparseStateAdam
            return wrapped.make_optimizer(lr, weight_decay=weight_decay)

        return Prepared(method, wrapped, make_dynamic, lambda: sparse["optimizer"].step(), info)
    return Prepared(method, wrapped, lambda lr: wrapped.make_optimizer(lr, weight_decay=weight_decay),
                    lambda: clear_masks(wrapped.trainable_parameters()), info)


def prepare(method: str, model: nn.Module, config: SparseGradConfig, calibration_batches=None,
            loss_fn=None, graddrop: GradDropConfig | None = None, lora_rank: int | None = None,
            weight_decay: float = 0.0, show_progress: bool = False, seed: int = 0) -> Prepared:
    """Turn a plain model into ``method``'s trainable form (calibrating SparseGrad on the given batches)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(METHODS)}")

    if method in ("sparsegrad", "sparsegrad_reference", "sparsegrad_dynamic", "meprop"):
        if method != "sparsegrad":
            overrides = {"support_mode": "reference" if method == "sparsegrad_reference" else "dynamic"}
            if method == "meprop":
                overrides["basis"] = "identity"
            config = SparseGradConfig.from_dict({**config.to_dict(), **overrides})
        if calibration_batches is None:
            raise ValueError(f"method {method!r} needs calibration batches")
        wrapped = get_sparsegrad_model(model, config)  # peft for fixed support, else the research wrapper
        wrapped.calibrate(calibration_batches, loss_fn=loss_fn, show_progress=show_progress)
        return prepared_sparsegrad(method, wrapped, weight_decay)

    if method == "lora":
        from peft import LoraConfig, get_peft_model

        rank = lora_rank or matched_lora_rank(model, config)
        targets = find_target_linears(model, config.target_modules, config.blocks, config.block_stride)
        lora = LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=list(targets), bias="none")
        peft_model = get_peft_model(model, lora)
        params = lambda: [p for p in peft_model.parameters() if p.requires_grad]
        return Prepared(method, peft_model, lambda lr: torch.optim.AdamW(params(), lr=lr, weight_decay=weight_decay),
                        info={"lora_rank": rank})

    if method == "shira":
        from peft import ShiraConfig, get_peft_model

        rank = lora_rank or matched_lora_rank(model, config)
        targets = find_target_linears(model, config.target_modules, config.blocks, config.block_stride)
        peft_model = get_peft_model(model, ShiraConfig(r=rank, random_seed=seed, target_modules=list(targets)))
        params = lambda: [p for p in peft_model.parameters() if p.requires_grad]
        return Prepared(method, peft_model, lambda lr: torch.optim.AdamW(params(), lr=lr, weight_decay=weight_decay),
                        info={"shira_r": rank})

    targets = _dense_targets(model, config)
    params = [m.weight for m in targets.values()]
    make = lambda lr: torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    if method == "graddrop":
        graddrop = graddrop or GradDropConfig()
        controller = apply_graddrop(model, GradDropConfig.from_dict({**graddrop.to_dict(), "target_modules": list(targets)}))
        return Prepared(method, model, make, controller.step, {"graddrop": graddrop.to_dict(), "controller": controller})
    return Prepared(method, model, make)
