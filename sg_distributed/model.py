"""SparseGradModel: the PEFT-style wrapper (calibrate, train, save_pretrained / from_pretrained, merge)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import nn

from .basis import Bases, identity_bases
from .calibration import gradients_flowing
from .dynamic import SparseStateAdam, make_dynamic
from .io import atomic_directory
from .optim import LazyAdam
from .quant import quantization_of
from .reselect import SupportReselector
from .selection import Support
from .sparsegrad.calibration import Calibrator, assign_basis_keys, support_checksum
from .sparsegrad.config import SparseGradConfig
from .sparsegrad.layer import ReferenceSparseGradLinear, SharedBasis, SparseGradLinear, compute_dtype_of
from .targets import find_target_linears

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
FORMAT = "sg_distributed.sparsegrad/1"


def _replace_module(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


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


class SparseGradModel(nn.Module):
    """Wraps a transformers (or any torch) model; only the k-vectors of converted layers train."""

    def __init__(self, model: nn.Module, config: SparseGradConfig):
        super().__init__()
        self.base_model = model
        self.peft_config = config
        targets = find_target_linears(model, config.target_modules, config.blocks, config.block_stride)
        self.target_names = list(targets)
        for name, module in targets.items():
            config.entries_for(module.out_features, module.in_features, name)  # validate k early
        self.basis_keys = assign_basis_keys(targets, config.basis_sharing)
        for p in model.parameters():
            p.requires_grad_(False)
        self.bases: dict[str, Bases] = {}
        self.shared_bases: dict[str, SharedBasis] = {}
        self.calibrated = False
        self.skipped_steps = 0

    # --- plumbing -----------------------------------------------------------------------------------
    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.base_model, name)

    @property
    def bases(self) -> dict[str, Bases]:
        """P, R per basis key: once fixed-support layers exist, the full-precision host masters they share
        (the float64 calibration bases are then dropped); otherwise the calibration bases."""
        if not self.shared_bases:
            return self._calibration_bases
        return {key: Bases(shared.P, shared.R) for key, shared in self.shared_bases.items()}

    @bases.setter
    def bases(self, value: dict[str, Bases]) -> None:
        self._calibration_bases = value

    def _shared_basis(self, key: str, bases: Bases, module: nn.Module) -> SharedBasis:
        """One SharedBasis per type: its layers share the master and, per device, the compute copy."""
        if key not in self.shared_bases:
            self.shared_bases[key] = SharedBasis(bases.P, bases.R, compute_dtype_of(module))
        return self.shared_bases[key]

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
        """Learn bases (HOSVD of streamed Grams) and supports from a few batches, then convert layers.

        Runs on every rank of a process group: Grams and scores are summed across ranks, so every
        rank ends with identical bases and supports, and N ranks that together see the micro-batches
        of a 1-rank run get the same bases and supports. Grams and scores accumulate in ``gram_dtype``
        (float64 by default, so summation order cannot flip a top-k choice; float32 halves them:
        m^2 + n^2 per type, plus per layer m + n sums and the r x c budget block, or m x n without a budget).
        Three passes over ``batches``: Grams, row/column score sums, budget-block scores (see
        ``Calibrator.select_supports``; the last two are one pass without a budget, and a ``leading`` block skips the
        sums).
        """
        if self.calibrated:
            raise RuntimeError("SparseGradModel is already calibrated")
        steps = steps or self.peft_config.calibration_steps
        batches = list(b for _, b in zip(range(steps), batches))  # two passes need the same batches
        modules = self.converted_layers()
        calibrator = Calibrator(self.base_model, modules, self.basis_keys, self.peft_config, batches, loss_fn,
                                show_progress)
        with gradients_flowing(self.base_model, modules):
            self.bases = calibrator.fit_bases(gram_dtype)
            if self.peft_config.support_mode == "fixed":
                supports = calibrator.select_supports(self.bases, gram_dtype)
        calibration_bases = self.bases
        for name, module in modules.items():
            bases = calibration_bases[self.basis_key(name)]
            if self.peft_config.support_mode == "fixed":
                basis = self._shared_basis(self.basis_key(name), bases, module)
                new = SparseGradLinear(module, None, None, supports[name], basis=basis, block=supports[name].block)
            else:
                new = self._reference_layer(name, module, bases)
            _replace_module(self.base_model, name, new)
        if self.shared_bases:
            self.bases = {}  # the layers' shared copies replace the float64 ones (bases() reads those)
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
            if isinstance(module, SparseGradLinear):
                module.sparsegrad_values.requires_grad_(True)
            else:
                for p in module.parameters():
                    p.requires_grad_(True)
        if self.peft_config.support_mode != "fixed" and not self.peft_config.reference_freeze_layernorm:
            for module in self.base_model.modules():
                if "Norm" in type(module).__name__:
                    for p in module.parameters(recurse=False):
                        p.requires_grad_(True)

    # --- training helpers ---------------------------------------------------------------------------
    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.base_model.parameters() if p.requires_grad]

    def make_optimizer(self, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999)) -> torch.optim.Optimizer:
        """AdamW over the k-vectors (fixed support); LazyAdam in reference and dynamic mode (SparseAdam
        semantics for W~, biases and norms alike, as in the authors' code)."""
        if not self.calibrated:
            raise RuntimeError("SparseGradModel: calibrate before creating the optimizer")
        params = self.trainable_parameters()
        if self.peft_config.support_mode != "fixed":
            return LazyAdam(params, lr=lr, betas=betas)
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)

    def make_reselector(self, optimizer: torch.optim.Optimizer | None = None) -> SupportReselector:
        """Drop-and-grow re-selection every ``reselect_every`` steps: call its ``step()`` after each
        optimizer step. ``optimizer``: the one whose moments the swapped slots reset (under DeepSpeed, the
        client optimizer given to ``deepspeed.initialize``)."""
        config = self.peft_config
        if not self.calibrated:
            raise RuntimeError("SparseGradModel: calibrate before creating the re-selector")
        if not config.reselect_every:
            raise RuntimeError("SparseGradModel.make_reselector: set SparseGradConfig.reselect_every > 0")
        return SupportReselector(self.converted_layers(), config.reselect_every, config.reselect_fraction,
                                 square=config.score == "square", optimizer=optimizer)

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
        for name, p in self.base_model.named_parameters():
            if p.requires_grad and p.grad is not None and not torch.isfinite(p.grad).all():
                if policy == "raise":
                    raise FloatingPointError(f"non-finite gradient in {name}")
                self.skipped_steps += 1
                for q in self.trainable_parameters():
                    q.grad = None
                return False
        return True

    def print_trainable_parameters(self) -> None:
        trainable, total = self.parameter_counts()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def parameter_counts(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.base_model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.base_model.parameters())
        return trainable, total

    def support_checksum(self) -> str:
        """SHA-256 of all supports and bases (exact bytes, any dtype): equal on every rank after calibration.
        The bases are those in ``bases``: the fp32 masters in fixed mode, else the float64 ones."""
        return support_checksum(self.converted_layers(), self.bases)

    # --- persistence --------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        """``adapter_config.json`` + ``adapter_model.safetensors``; bases stored once per key. Atomic.

        FSDP2 with sharded k-vectors (DTensors): a collective -- call on every rank; rank 0 writes.
        """
        if not self.calibrated:
            raise RuntimeError("SparseGradModel: nothing to save before calibrate()")
        tensors: dict[str, torch.Tensor] = {}
        layers: dict[str, dict] = {}
        basis_dtype: dict[str, torch.dtype] = {}
        for name, module in self.converted_layers().items():
            key = self.basis_key(name)
            compute = module.basis.Pt if isinstance(module, SparseGradLinear) else module.rotated_weight
            basis_dtype.setdefault(key, compute.dtype)  # full precision (fp32, or float64 in a float64 model)
            layers[name] = {"shape": [module.out_features, module.in_features], "basis_key": key}
            if isinstance(module, SparseGradLinear):
                tensors[f"{name}.sparse_values"] = module.sparsegrad_values.detach()
                small = module.in_features * module.out_features < 2**31  # int32 indices halve the file
                tensors[f"{name}.support"] = module.support_flat.to(torch.int32 if small else torch.int64)
                tensors[f"{name}.block_rows"] = module.rows_used.to(torch.int32)  # the block re-selection grows in
                tensors[f"{name}.block_cols"] = module.cols_used.to(torch.int32)
            else:
                tensors[f"{name}.rotated_weight"] = module.rotated_weight.detach()
                if module.bias is not None:
                    tensors[f"{name}.bias"] = module.bias.detach()
        converted = {f"{name}." for name in self.target_names}
        for name, p in self.base_model.named_parameters():  # norms trained in reference/dynamic mode
            if p.requires_grad and not any(name.startswith(prefix) for prefix in converted):
                tensors[f"extra.{name}"] = p.detach()
        if self.peft_config.basis == "hosvd":
            for key, b in self.bases.items():  # as precise as the layers' masters: lossless onto any base dtype
                tensors[f"bases.{key}.P"] = b.P.to(basis_dtype[key])
                tensors[f"bases.{key}.R"] = b.R.to(basis_dtype[key])
        sharded = [k for k, v in tensors.items() if hasattr(v, "full_tensor")]  # FSDP2 DTensor params
        tensors.update({k: tensors[k].full_tensor() for k in sharded})
        if sharded and dist.get_rank() != 0:
            return
        bases = [getattr(m, "base_layer", getattr(m, "base", m)) for m in self.converted_layers().values()]
        meta = {"format": FORMAT, "config": self.peft_config.to_dict(), "layers": layers,
                "base_quantization": quantization_of(bases)}  # what export must load the base as
        with atomic_directory(directory) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / ADAPTER_WEIGHTS))
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2))

    @classmethod
    def from_pretrained(cls, model: nn.Module, directory: str | Path) -> "SparseGradModel":
        meta, config, tensors = read_adapter(directory)
        wrapper = cls.__new__(cls)
        nn.Module.__init__(wrapper)
        wrapper.base_model, wrapper.peft_config, wrapper.skipped_steps = model, config, 0
        wrapper.target_names = list(meta["layers"])
        wrapper.basis_keys = {name: info["basis_key"] for name, info in meta["layers"].items()}
        for p in model.parameters():
            p.requires_grad_(False)
        wrapper.bases, wrapper.shared_bases = {}, {}
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
            if config.support_mode == "fixed":
                support = Support.from_flat(tensors[f"{name}.support"], tuple(shape), sort=False)  # slot order
                block = (tensors[f"{name}.block_rows"], tensors[f"{name}.block_cols"]) if f"{name}.block_rows" in tensors else None
                new = SparseGradLinear(module, None, None, support, values=tensors[f"{name}.sparse_values"],
                                       block=block, basis=wrapper._shared_basis(key, bases, module))
            else:
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
        """Fold every update into a plain nn.Linear (W0 + P S R^T) and return the bare model."""
        if not self.calibrated:
            raise RuntimeError("SparseGradModel: nothing to merge before calibrate()")
        dtype = self._model_dtype()
        for name, module in self.converted_layers().items():
            merged = module.merged_linear()  # fixed mode: in its base's dtype; reference / dynamic: full precision
            _replace_module(self.base_model, name, merged if isinstance(module, SparseGradLinear) else merged.to(dtype))
        return self.base_model

    def _model_dtype(self) -> torch.dtype:
        """The dtype the rest of the model computes in (its input embeddings', else its first float weight
        outside the converted layers): merged reference-mode layers are cast to it."""
        embeddings = self.base_model.get_input_embeddings() if hasattr(self.base_model, "get_input_embeddings") else None
        if embeddings is not None:
            return embeddings.weight.dtype
        converted = tuple(f"{name}." for name in self.target_names)
        return next((p.dtype for n, p in self.base_model.named_parameters()
                     if p.dtype.is_floating_point and not n.startswith(converted)), torch.float32)


def get_sparsegrad_model(model: nn.Module, config: SparseGradConfig | None = None) -> SparseGradModel:
    """Wrap ``model`` for SparseGrad fine-tuning (call ``.calibrate(batches)`` next)."""
    return SparseGradModel(model, config or SparseGradConfig())
