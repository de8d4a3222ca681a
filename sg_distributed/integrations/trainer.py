"""Hugging Face Trainer (transformers 5.23) and TRL: ``SparseGradCallback``.

SparseGrad is a peft method, so the Trainer needs no subclass: give it ``get_peft_model(model,
SparseGradConfig(...))`` (or give TRL's ``SFTTrainer`` ``peft_config=SparseGradConfig(...)``) and
``callbacks=[SparseGradCallback()]``. The k-vectors exist from injection, so the optimizer the Trainer builds
(or DeepSpeed's client optimizer) holds them and any ``modules_to_save``. At ``on_train_begin`` -- after the
optimizer, the DDP wrapper and the DeepSpeed engine are built, with the model on the device it trains on, so the
calibration Grams are all-reduced where NCCL expects them -- the callback calibrates on the first
``calibration_steps`` batches of the Trainer's own train dataloader (every rank its shard: Grams and scores are
summed across ranks, and a checksum checks that all ranks agree). When ``reselect_every`` is set it re-selects
supports after each optimizer step, on the Trainer's step count. Saving is the Trainer's for any peft model: the
adapter (``adapter_config.json`` + ``adapter_model.safetensors``, k-vectors, supports and bases) into every
``checkpoint-N`` and ``output_dir``, gathered from the ZeRO-3 partitions first.

An adapter that is already calibrated (``PeftModel.from_pretrained(..., is_trainable=True)``, or a model on
which ``calibrate(batches)`` was called) is left as it is.

Resuming (``trainer.train(resume_from_checkpoint=checkpoint)``): call ``restore_checkpoint_adapter(trainer.model,
checkpoint)`` first. Without DeepSpeed the Trainer loads the checkpoint's adapter itself (peft ``load_adapter``);
under DeepSpeed it loads only the engine checkpoint, which restores the k-vectors and their optimizer state but
not the bases (no module state) the k-vectors were trained in, so the callback would calibrate afresh. It refuses
to: a resumed run whose adapter is not calibrated is an error.
"""
from __future__ import annotations

import os
from typing import Callable

from torch import nn
from transformers import TrainerCallback

__all__ = ["SparseGradCallback", "find_sparsegrad_tuner", "calibrate_from_dataloader", "configure_cpu_deepspeed_state",
           "restore_checkpoint_adapter", "tensorboard_in_output_dir"]


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


def tensorboard_in_output_dir(trainer) -> None:
    """Point the Trainer's TensorBoardCallback (``report_to`` tensorboard) at ``<output_dir>/runs/<time>_<host>``
    now, before any ``trainer.evaluate()``.

    The callback names that directory only at ``on_train_begin`` (transformers 5.23): an evaluation before
    ``train()`` opens its writer with no directory, i.e. torch's default ``./runs`` in the working directory,
    and the training events follow it there. A ``TENSORBOARD_LOGGING_DIR`` the user set is kept.
    """
    from transformers.integrations import TensorBoardCallback
    from transformers.integrations.integration_utils import default_logdir

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and callback.logging_dir is None:
            callback.logging_dir = os.path.join(trainer.args.output_dir, default_logdir())


def find_sparsegrad_tuner(model: nn.Module | None):
    """The peft SparseGradTuner inside a PeftModel (itself possibly inside DDP / DeepSpeed wrappers), or None."""
    from ..sparsegrad.model import SparseGradTuner

    if model is None:
        return None
    return next((m for m in model.modules() if isinstance(m, SparseGradTuner)), None)


def calibrate_from_dataloader(tuner, dataloader, steps: int | None = None, loss_fn: Callable | None = None) -> None:
    """Calibrate a peft SparseGrad adapter on the first ``steps`` batches of a Trainer's train dataloader (every
    rank its own shard: Grams and scores are summed across ranks), then check that all ranks agree."""
    from sg_distributed.distributed.process_group import assert_same_on_all_ranks

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


def restore_checkpoint_adapter(model: nn.Module, checkpoint: str | os.PathLike) -> None:
    """Install the SparseGrad adapter of a Trainer ``checkpoint-N`` (bases, supports, k-vectors) into ``model``,
    the PeftModel the Trainer trains, trainable; call it before ``trainer.train(resume_from_checkpoint=...)``.

    The resumed k-vectors must sit on the bases and supports they were trained on. Under DeepSpeed the Trainer
    loads only the engine checkpoint (k-vectors, support buffers and optimizer state, no bases), and a fresh
    calibration reproduces the saved supports only if its data, step count and world size are all the same
    (and never after support re-selection). Without DeepSpeed the Trainer loads the same adapter again: harmless.
    """
    from peft import PeftModel

    if not isinstance(model, PeftModel) or find_sparsegrad_tuner(model) is None:
        raise TypeError(f"restore_checkpoint_adapter: expected a PeftModel with a SparseGrad adapter, got "
                        f"{type(model).__name__}")
    model.load_adapter(str(checkpoint), adapter_name=model.active_adapter, is_trainable=True)


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
    """Calibrates a peft SparseGrad adapter at the start of training and runs support re-selection (see the module
    docstring). ``calibration_steps`` / ``calibration_loss_fn`` default to the config's and to ``model(**batch).loss``.
    """

    def __init__(self, calibration_steps: int | None = None, calibration_loss_fn: Callable | None = None):
        self.calibration_steps = calibration_steps
        self.calibration_loss_fn = calibration_loss_fn
        self.reselector = None

    def on_init_end(self, args, state, control, **kwargs):
        if getattr(args, "ddp_broadcast_buffers", None) is None:
            args.ddp_broadcast_buffers = False  # supports and blocks are identical on every rank: no per-step copy

    def on_train_begin(self, args, state, control, model=None, optimizer=None, train_dataloader=None, **kwargs):
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            from sg_distributed.distributed.comm import check_collective_devices_from_env

            check_collective_devices_from_env()  # SG_CHECK_COLLECTIVE_DEVICE=1 (tests): calibration and training
        tuner = find_sparsegrad_tuner(model)
        if tuner is None:
            raise TypeError(f"SparseGradCallback: the model ({type(model).__name__}) has no SparseGrad adapter; give "
                            f"the Trainer get_peft_model(model, SparseGradConfig(...)), or SFTTrainer a "
                            f"peft_config=SparseGradConfig(...)")
        if optimizer is not None:
            held = {id(p) for p in _optimized_parameters(optimizer)}
            values = [name for name, layer in tuner.sparsegrad_layers().items() if id(layer.sparsegrad_values) not in held]
            if values:
                raise RuntimeError(f"the optimizer does not hold the SparseGrad k-vectors of {values[:3]} (built before "
                                   f"get_peft_model, or from another model?)")
        if not tuner.calibrated:
            if state is not None and state.global_step > 0:  # resumed: under DeepSpeed (see restore_checkpoint_adapter)
                raise RuntimeError(
                    f"SparseGradCallback: resuming at step {state.global_step} with an uncalibrated adapter; the "
                    f"restored k-vectors need the bases and supports they were trained on, which a new calibration "
                    f"need not reproduce: call restore_checkpoint_adapter(trainer.model, checkpoint) before "
                    f"trainer.train(resume_from_checkpoint=checkpoint)")
            calibrate_from_dataloader(tuner, train_dataloader, self.calibration_steps, self.calibration_loss_fn)
        if tuner.peft_config[tuner.active_adapters[0]].reselect_every:  # drop-and-grow on the Trainer's step count
            self.reselector = tuner.make_reselector(_client_optimizer(optimizer))
            self.reselector.steps = state.global_step  # a resumed run keeps the schedule; its scores restart

    def on_step_end(self, args, state, control, **kwargs):
        if self.reselector is not None:
            self.reselector.step()
