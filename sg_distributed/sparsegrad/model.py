"""SparseGrad as a peft tuner: ``peft.get_peft_model(model, SparseGradConfig(...))``.

Injection puts a ``SparseGradLinear.placeholder`` (the frozen linear plus a zero k-vector) on every target;
``calibrate(batches)`` (reachable as ``peft_model.calibrate``) learns the bases and supports from a few
forward/backward passes and installs them. Saving writes the k-vectors, the supports and their blocks per
layer and the bases once per layer type (like VeRA's shared projections); loading
(``PeftModel.from_pretrained``) injects placeholders of the same k and installs what was saved.
``merge_and_unload``, ``unload``, ``disable_adapter()``, ``modules_to_save`` and
``print_trainable_parameters`` are peft's own.

Only the fixed-support mode is a peft method: the paper-exact ``reference`` and ``dynamic`` modes train a
dense rotated m x n matrix per layer (not an adapter of k values) and stay on the research wrapper
``SparseGradModel`` (``sg_distributed/sparsegrad/wrapper.py``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch
from peft.tuners.tuners_utils import BaseTuner
from torch import nn

from sg_distributed.sparsegrad.basis import Bases
from sg_distributed.sparsegrad.gradient_tap import gradients_flowing
from ..quant import quantization_of
from sg_distributed.sparsegrad.reselect import SupportReselector
from sg_distributed.sparsegrad.selection import Support
from sg_distributed.sparsegrad.targets import find_target_linears
from .calibration import Calibrator, assign_basis_keys, support_checksum
from .config import LLAMA_TARGETS, SparseGradConfig
from .layer import SharedBasis, SparseGradLinear, compute_dtype_of
from .registration import register

# state-dict keys beside each layer's k-vector (the k-vector and the support are the layer's own tensors)
BLOCK_ROWS, BLOCK_COLS = "sparsegrad_block_rows", "sparsegrad_block_cols"
SUPPORT = "support_flat"
BASES = "sparsegrad_bases"  # tuner-level: {BASES}.{basis key}.P / .R


class SparseGradTuner(BaseTuner):
    """peft's model class for SparseGrad (as ``LoraModel`` is LoRA's)."""

    prefix = "sparsegrad_"
    tuner_layer_cls = SparseGradLinear
    target_module_mapping = {"llama": LLAMA_TARGETS}  # other models: ``find_target_linears``' defaults

    def __init__(self, model, peft_config, adapter_name: str = "default", low_cpu_mem_usage: bool = False,
                 state_dict=None) -> None:
        self._targets: dict[str, nn.Module] = {}
        self.shared_bases: dict[str, SharedBasis] = {}
        self.basis_keys: dict[str, str] = {}
        super().__init__(model, peft_config, adapter_name, low_cpu_mem_usage=low_cpu_mem_usage, state_dict=state_dict)

    # --- injection ----------------------------------------------------------------------------------
    def _prepare_adapter_config(self, peft_config: SparseGradConfig, model_config: dict) -> SparseGradConfig:
        return peft_config  # target_modules None: chosen by find_target_linears in _pre_injection_hook

    def _pre_injection_hook(self, model: nn.Module, config: SparseGradConfig, adapter_name: str) -> None:
        if self._targets:
            raise ValueError(f"SparseGrad keeps one adapter per model; adapter {adapter_name!r} would be a second")
        if config.support_mode != "fixed":
            raise ValueError(f"SparseGradConfig.support_mode={config.support_mode!r} trains a dense rotated matrix per "
                             f"layer, not a peft adapter: use sg_distributed.get_sparsegrad_model for it")
        self._targets = find_target_linears(model, config.target_modules, config.blocks, config.block_stride)
        for name, module in self._targets.items():
            config.entries_for(module.out_features, module.in_features, name)  # a bad k fails before injection
        self.basis_keys = assign_basis_keys(self._targets, config.basis_sharing)
        config.base_quantization = quantization_of(self._targets.values())  # export loads the base this way

    def _check_target_module_exists(self, config: SparseGradConfig, key: str) -> bool:
        return key in self._targets

    def _create_and_replace(self, config: SparseGradConfig, adapter_name: str, target: nn.Module, target_name: str,
                            parent: nn.Module, current_key: str, **kwargs: Any) -> None:
        if isinstance(target, SparseGradLinear):
            raise ValueError(f"{current_key!r} already carries a SparseGrad adapter")
        k = config.entries_for(target.out_features, target.in_features, current_key)
        layer = SparseGradLinear.placeholder(target, k, adapter_name=adapter_name)
        self._replace_module(parent, target_name, layer, target)

    def _replace_module(self, parent, child_name, new_module, child) -> None:
        setattr(parent, child_name, new_module)
        if not isinstance(new_module, SparseGradLinear):  # unloading: the base layer goes back
            return
        weight = next((p for p in child.parameters()), None)
        if weight is not None and weight.device.type != "meta":
            new_module.to(weight.device)  # the k-vector follows the base (and keeps its precision)

    # --- calibration --------------------------------------------------------------------------------
    def sparsegrad_layers(self) -> dict[str, SparseGradLinear]:
        return {name: m for name, m in self.model.named_modules() if isinstance(m, SparseGradLinear)}

    @property
    def calibrated(self) -> bool:
        layers = self.sparsegrad_layers().values()
        return bool(layers) and all(layer.calibrated for layer in layers)

    def calibrate(self, batches: Iterable[Any], loss_fn: Callable | None = None, steps: int | None = None,
                  show_progress: bool = False, gram_dtype: torch.dtype = torch.float64) -> None:
        """Learn bases and supports from ``steps`` batches (default ``calibration_steps``) and install them, in
        place (``peft_model.calibrate(batches)`` reaches this through the PeftModel).

        Batches are dicts of model inputs with labels (``model(**batch).loss``), or anything ``loss_fn(model,
        batch)`` turns into a scalar loss. A collective under torch.distributed: every rank calls it with its
        own micro-batches and ends with identical bases and supports (see ``sparsegrad/calibration.py``).
        """
        config: SparseGradConfig = self.peft_config[self.active_adapters[0]]
        if self.calibrated:
            raise RuntimeError("SparseGrad adapter is already calibrated")
        steps = steps or config.calibration_steps
        batches = list(b for _, b in zip(range(steps), batches))  # the passes need the same batches
        layers = self.sparsegrad_layers()
        frozen = {name: layer.base_layer for name, layer in layers.items()}
        keys = {name: self.basis_keys[name] for name in layers}
        calibrator = Calibrator(self.model, frozen, keys, config, batches, loss_fn, show_progress)
        # Trainable parameters (modules_to_save, and the k-vectors) are frozen while calibrating: its backward
        # passes must leave no gradient behind for the first optimizer step.
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        for p in trainable:
            p.requires_grad_(False)
        for layer in layers.values():
            layer.passthrough = True
        try:
            with gradients_flowing(self.model, frozen):
                bases = calibrator.fit_bases(gram_dtype)
                supports = calibrator.select_supports(bases, gram_dtype)
        finally:
            for layer in layers.values():
                layer.passthrough = False
            for p in trainable:
                p.requires_grad_(True)
        for name, layer in layers.items():
            basis = self._shared_basis(keys[name], bases[keys[name]], layer.base_layer, consume=True)
            layer.install(supports[name], basis=basis, block=supports[name].block)

    def support_checksum(self) -> str:
        """SHA-256 of every layer's support and every type's bases (exact bytes): equal on all ranks."""
        return support_checksum(self.sparsegrad_layers(), self.shared_bases)

    # --- training helpers (methods.prepare, launch/train_qa.py, SparseGradCallback) --------------------------
    def converted_layers(self) -> dict[str, SparseGradLinear]:
        """The SparseGrad layers by their name in the wrapped model (as the research wrapper names them)."""
        return self.sparsegrad_layers()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """What the optimizer takes: the k-vectors and any ``modules_to_save``."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def make_reselector(self, optimizer: torch.optim.Optimizer | None = None) -> SupportReselector:
        """Drop-and-grow re-selection every ``reselect_every`` steps: call its ``step()`` after each optimizer
        step. ``optimizer``: the one whose moments the swapped slots reset (under DeepSpeed, the client
        optimizer given to ``deepspeed.initialize``)."""
        config: SparseGradConfig = self.peft_config[self.active_adapters[0]]
        if not self.calibrated:
            raise RuntimeError("SparseGrad adapter: calibrate before creating the re-selector")
        if not config.reselect_every:
            raise RuntimeError("make_reselector: set SparseGradConfig.reselect_every > 0")
        return SupportReselector(self.sparsegrad_layers(), config.reselect_every, config.reselect_fraction,
                                 square=config.score == "square", optimizer=optimizer)

    def _shared_basis(self, key: str, bases: Bases, base_layer: nn.Module, consume: bool = False) -> SharedBasis:
        """The key's SharedBasis, made from ``bases`` at its first use; ``consume``: the caller gives ``bases`` up
        (calibration's fresh ones), so the master may take their memory."""
        if key not in self.shared_bases:
            self.shared_bases[key] = SharedBasis(bases.P, bases.R, compute_dtype_of(base_layer), consume=consume)
        return self.shared_bases[key]

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)

    # --- saving and loading -------------------------------------------------------------------------
    @classmethod
    def _get_adapter_state_dict(cls, model, config, adapter_name, state_dict, unwanted_adapter_names):
        to_return = super()._get_adapter_state_dict(model, config, adapter_name, state_dict, unwanted_adapter_names)
        tuner = _tuner_of(model)
        if not tuner.calibrated:
            raise RuntimeError("SparseGrad adapter: nothing to save before calibrate()")
        prefix = _tuner_prefix(model)
        for name, layer in tuner.sparsegrad_layers().items():
            key = f"{prefix}model.{name}"
            small = layer.in_features * layer.out_features < 2**31  # int32 indices halve the file
            to_return[f"{key}.{SUPPORT}"] = layer.support_flat.to(torch.int32 if small else torch.int64)
            to_return[f"{key}.{BLOCK_ROWS}"] = layer.rows_used.to(torch.int32)
            to_return[f"{key}.{BLOCK_COLS}"] = layer.cols_used.to(torch.int32)
        for basis_key, shared in tuner.shared_bases.items():  # once per layer type, full precision
            to_return[f"{prefix}{BASES}.{basis_key}.P"] = shared.P.contiguous()
            to_return[f"{prefix}{BASES}.{basis_key}.R"] = shared.R.contiguous()
        # FSDP2-sharded k-vectors (DTensors) become whole tensors: a collective, so every rank calls
        # save_pretrained (is_main_process=rank == 0), as for the FSDP2 engine's own state dicts
        return {k: v.full_tensor() if hasattr(v, "full_tensor") else v for k, v in to_return.items()}

    @classmethod
    def _remap_adapter_state_dict_for_load(cls, model, config, adapter_name, state_dict):
        """Install the saved bases and supports into the placeholders; the k-vectors load as parameters."""
        state_dict = dict(state_dict)
        tuner, prefix = _tuner_of(model), _tuner_prefix(model)
        bases: dict[str, Bases] = {}
        for basis_key in set(tuner.basis_keys.values()):
            P, R = (state_dict.pop(f"{prefix}{BASES}.{basis_key}.{side}", None) for side in "PR")
            if P is None or R is None:
                saved = sorted({k.removeprefix(f"{prefix}{BASES}.")[:-2] for k in state_dict if k.startswith(prefix + BASES)})
                raise ValueError(f"SparseGrad adapter: no saved bases for layer type {basis_key!r} (saved: {saved}): "
                                 f"was it trained on another architecture or target set?")
            bases[basis_key] = Bases(P, R)
        for name, layer in tuner.sparsegrad_layers().items():
            key = f"{prefix}model.{name}"
            flat = state_dict.pop(f"{key}.{SUPPORT}", None)
            if flat is None:
                raise ValueError(f"SparseGrad adapter: no saved support for layer {name!r}")
            m, n = layer.out_features, layer.in_features
            basis = bases[tuner.basis_keys[name]]
            if tuple(basis.P.shape) != (m, m) or tuple(basis.R.shape) != (n, n):
                raise ValueError(f"SparseGrad adapter: layer {name!r} is {m}x{n} in this model, but the adapter was "
                                 f"trained on a {basis.P.shape[0]}x{basis.R.shape[0]} weight")
            support = Support.from_flat(flat, (m, n), sort=False)  # slot order pairs entries with values
            block = (state_dict.pop(f"{key}.{BLOCK_ROWS}"), state_dict.pop(f"{key}.{BLOCK_COLS}"))
            layer.install(support, basis=tuner._shared_basis(tuner.basis_keys[name], basis, layer.base_layer),
                          block=block)
        return super()._remap_adapter_state_dict_for_load(model, config, adapter_name, state_dict)


def _tuner_of(model: nn.Module) -> SparseGradTuner:
    if isinstance(model, SparseGradTuner):
        return model
    tuner = getattr(model, "base_model", None)
    if isinstance(tuner, SparseGradTuner):
        return tuner
    raise TypeError(f"expected a PeftModel with a SparseGrad adapter, got {type(model).__name__}")


def _tuner_prefix(model: nn.Module) -> str:
    """State-dict prefix of the tuner's own entries: ``base_model.`` in a PeftModel, none in the bare tuner."""
    return "" if isinstance(model, SparseGradTuner) else "base_model."


register(SparseGradConfig, SparseGradTuner)
