"""The research wrapper for the paper-exact SparseGrad modes, and ``get_sparsegrad_model`` for every mode.

Fixed support (the default, ``support_mode="fixed"``) is a peft method: ``peft.get_peft_model(model,
SparseGradConfig(...))`` (``sparsegrad/model.py``). The ``reference`` mode (the authors' algorithm: a dense rotated
m x n weight W~ per layer, top-k of |G~| at every backward, LazyAdam) and the ``dynamic`` mode (the same made
data-parallel: W~ a buffer, SparseStateAdam) train a dense matrix per layer, not an adapter of k values, so
they do not fit peft's tuner-layer model; ``SparseGradModel`` wraps them with the same verbs (calibrate,
save_pretrained / from_pretrained, merge_and_unload). Their adapters use this module's own format (``FORMAT``).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from sg_distributed.sparsegrad.basis import Bases, identity_bases
from sg_distributed.sparsegrad.gradient_tap import gradients_flowing
from sg_distributed.sparsegrad.dynamic import SparseStateAdam, make_dynamic
from sg_distributed.io import atomic_directory
from sg_distributed.sparsegrad.optim import LazyAdam
from sg_distributed.quant import quantization_of
from sg_distributed.sparsegrad.calibration import Calibrator, assign_basis_keys, support_checksum
from sg_distributed.sparsegrad.config import SparseGradConfig
from sg_distributed.sparsegrad.layer import ReferenceSparseGradLinear
from sg_distributed.sparsegrad.targets import find_target_linears

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "sg_distributed.sparsegrad/1"


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        model.get_submodule(name)
        return True
    except AttributeError:
        return False


def read_adapter(directory: str | Path) -> tuple[dict, SparseGradConfig, dict[str, torch.Tensor]]:
    """(metadata, config, tensors) of an adapter directory in this wrapper's format (``FORMAT``)."""
    config_path = Path(directory) / ADAPTER_CONFIG
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: not a SparseGrad adapter directory")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{config_path}: adapter format {meta.get('format')!r} is not {FORMAT!r} (a peft adapter? "
                         f"load it with PeftModel.from_pretrained)")
    return meta, SparseGradConfig.from_dict(meta["config"]), load_file(str(Path(directory) / ADAPTER_WEIGHTS))


FIXED_IS_PEFT = ("support_mode='fixed' is a peft method: peft.get_peft_model(model, config) (or "
                 "sg_distributed.get_sparsegrad_model); SparseGradModel wraps the 'reference' and 'dynamic' modes")


class SparseGradModel(nn.Module):
    """Wraps a transformers (or any torch) model for the reference / dynamic modes; W~ (and, unless frozen by
    ``reference_freeze_layernorm``, the norms) train."""

    def __init__(self, model: nn.Module, config: SparseGradConfig):
        super().__init__()
        if config.support_mode == "fixed":
            raise ValueError(f"SparseGradModel: {FIXED_IS_PEFT}")
        self.base_model = model
        self.peft_config = config
        targets = find_target_linears(model, config.target_modules, config.blocks, config.block_stride)
        self.target_names = list(targets)
        for name, module in targets.items():
            config.entries_for(module.out_features, module.in_features, name)  # validate k early
        self.basis_keys = assign_basis_keys(targets, config.basis_sharing)
        self.base_quantization = quantization_of(targets.values())  # the layers dequantise their base: record it
        for p in model.parameters():
            p.requires_grad_(False)
        self.bases: dict[str, Bases] = {}  # float64, from calibration
        self.calibrated = False
        self.skipped_steps = 0

    # --- plumbing -----------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        if not self.calibrated:
            raise RuntimeError("SparseGradModel: call calibrate(batches) (or from_pretrained) before training or inference")
        return self.base_model(*args, **kwargs)

    def basis_key(self, name: str) -> str:
        return self.basis_keys[name]

    def converted_layers(self) -> dict[str, nn.Module]:
        return {n: self.base_model.get_submodule(n) for n in self.target_names}

    # --- calibration --------------------------------------------------------------------------------
    def calibrate(self, batches: Iterable[Any], loss_fn: Callable | None = None, steps: int | None = None,
                  show_progress: bool = False, gram_dtype: torch.dtype = torch.float64) -> "SparseGradModel":
        """Learn the bases (HOSVD of streamed Grams) from a few batches, then convert the layers.

        A collective under torch.distributed (Grams summed across ranks: every rank ends with identical bases).
        """
        if self.calibrated:
            raise RuntimeError("SparseGradModel is already calibrated")
        steps = steps or self.peft_config.calibration_steps
        batches = list(b for _, b in zip(range(steps), batches))
        modules = self.converted_layers()
        calibrator = Calibrator(self.base_model, modules, self.basis_keys, self.peft_config, batches, loss_fn,
                                show_progress)
        with gradients_flowing(self.base_model, modules):
            self.bases = calibrator.fit_bases(gram_dtype)
        for name, module in modules.items():
            _replace_module(self.base_model, name, self._reference_layer(name, module, self.bases[self.basis_key(name)]))
        self._mark_trainable()
        self.calibrated = True
        return self

    def _reference_layer(self, name, module, bases: Bases) -> nn.Module:
        """The paper's layer; in dynamic mode its W~ becomes a buffer handled by SparseStateAdam."""
        k = self.peft_config.entries_for(module.out_features, module.in_features, name)
        identity = self.peft_config.basis == "identity"
        layer = ReferenceSparseGradLinear(module, None if identity else bases.P, None if identity else bases.R, k,
                                          rotated_bias_grad=self.peft_config.reference_rotated_bias_grad)
        return make_dynamic(layer) if self.peft_config.support_mode == "dynamic" else layer

    def _mark_trainable(self) -> None:
        for p in self.base_model.parameters():
            p.requires_grad_(False)
        for module in self.converted_layers().values():
            for p in module.parameters():
                p.requires_grad_(True)
        if not self.peft_config.reference_freeze_layernorm:
            for module in self.base_model.modules():
                if "Norm" in type(module).__name__:
                    for p in module.parameters(recurse=False):
                        p.requires_grad_(True)

    # --- training helpers ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.base_model.parameters() if p.requires_grad]

    def make_optimizer(self, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999)) -> torch.optim.Optimizer:
        """LazyAdam (SparseAdam semantics for W~, biases and norms alike, as in the authors' code)."""
        if not self.calibrated:
            raise RuntimeError("SparseGradModel: calibrate before creating the optimizer")
        return LazyAdam(self.trainable_parameters(), lr=lr, betas=betas)

    def make_sparse_optimizer(self, lr: float, betas=(0.9, 0.999)) -> SparseStateAdam:
        """Dynamic mode: the optimizer of the W~ buffers (step it once per optimizer step, after the engine's)."""
        if self.peft_config.support_mode != "dynamic":
            raise RuntimeError("make_sparse_optimizer is for support_mode='dynamic'")
        return SparseStateAdam(self.base_model, lr=lr, betas=betas, mode=self.peft_config.exchange,
                               oversample=self.peft_config.exchange_oversample)

    def grads_are_finite(self, policy: str = "raise") -> bool:
        """Check trainable grads before ``optimizer.step``.

        ``raise``: FloatingPointError naming the first layer with a NaN/inf gradient. ``skip``: zero all
        grads, count the step in ``skipped_steps`` and return False (the caller skips the update).
        """
        named = [(name, p.grad) for name, p in self.base_model.named_parameters()
                 if p.requires_grad and p.grad is not None]
        if not named:
            return True
        # one flag per gradient, computed on the device, and a single host read (not one sync per parameter)
        finite = torch.stack([torch.isfinite(grad).all() for _, grad in named]).tolist()
        if all(finite):
            return True
        if policy == "raise":
            raise FloatingPointError(f"non-finite gradient in {named[finite.index(False)][0]}")
        self.skipped_steps += 1
        for q in self.trainable_parameters():
            q.grad = None
        return False

    def print_trainable_parameters(self) -> None:
        trainable, total = self.parameter_counts()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def parameter_counts(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.base_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.base_model.parameters())
        return trainable, total

    def support_checksum(self) -> str:
        """SHA-256 of the float64 bases (exact bytes): equal on every rank after calibration."""
        return support_checksum(self.converted_layers(), self.bases)

    # --- persistence --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """``adapter_config.json`` + ``adapter_model.safetensors`` (W~ and biases per layer, trained norms,
        bases once per key, in the layers' precision). Atomic."""
        if not self.calibrated:
            raise RuntimeError("SparseGradModel: nothing to save before calibrate()")
        tensors: dict[str, torch.Tensor] = {}
        layers: dict[str, dict] = {}
        basis_dtype: dict[str, torch.dtype] = {}
        for name, module in self.converted_layers().items():
            key = self.basis_key(name)
            basis_dtype.setdefault(key, module.rotated_weight.dtype)
            layers[name] = {"shape": [module.out_features, module.in_features], "basis_key": key}
            tensors[f"{name}.rotated_weight"] = module.rotated_weight.detach()
            if module.bias is not None:
                tensors[f"{name}.bias"] = module.bias.detach()
        converted = {f"{name}." for name in self.target_names}
        for name, p in self.base_model.named_parameters():  # the norms trained beside W~
            if p.requires_grad and not any(name.startswith(prefix) for prefix in converted):
                tensors[f"extra.{name}"] = p.detach()
        if self.peft_config.basis == "hosvd":
            for key, b in self.bases.items():
                tensors[f"bases.{key}.P"] = b.P.to(basis_dtype[key])
                tensors[f"bases.{key}.R"] = b.R.to(basis_dtype[key])
        meta = {"format": FORMAT, "config": self.peft_config.to_dict(), "layers": layers,
                "base_quantization": self.base_quantization}  # what export must load the base as
        with atomic_directory(directory) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS))
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> "SparseGradModel":
        """A reference / dynamic mode adapter onto ``model`` (fixed-support adapters: ``PeftModel.from_pretrained``
        or ``sg_distributed.sparsegrad.convert.load_adapter``, which also reads the older format)."""
        meta, config, tensors = read_adapter(directory)
        if config.support_mode == "fixed":
            raise ValueError(f"{directory}: a fixed-support adapter in the older format; load it with "
                             f"sg_distributed.sparsegrad.convert.load_adapter(model, directory) ({FIXED_IS_PEFT})")
        wrapper = cls.__new__(cls)
        nn.Module.__init__(wrapper)
        wrapper.base_model, wrapper.peft_config, wrapper.skipped_steps = model, config, 0
        wrapper.target_names = list(meta["layers"])
        wrapper.basis_keys = {name: info["basis_key"] for name, info in meta["layers"].items()}
        for p in model.parameters():
            p.requires_grad_(False)
        wrapper.bases = {}
        wrapper.base_quantization = quantization_of(model.get_submodule(name) for name in wrapper.target_names
                                                    if _has_submodule(model, name))
        loaded: dict[tuple, Bases] = {}
        for name, info in meta["layers"].items():
            try:
                module = model.get_submodule(name)
            except AttributeError:
                raise ValueError(f"adapter layer {name!r} does not exist in the base model") from None
            shape = [module.out_features, module.in_features]
            if shape != info["shape"]:
                raise ValueError(f"adapter layer {name!r} was trained on a {info['shape'][0]}x{info['shape'][1]} "
                                 f"weight, but the base model's is {shape[0]}x{shape[1]}")
            key = info["basis_key"]
            device = module.weight.device
            if (key, device) not in loaded:
                loaded[key, device] = (Bases(tensors[f"bases.{key}.P"].to(device), tensors[f"bases.{key}.R"].to(device))
                                       if config.basis == "hosvd" else identity_bases(*shape, dtype=torch.float64, device=device))
            bases = loaded[key, device]
            wrapper.bases.setdefault(key, bases)
            new = wrapper._reference_layer(name, module, bases)
            with torch.no_grad():  # a parameter in reference mode, a buffer in dynamic mode
                new.rotated_weight.copy_(tensors[f"{name}.rotated_weight"])
                if new.bias is not None:
                    new.bias.copy_(tensors[f"{name}.bias"])
            _replace_module(model, name, new.to(module.weight.device) if module.weight.dtype.is_floating_point else new)
        wrapper._mark_trainable()
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key, value in tensors.items():
                if key.startswith("extra."):
                    params[key.removeprefix("extra.")].copy_(value)
        wrapper.calibrated = True
        return wrapper

    def merge_and_unload(self) -> nn.Module:
        """Fold every update into a plain nn.Linear (W0 + P W~ R^T) and return the bare model."""
        if not self.calibrated:
            raise RuntimeError("SparseGradModel: nothing to merge before calibrate()")
        dtype = self._model_dtype()
        for name, module in self.converted_layers().items():
            _replace_module(self.base_model, name, module.merged_linear().to(dtype))  # merged in full precision
        return self.base_model

    def _model_dtype(self) -> torch.dtype:
        """The dtype the rest of the model computes in (its input embeddings', else its first float weight
        outside the converted layers): merged layers are cast to it."""
        embeddings = self.base_model.get_input_embeddings() if hasattr(self.base_model, "get_input_embeddings") else None
        if embeddings is not None:
            return embeddings.weight.dtype
        converted = tuple(f"{name}." for name in self.target_names)
        return next((p.dtype for n, p in self.base_model.named_parameters()
                     if p.dtype.is_floating_point and not n.startswith(converted)), torch.float32)


def get_sparsegrad_model(model: nn.Module, config: SparseGradConfig | None = None) -> nn.Module:
    """``model`` ready for SparseGrad calibration (call ``.calibrate(batches)`` next), in every support mode:
    fixed support (the default) is ``peft.get_peft_model(model, config)`` (a ``PeftModel``); the reference and
    dynamic modes get the research wrapper ``SparseGradModel``."""
    config = config or SparseGradConfig()
    if config.support_mode == "fixed":
        from peft import get_peft_model

        return get_peft_model(model, config)
    return SparseGradModel(model, config)
