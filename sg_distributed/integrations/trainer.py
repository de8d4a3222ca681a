"""Hugging Face Trainer (transformers 5.23) integration: ``SparseGradTrainer`` and ``SparseGradCallback``.

peft route (``get_peft_model(model, SparseGradConfig(...))``, TRL's ``SFTTrainer(peft_config=...)``): no
subclass is needed. The k-vectors exist from injection, so the optimizer the Trainer builds holds them, and
``SparseGradCallback`` calibrates at ``on_train_begin`` on the Trainer's own train dataloader. What follows
is about the standalone ``SparseGradModel``, whose k-vectors are created by calibration.

Why a Trainer subclass and not only a callback: SparseGrad must calibrate *before* the optimizer
exists (only the k-vectors created by calibration are trainable, and ``Trainer.create_optimizer`` /
``deepspeed_init`` collect ``requires_grad`` parameters inside ``_inner_training_loop``), and the first
callback event of a run, ``on_train_begin``, fires after the optimizer, the DDP wrapper and the DeepSpeed
engine are built. Callbacks also receive no train dataloader before that point. So:

* :class:`SparseGradTrainer` calibrates in :meth:`train` (or an explicit :meth:`calibrate`) on the first
  N batches of the Trainer's own train dataloader (every rank its shard; Grams and scores are summed
  across ranks, so all ranks pick the same bases/supports, checked by checksum), then hands over to
  ``Trainer.train``: the optimizer (or DeepSpeed's client optimizer) sees the k-vectors only.
  ``save_model`` writes the adapter (``adapter_config.json`` + ``adapter_model.safetensors``, the
  :meth:`SparseGradModel.save_pretrained` format) instead of the whole model, into ``output_dir`` and
  into every ``checkpoint-N`` dir (``Trainer._save_checkpoint`` calls it; under ZeRO-3 the k-vectors are
  gathered collectively first). It also fixes what the Trainer cannot see through the wrapper: the
  label names (``SparseGradModel.forward(*args, **kwargs)`` has no ``labels`` argument, so eval would
  return no loss), the columns kept by ``remove_unused_columns`` (read from the base model's forward),
  DDP buffer broadcasts (bases/supports are identical on all ranks: ``ddp_broadcast_buffers=False``)
  and the "purely quantized model" guard for int8/nf4 bases.
* :class:`SparseGradCallback` (added by ``SparseGradTrainer``; usable alone with a plain ``Trainer`` and a
  model calibrated beforehand) checks at ``on_train_begin`` that the model is calibrated and that the
  optimizer holds only trainable SparseGrad parameters, runs support re-selection after each optimizer
  step when ``reselect_every`` is set, and at ``on_save`` makes sure the adapter is in the checkpoint
  directory. With a plain ``Trainer`` the full-model save still happens as well (and fails
  for tied embeddings, since safetensors refuses shared tensors): prefer ``SparseGradTrainer``.

Calibration runs on the device the model will train on (:func:`calibration_device`): under DeepSpeed, FSDP
or full fp16/bf16 eval the Trainer leaves the model where it was loaded (often the CPU) until the engine is
built, after calibration; ``SparseGradTrainer.calibrate`` moves it to ``args.device`` first, as the engine
would, so the calibration Grams and scores are all-reduced on the device NCCL takes.

Pitfall: with a ZeRO-3 DeepSpeed config, create the model *before* ``TrainingArguments`` (which turns on
``zero.Init`` for later ``from_pretrained`` calls): calibration needs whole weights.
"""
from __future__ import annotations

import contextlib
import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from transformers import Trainer, TrainerCallback

from ..calibration import model_device
from ..model import ADAPTER_CONFIG, ADAPTER_WEIGHTS, SparseGradModel
from ..quant import is_quantized

__all__ = ["SparseGradTrainer", "SparseGradCallback", "save_adapter", "find_sparsegrad_model", "find_sparsegrad_tuner",
           "calibrate_from_dataloader", "configure_cpu_deepspeed_state", "calibration_device"]


def configure_cpu_deepspeed_state() -> dict:
    """HF Trainer + DeepSpeed on CPU: pre-build accelerate's process state with gloo.

    ``TrainingArguments`` starts DeepSpeed's process group without a backend on a CUDA-less machine, so
    accelerate sees no backend and reports ONE process (DeepSpeed then rejects train_batch_size). This
    sets ``ACCELERATE_USE_DEEPSPEED=true`` (as ``accelerate launch`` does), skips DeepSpeed's shm-comm JIT
    build, builds ``PartialState(backend="gloo")`` and returns the ``accelerator_config`` to give
    ``TrainingArguments`` (``use_configured_state``) so that it keeps that state. Call it before
    ``TrainingArguments``, on every rank; a no-op returning {} when CUDA is available.
    """
    import torch
    from accelerate import PartialState

    if torch.cuda.is_available():
        return {}
    from .deepspeed import skip_shm_comm_build

    skip_shm_comm_build()
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"
    PartialState(backend="gloo")
    return {"use_configured_state": True}


def find_sparsegrad_model(model: nn.Module) -> SparseGradModel | None:
    """The SparseGradModel inside DDP / DeepSpeed / accelerate wrappers (or None)."""
    seen = 0
    while model is not None and seen < 8:
        if isinstance(model, SparseGradModel):
            return model
        model = getattr(model, "module", None)
        seen += 1
    return None


def find_sparsegrad_tuner(model: nn.Module | None):
    """The peft SparseGradTuner inside a PeftModel (itself possibly inside DDP / DeepSpeed wrappers), or None."""
    from ..sparsegrad.model import SparseGradTuner

    if model is None:
        return None
    return next((m for m in model.modules() if isinstance(m, SparseGradTuner)), None)


def calibrate_from_dataloader(tuner, dataloader, steps: int | None = None, loss_fn: Callable | None = None) -> None:
    """Calibrate a peft SparseGrad adapter on the first ``steps`` batches of a Trainer's train dataloader (every
    rank its own shard: Grams and scores are summed across ranks), then check that all ranks agree."""
    from ..runtime import assert_same_on_all_ranks

    if dataloader is None:
        raise RuntimeError("SparseGrad calibration needs the Trainer's train dataloader (none was passed)")
    config = tuner.peft_config[tuner.active_adapters[0]]
    steps = steps or config.calibration_steps
    batches = [batch for _, batch in zip(range(steps), dataloader)]
    was_training = tuner.model.training
    tuner.model.train()
    try:
        tuner.calibrate(batches, loss_fn=loss_fn, steps=len(batches))
    finally:
        tuner.model.train(was_training)
    assert_same_on_all_ranks(tuner.support_checksum(), "SparseGrad bases/supports")


def _is_zero3_partitioned(params) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


def _fsdp_offloads_params(plugin) -> bool:
    """accelerate's FSDP plugin keeps parameters on the CPU (FSDP1 CPUOffload(offload_params=True), FSDP2
    CPUOffloadPolicy; the base OffloadPolicy means no offload)."""
    offload = getattr(plugin, "cpu_offload", None)
    if isinstance(offload, bool):
        return offload
    return bool(getattr(offload, "offload_params", False)) or type(offload).__name__ == "CPUOffloadPolicy"


def calibration_device(trainer: Trainer) -> torch.device:
    """The device ``SparseGradTrainer`` calibrates on: the one the model will train on.

    The Trainer moves the model to ``args.device`` in ``__init__`` only when ``place_model_on_device``; under
    DeepSpeed (the engine's ``module.to(device)``), FSDP and full fp16/bf16 eval (``accelerator.prepare``)
    the move comes after the optimizer is built, i.e. after calibration, so calibrating where the model
    was loaded would run on the CPU and all-reduce CPU Grams through NCCL. Models that own their placement
    stay where they are: bitsandbytes-quantised ones (placed at load; the Trainer never moves them either),
    ones dispatched with a ``hf_device_map``, ZeRO-3-partitioned ones, ones sharded at load time by
    transformers, and FSDP with parameter CPU offload.
    """
    model = trainer.model
    base = getattr(model, "base_model", model)
    current = model_device(base)
    owns_placement = (
        getattr(base, "quantization_method", None) == "bitsandbytes"
        or any(is_quantized(m) for m in base.modules())
        or getattr(base, "hf_device_map", None) is not None
        or _is_zero3_partitioned(base.parameters())
        or getattr(trainer, "is_distributed_loading_by_transformers", False)
    )
    if owns_placement:
        return current
    if getattr(trainer, "is_fsdp_enabled", False):
        plugin = getattr(trainer.accelerator.state, "fsdp_plugin", None)
        return current if _fsdp_offloads_params(plugin) else torch.device(trainer.args.device)
    if trainer.place_model_on_device or getattr(trainer, "is_deepspeed_enabled", False):
        return torch.device(trainer.args.device)
    args = trainer.args
    if getattr(args, "fp16_full_eval", False) or getattr(args, "bf16_full_eval", False):
        return torch.device(args.device)  # accelerator.prepare places it
    return current  # e.g. SageMaker model parallel: its own placement


@contextlib.contextmanager
def _gathered(params):
    """Whole tensors of ZeRO-3-partitioned params inside the block (a collective: every rank enters)."""
    params = list(params)
    if _is_zero3_partitioned(params):
        import deepspeed

        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            yield
    else:
        yield


def save_adapter(model: nn.Module, directory: str | os.PathLike, is_main: bool = True) -> None:
    """Write the SparseGrad adapter files into ``directory`` (other files there are kept).

    ``save_pretrained`` replaces its target directory atomically, so the files are written to a
    temporary sibling and moved in one by one. Call on every rank (ZeRO-3 gathers the k-vectors).
    """
    wrapper = find_sparsegrad_model(model)
    if wrapper is None:
        raise TypeError(f"save_adapter needs a SparseGradModel, got {type(model).__name__}")
    with _gathered(wrapper.trainable_parameters()):
        if not is_main:
            return
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".sparsegrad-", dir=directory))
        try:
            wrapper.save_pretrained(tmp / "adapter")
            for name in (ADAPTER_WEIGHTS, ADAPTER_CONFIG):  # config last: its presence marks a complete adapter
                os.replace(tmp / "adapter" / name, directory / name)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)


def _optimized_parameters(optimizer) -> list:
    """The model parameters an optimizer updates, through accelerate's and DeepSpeed's wrappers (ZeRO keeps the
    originals in ``bit16_groups`` (stage 1/2) or ``fp16_groups`` (stage 3); its param_groups hold flat partitions)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    for attr in ("bit16_groups", "fp16_groups"):
        groups = getattr(opt, attr, None)
        if groups:
            return [p for group in groups for p in group]
    return [p for group in getattr(opt, "param_groups", []) for p in group["params"]]


def _client_optimizer(optimizer):
    """The torch optimizer under accelerate's and DeepSpeed's wrappers (each keeps it in ``.optimizer``)."""
    while optimizer is not None and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


class SparseGradCallback(TrainerCallback):
    """Calibrates a peft SparseGrad adapter at the start of training; guards a Trainer run of a SparseGradModel
    and puts its adapter into every checkpoint dir.

    peft route (``get_peft_model`` / TRL's ``SFTTrainer(peft_config=SparseGradConfig(...))``): the k-vectors
    exist from injection, so the optimizer built before ``on_train_begin`` already holds them; this callback
    then calibrates on the first ``calibration_steps`` batches of the Trainer's own train dataloader, on the
    device the model trains on. ``calibration_steps`` / ``calibration_loss_fn`` default to the config's and to
    ``model(**batch).loss``.
    """

    def __init__(self, calibration_steps: int | None = None, calibration_loss_fn: Callable | None = None):
        self.calibration_steps = calibration_steps
        self.calibration_loss_fn = calibration_loss_fn

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        tuner = find_sparsegrad_tuner(model)
        if tuner is not None:
            if not tuner.calibrated:
                calibrate_from_dataloader(tuner, train_dataloader, self.calibration_steps, self.calibration_loss_fn)
            config = tuner.peft_config[tuner.active_adapters[0]]
            if config.reselect_every:
                from ..reselect import SupportReselector

                self.reselector = SupportReselector(tuner.sparsegrad_layers(), config.reselect_every,
                                                    config.reselect_fraction, square=config.score == "square",
                                                    optimizer=_client_optimizer(optimizer))
                self.reselector.steps = state.global_step
            return
        wrapper = find_sparsegrad_model(model)
        if wrapper is None:
            return
        if not wrapper.calibrated:
            raise RuntimeError("SparseGradModel is not calibrated: use SparseGradTrainer (it calibrates on the train "
                               "dataloader before the optimizer is built) or call model.calibrate(batches) first")
        if optimizer is not None:
            allowed = {id(p) for p in wrapper.trainable_parameters()}
            held = _optimized_parameters(optimizer)
            if not held:
                raise RuntimeError("the optimizer holds no parameters (was the model calibrated before it was built?)")
            if any(id(p) not in allowed for p in held):
                raise RuntimeError("the optimizer holds parameters outside the SparseGrad k-vectors")
        if wrapper.peft_config.reselect_every:  # drop-and-grow on the Trainer's step count
            self.reselector = wrapper.make_reselector(_client_optimizer(optimizer))
            self.reselector.steps = state.global_step  # a resumed run keeps the schedule; its scores restart

    def on_step_end(self, args, state, control, **kwargs):
        if getattr(self, "reselector", None) is not None:
            self.reselector.step()

    def on_save(self, args, state, control, model=None, **kwargs):
        wrapper = find_sparsegrad_model(model)
        if wrapper is None or not wrapper.calibrated:
            return
        checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        # SparseGradTrainer.save_model already wrote it; a plain Trainer did not. Decide identically on every
        # rank (ZeRO-3 gathers are collectives): the flag below, not the file system, drives the choice.
        if not getattr(wrapper, "_sg_saved_by_trainer", False):
            save_adapter(wrapper, checkpoint, is_main=state.is_world_process_zero)


class SparseGradTrainer(Trainer):
    """``transformers.Trainer`` for a :class:`SparseGradModel` (see the module docstring).

    Extra arguments: ``calibration_steps`` (batches of the train dataloader used by calibration;
    default ``model.peft_config.calibration_steps``) and ``calibration_loss_fn(model, batch)``.
    """

    def __init__(self, model: SparseGradModel | None = None, args=None, *, calibration_steps: int | None = None,
                 calibration_loss_fn: Callable | None = None, **kwargs: Any):
        if not isinstance(model, SparseGradModel):
            raise TypeError(f"SparseGradTrainer needs a SparseGradModel (get_sparsegrad_model(model, config)), got "
                            f"{type(model).__name__}")
        base = model.base_model
        if getattr(base, "is_quantized", False):  # adapters are attached: let Trainer's guard through (as for PEFT)
            model._hf_peft_config_loaded = True
        if args is not None and getattr(args, "ddp_broadcast_buffers", None) is None:
            args.ddp_broadcast_buffers = False  # bases and supports are identical on every rank
        self.calibration_steps = calibration_steps
        self.calibration_loss_fn = calibration_loss_fn
        callbacks = list(kwargs.pop("callbacks", None) or [])
        if not any(isinstance(c, SparseGradCallback) or c is SparseGradCallback for c in callbacks):
            callbacks.append(SparseGradCallback())
        super().__init__(model=model, args=args, callbacks=callbacks, **kwargs)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            from ..comm import check_collective_devices_from_env

            check_collective_devices_from_env()  # SG_CHECK_COLLECTIVE_DEVICE=1 (tests): check the whole run
        if self.args.label_names is None:  # find_labels() sees SparseGradModel.forward(*args, **kwargs): no labels
            self.label_names = ["labels"]
        self.can_return_loss = True
        model._sg_saved_by_trainer = True

    # --- wrapper transparency ------------------------------------------------------------------
    def _set_signature_columns_if_needed(self) -> None:
        if self._signature_columns is None:
            base = self.model.base_model
            self._signature_columns = list(inspect.signature(base.forward).parameters)
            self._signature_columns += list({"label", "label_ids", *self.label_names})

    # --- calibration -----------------------------------------------------------------------------
    def calibrate(self) -> SparseGradModel:
        """Calibrate on the first N batches of this rank's train dataloader (idempotent; all ranks must call)."""
        model: SparseGradModel = self.model
        if model.calibrated:
            return model
        if _is_zero3_partitioned(model.base_model.parameters()):
            raise RuntimeError("the base model's weights are ZeRO-3 partitioned (loaded after TrainingArguments with a "
                               "ZeRO-3 DeepSpeed config turned on zero.Init): load the model before creating "
                               "TrainingArguments, so calibration sees whole weights")
        device = calibration_device(self)
        if model_device(model.base_model) != device:
            model.to(device)  # what the engine will do after calibration (see calibration_device)
        steps = self.calibration_steps or model.peft_config.calibration_steps
        batches = []
        for batch in self.get_train_dataloader():
            batches.append(self._prepare_inputs(batch))  # on args.device; calibration moves them to the model's
            if len(batches) == steps:
                break
        was_training = model.training
        model.train()
        model.calibrate(batches, loss_fn=self.calibration_loss_fn, steps=len(batches))
        model.train(was_training)
        from ..runtime import assert_same_on_all_ranks

        assert_same_on_all_ranks(model.support_checksum(), "SparseGrad bases/supports")
        return model

    def train(self, *args: Any, **kwargs: Any):
        self.calibrate()
        return super().train(*args, **kwargs)

    # --- saving ----------------------------------------------------------------------------------
    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """The adapter (not the whole model), the tokenizer and the training arguments; all ranks call it."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        save_adapter(self.model, output_dir, is_main=self.args.should_save)
        if self.args.should_save:
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(self.args, os.path.join(output_dir, "training_args.bin"))
