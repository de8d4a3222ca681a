"""DeepSpeed (0.19.8) integration: config loading, validation, "auto" resolution and engine set-up.

DeepSpeed JSON configs written for the HF Trainer or accelerate contain ``"auto"`` placeholders that
only those front-ends fill. :func:`resolve_auto` fills them with the same rules as transformers'
``HfTrainerDeepSpeedConfig`` so that a plain ``deepspeed`` / ``torchrun`` script can use the very same
files. ``deepspeed`` itself is imported lazily: loading and resolving a config does not need it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings
from typing import Any, Iterator, Mapping
from unittest import mock

__all__ = [
    "DeepSpeedConfigError",
    "load_ds_config",
    "validate_ds_config",
    "resolve_auto",
    "largest_sparse_k",
    "with_persistent_k_vectors",
    "skip_shm_comm_build",
    "init_distributed",
    "initialize_engine",
]

AUTO = "auto"
VALID_ZERO_STAGES = (0, 1, 2, 3)
PRECISIONS = ("fp32", "bf16", "fp16")

# Keys whose "auto" value derives from the model's hidden size (HF / accelerate rules).
_HIDDEN_SIZE_KEYS = (
    "reduce_bucket_size",  # hidden^2
    "stage3_prefetch_bucket_size",  # int(0.9 * hidden^2)
    "stage3_param_persistence_threshold",  # max(10 * hidden, largest k-vector): see resolve_auto
)

_SPARSE_EXCHANGE_HINT = (
    "use a client torch.optim.AdamW (or an 'optimizer' block of type AdamW with \"torch_adam\": true) "
    "and sg_distributed's sparse exchange of the fixed-support SparseGrad k-vectors instead"
)

# Top-level keys removed in DeepSpeed 0.19.8, with what to do instead.
_REMOVED_TOP_LEVEL_KEYS = {
    "sparse_gradients": (
        "'sparse_gradients' was removed in DeepSpeed 0.19.8 (it now raises an error). sg_distributed's "
        "fixed-support SparseGrad k-vectors are dense tensors and need no sparse gradients: remove the key."
    ),
    "compression_training": (
        "'compression_training' was removed in DeepSpeed 0.19.8 (the compression library is gone): remove "
        "the block; to cut communication, " + _SPARSE_EXCHANGE_HINT + "."
    ),
    "compressed_allreduce": (
        "compressed all-reduce was removed in DeepSpeed 0.19.8: remove the key; " + _SPARSE_EXCHANGE_HINT + "."
    ),
}

# Optimizer types removed in DeepSpeed 0.19.8 (lower-cased), with their display names.
_REMOVED_OPTIMIZERS = {"onebitadam": "OneBitAdam", "zerooneadam": "ZeroOneAdam", "onebitlamb": "OneBitLamb"}


class DeepSpeedConfigError(ValueError):
    """A DeepSpeed config that cannot be used as given."""


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def load_ds_config(path: str | os.PathLike) -> dict:
    """Read a DeepSpeed JSON config file and return it as a dict (errors name the file)."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise DeepSpeedConfigError(f"DeepSpeed config file not found: {path!r}") from None
    except OSError as exc:
        raise DeepSpeedConfigError(f"cannot read DeepSpeed config file {path!r}: {exc}") from exc
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DeepSpeedConfigError(
            f"invalid JSON in DeepSpeed config file {path!r} at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(cfg, dict):
        raise DeepSpeedConfigError(
            f"DeepSpeed config file {path!r} must contain a JSON object at top level, got {type(cfg).__name__}"
        )
    return cfg


def _deepspeed_removed_keys() -> tuple[Mapping[str, str], Mapping[str, str]]:
    """DeepSpeed's own tables of removed config keys (private; empty if the layout differs)."""
    try:
        from deepspeed.runtime import config as ds_config
    except Exception:  # deepspeed missing or broken: our own table still applies
        return {}, {}
    top = getattr(ds_config, "_REMOVED_TOP_LEVEL_CONFIG_KEYS", {})
    zero = getattr(ds_config, "_REMOVED_ZERO_CONFIG_KEYS", {})
    return (top if isinstance(top, Mapping) else {}), (zero if isinstance(zero, Mapping) else {})


def validate_ds_config(cfg: Mapping[str, Any]) -> None:
    """Reject configs DeepSpeed 0.19.8 cannot run; warn about ones that trigger a slow JIT build.

    Raises :class:`DeepSpeedConfigError` for removed keys / optimizers and unknown ZeRO stages.
    Emits a ``UserWarning`` for an Adam/AdamW ``optimizer`` block without ``"torch_adam": true``.
    """
    if not isinstance(cfg, Mapping):
        raise DeepSpeedConfigError(f"a DeepSpeed config must be a JSON object (dict), got {type(cfg).__name__}")

    for key, message in _REMOVED_TOP_LEVEL_KEYS.items():
        if key in cfg:
            raise DeepSpeedConfigError(message)
    ds_top, ds_zero = _deepspeed_removed_keys()
    for key, message in ds_top.items():
        if key in cfg:
            raise DeepSpeedConfigError(f"config key {key!r} is not supported by DeepSpeed 0.19.8: {message}")

    zero = cfg.get("zero_optimization")
    if zero is not None:
        if not isinstance(zero, Mapping):
            raise DeepSpeedConfigError("'zero_optimization' must be a JSON object")
        for key, message in ds_zero.items():
            if key in zero:
                raise DeepSpeedConfigError(
                    f"config key 'zero_optimization.{key}' is not supported by DeepSpeed 0.19.8: {message}"
                )
        stage = zero.get("stage", 0)
        if isinstance(stage, bool) or stage not in VALID_ZERO_STAGES:
            raise DeepSpeedConfigError(
                f"unknown zero_optimization.stage {stage!r}: valid stages are {', '.join(map(str, VALID_ZERO_STAGES))}"
            )

    optimizer = cfg.get("optimizer")
    if optimizer is not None:
        if not isinstance(optimizer, Mapping):
            raise DeepSpeedConfigError("'optimizer' must be a JSON object with a 'type'")
        opt_type = str(optimizer.get("type", ""))
        if opt_type.lower() in _REMOVED_OPTIMIZERS:
            raise DeepSpeedConfigError(
                f"optimizer type {_REMOVED_OPTIMIZERS[opt_type.lower()]!r} was removed in DeepSpeed 0.19.8: "
                f"{_SPARSE_EXCHANGE_HINT}."
            )
        params = optimizer.get("params") or {}
        if opt_type.lower() in ("adam", "adamw") and not (isinstance(params, Mapping) and params.get("torch_adam")):
            offload = isinstance(zero, Mapping) and _offload_device(zero.get("offload_optimizer")) in ("cpu", "nvme")
            op = "DeepSpeedCPUAdam (cpu_adam)" if offload else "FusedAdam"
            warnings.warn(
                f"the DeepSpeed config's optimizer block of type {opt_type!r} makes DeepSpeed JIT-build {op} "
                "(60-90 s on CPU). Add \"torch_adam\": true to optimizer.params, or drop the block and pass a "
                "client torch.optim.AdamW (with \"zero_allow_untested_optimizer\": true).",
                UserWarning,
                stacklevel=2,
            )


def _offload_device(block: Any) -> str | None:
    return block.get("device") if isinstance(block, Mapping) else None


# --------------------------------------------------------------------------------------------------
# "auto" resolution (transformers' HfTrainerDeepSpeedConfig rules)
# --------------------------------------------------------------------------------------------------


def _iter_auto_paths(node: Any, prefix: str = "") -> Iterator[str]:
    if isinstance(node, Mapping):
        for key, value in node.items():
            yield from _iter_auto_paths(value, f"{prefix}.{key}" if prefix else str(key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _iter_auto_paths(value, f"{prefix}[{i}]")
    elif node == AUTO:
        yield prefix or "<root>"


def _fill(node: dict, key: str, value: Any, *, path: str, mismatches: list[str] | None, what: str) -> None:
    """Replace an "auto" node[key] with value; record a mismatch if an explicit value differs."""
    current = node.get(key)
    if current == AUTO:
        node[key] = value
    elif mismatches is not None and current is not None and current != value:
        mismatches.append(f"{path}={current!r} but {what}={value!r}")


def resolve_auto(
    cfg: Mapping[str, Any],
    *,
    world_size: int,
    micro_batch_size: int,
    gradient_accumulation_steps: int,
    max_grad_norm: float | None,
    hidden_size: int | None,
    precision: str = "fp32",
    model: Any = None,
) -> dict:
    """Return a copy of ``cfg`` with every ``"auto"`` filled, as the HF Trainer / accelerate do.

    * ``train_micro_batch_size_per_gpu`` = micro_batch_size, ``gradient_accumulation_steps`` = accumulation,
      ``train_batch_size`` = micro × accumulation × world_size (explicit values must agree);
    * ``gradient_clipping`` = max_grad_norm (``None`` → 0.0, i.e. no clipping);
    * ``zero_optimization.reduce_bucket_size`` = hidden², ``stage3_prefetch_bucket_size`` = int(0.9·hidden²),
      ``stage3_param_persistence_threshold`` = 10·hidden (filled whatever the stage, as accelerate does),
      raised to the largest SparseGrad k-vector of ``model`` when one is given (see below);
    * ``bf16.enabled`` / ``fp16.enabled`` follow ``precision`` (explicit contradicting values are errors);
      in bf16/fp16, gradients are reduced (``communication_data_type``) and accumulated
      (``data_types.grad_accum_dtype``) in fp32 unless the config says otherwise: the trained values are
      few, so full-precision gradients cost nothing, and a bf16 sum of micro-batches would round.

    Any "auto" left afterwards (e.g. in an ``optimizer`` or ``scheduler`` block) is an error naming its path.

    Persistence threshold and k-vectors. ZeRO-3 keeps a parameter whole on every rank ("persistent": no
    all-gather before its module's forward or backward, no release after) when its numel is ``<=``
    ``stage3_param_persistence_threshold`` (DeepSpeed 0.19.8 ``runtime/zero/partition_parameters.py`` and
    ``parameter_offload.py``, ``mark_persistent_parameters``: inclusive). Its gradient is still reduce-scattered
    with the others and its optimizer state partitioned; the updated partitions are all-gathered back once per
    step, all persistent parameters in one call (``stage3.py`` ``_post_step``). accelerate's 10·hidden is below
    the k of the paper presets (LLaMA-2-7B: k = 100,000 > 40,960), which would cost two all-gathers of every
    k-vector per micro-batch (forward and backward) for a few hundred kB each. With ``model`` given (the
    converted model, before ``deepspeed.initialize``), an ``"auto"`` threshold becomes
    ``max(10·hidden, largest k)`` where k is the numel of a trainable ``sparsegrad_values`` of a
    :class:`~sg_distributed.sparsegrad.layer.SparseGradLinear`. Any other parameter of at most that numel (a frozen
    small weight, a bias) becomes persistent too: replicated, at most largest-k values each. An explicit
    number in the config is kept as it is.
    """
    if not isinstance(cfg, Mapping):
        raise DeepSpeedConfigError(f"a DeepSpeed config must be a JSON object (dict), got {type(cfg).__name__}")
    if precision not in PRECISIONS:
        raise DeepSpeedConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    for name, value in (
        ("world_size", world_size),
        ("micro_batch_size", micro_batch_size),
        ("gradient_accumulation_steps", gradient_accumulation_steps),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DeepSpeedConfigError(f"{name} must be a positive int, got {value!r}")

    out = copy.deepcopy(dict(cfg))
    mismatches: list[str] = []

    # Batch sizes. DeepSpeed requires train_batch_size == micro * accum * world_size.
    expected_tbs = micro_batch_size * gradient_accumulation_steps * world_size
    _fill(out, "train_micro_batch_size_per_gpu", micro_batch_size, path="train_micro_batch_size_per_gpu",
          mismatches=mismatches, what="micro_batch_size")
    _fill(out, "gradient_accumulation_steps", gradient_accumulation_steps, path="gradient_accumulation_steps",
          mismatches=mismatches, what="gradient_accumulation_steps")
    tbs = out.get("train_batch_size")
    if tbs == AUTO:
        out["train_batch_size"] = expected_tbs
    elif tbs is not None and tbs != expected_tbs:
        raise DeepSpeedConfigError(
            f"train_batch_size={tbs!r} in the DeepSpeed config does not equal micro_batch_size "
            f"({micro_batch_size}) x gradient_accumulation_steps ({gradient_accumulation_steps}) x "
            f"world_size ({world_size}) = {expected_tbs}; set it to \"auto\" or to {expected_tbs}"
        )

    clip = 0.0 if max_grad_norm is None else float(max_grad_norm)
    _fill(out, "gradient_clipping", clip, path="gradient_clipping",
          mismatches=None if max_grad_norm is None else mismatches, what="max_grad_norm")

    # Hidden-size based ZeRO buckets.
    zero = out.get("zero_optimization")
    if isinstance(zero, dict):
        auto_keys = [k for k in _HIDDEN_SIZE_KEYS if zero.get(k) == AUTO]
        if auto_keys:
            if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
                raise DeepSpeedConfigError(
                    f"hidden_size (got {hidden_size!r}) is needed to fill the \"auto\" values of "
                    f"{['zero_optimization.' + k for k in auto_keys]}; pass the model's hidden size or put "
                    "integers in the config"
                )
            values = {
                "reduce_bucket_size": hidden_size * hidden_size,
                "stage3_prefetch_bucket_size": int(0.9 * hidden_size * hidden_size),
                # DeepSpeed persists numel <= threshold (inclusive), so the largest k itself is enough
                "stage3_param_persistence_threshold": max(10 * hidden_size, largest_sparse_k(model)),
            }
            for key in auto_keys:
                zero[key] = values[key]

    _resolve_precision(out, precision)

    if mismatches:
        raise DeepSpeedConfigError(
            "DeepSpeed config values contradict the training arguments:\n  - " + "\n  - ".join(mismatches)
            + "\nSet them to \"auto\" or make them agree."
        )
    leftover = list(_iter_auto_paths(out))
    if leftover:
        raise DeepSpeedConfigError(
            f"\"auto\" left unresolved at {', '.join(leftover)}: sg_distributed fills only batch sizes, "
            "gradient_clipping, bf16/fp16.enabled and the hidden-size ZeRO buckets; put explicit values there"
        )
    return out


def largest_sparse_k(model: Any) -> int:
    """The numel of the largest trainable SparseGrad k-vector in ``model`` (0 for ``None`` or none)."""
    if model is None:
        return 0
    from ..sparsegrad.layer import SparseGradLinear

    return max((m.k for m in model.modules()
                if isinstance(m, SparseGradLinear) and m.sparsegrad_values.requires_grad), default=0)


def with_persistent_k_vectors(cfg: Mapping[str, Any] | str | os.PathLike, model: Any,
                              config: Any = None) -> dict:
    """A DeepSpeed config for the HF Trainer / TRL whose ZeRO-3 ``"auto"`` persistence threshold keeps every
    SparseGrad k-vector whole (see :func:`resolve_auto`); every other ``"auto"`` is left for the Trainer.

    The Trainer fills ``stage3_param_persistence_threshold`` with 10·hidden, below the k of the paper presets,
    so each k-vector would be all-gathered twice per micro-batch. ``model``: a converted model (its largest
    trainable k-vector), or the base model with ``config``, the SparseGradConfig it will get (TRL's
    ``SFTTrainer(peft_config=...)`` converts it only later). Give the result to ``TrainingArguments(deepspeed=...)``.
    An explicit threshold is kept."""
    out = load_ds_config(cfg) if isinstance(cfg, (str, os.PathLike)) else copy.deepcopy(dict(cfg))
    zero = out.get("zero_optimization")
    if not isinstance(zero, dict) or zero.get("stage3_param_persistence_threshold") != AUTO:
        return out
    if config is None:
        largest = largest_sparse_k(model)
    else:
        from sg_distributed.sparsegrad.targets import find_target_linears

        targets = find_target_linears(model, config.target_modules, config.blocks, config.block_stride)
        largest = max((config.entries_for(m.out_features, m.in_features, n) for n, m in targets.items()), default=0)
    hidden = getattr(getattr(model, "config", None), "hidden_size", None)
    if not isinstance(hidden, int):
        raise DeepSpeedConfigError("with_persistent_k_vectors: the model has no config.hidden_size to fill the "
                                   "\"auto\" stage3_param_persistence_threshold with; put a number in the config")
    zero["stage3_param_persistence_threshold"] = max(10 * hidden, largest)
    return out


def _resolve_precision(out: dict, precision: str) -> None:
    # DeepSpeed also accepts the legacy "bfloat16" spelling of the "bf16" block.
    wanted = {"bf16": precision == "bf16", "bfloat16": precision == "bf16", "fp16": precision == "fp16"}
    for key, enable in wanted.items():
        block = out.get(key)
        if block is None:
            continue
        if not isinstance(block, dict):
            raise DeepSpeedConfigError(f"'{key}' must be a JSON object")
        current = block.get("enabled")
        if current == AUTO or (current is None and enable):
            block["enabled"] = enable
        elif current is not None and bool(current) != enable:
            raise DeepSpeedConfigError(
                f"{key}.enabled={current!r} in the DeepSpeed config contradicts precision={precision!r}; "
                "set it to \"auto\""
            )
    if precision in ("bf16", "fp16") and not (
        out.get(precision) or (precision == "bf16" and out.get("bfloat16"))
    ):
        out[precision] = {"enabled": True}
    if precision in ("bf16", "fp16"):
        if out.get("communication_data_type") in (None, AUTO):
            out["communication_data_type"] = "fp32"
        data_types = out.setdefault("data_types", {})
        if not isinstance(data_types, dict):
            raise DeepSpeedConfigError("'data_types' must be a JSON object")
        if data_types.get("grad_accum_dtype") in (None, AUTO):
            data_types["grad_accum_dtype"] = "fp32"


# --------------------------------------------------------------------------------------------------
# Runtime helpers
# --------------------------------------------------------------------------------------------------

_SHM_COMM_OP = "deepspeed_shm_comm"


def skip_shm_comm_build() -> None:
    """Stop DeepSpeed from JIT-building its shared-memory comm op at ``init_distributed``.

    On CPU the ``deepspeed_shm_comm`` build costs ~39 s on a fresh machine; gloo works without it.
    Idempotent; does nothing if DeepSpeed's compatible-ops table does not have the expected layout.
    """
    try:
        import deepspeed.ops as ds_ops

        compatible = getattr(ds_ops, "__compatible_ops__", None)
    except Exception:
        return
    if isinstance(compatible, dict) and _SHM_COMM_OP in compatible:
        compatible[_SHM_COMM_OP] = False


def init_distributed(backend: str | None = None, **kwargs: Any) -> None:
    """``deepspeed.init_distributed`` without the shm-comm JIT build; gloo on CPU, nccl on CUDA.

    ``DS_ACCELERATOR=cpu`` forces gloo even on a GPU node (the deepspeed launcher re-exports
    CUDA_VISIBLE_DEVICES, so CUDA may look available to a CPU test run).
    """
    import deepspeed
    import torch

    skip_shm_comm_build()
    if backend is None:
        cpu = os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()
        backend = "gloo" if cpu else "nccl"
    deepspeed.init_distributed(dist_backend=backend, **kwargs)


def initialize_engine(model, optimizer, cfg: Mapping[str, Any]):
    """Wrap ``model`` and a client ``optimizer`` in a DeepSpeed engine built from a resolved ``cfg``."""
    import deepspeed

    leftover = list(_iter_auto_paths(cfg))
    if leftover:
        raise DeepSpeedConfigError(f"resolve the \"auto\" values first (see resolve_auto): {', '.join(leftover)}")
    from deepspeed.runtime.engine import DeepSpeedEngine

    from sg_distributed.distributed.process_group import replicas_agree

    # DeepSpeed broadcasts every replicated parameter from rank 0 when the engine is built, frozen ones included
    # (540 MB for SmolLM2 in fp32), though every rank loaded the same weights: skip it where a checksum agrees
    # (ZeRO-3's partitioned parameters are never broadcast; see docs/cluster.md, "Start-up traffic").
    skip = replicas_agree(model)
    with mock.patch.object(DeepSpeedEngine, "_broadcast_model", lambda self: None) if skip else contextlib.nullcontext():
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=dict(cfg),
                                               model_parameters=None)
    return engine


@contextlib.contextmanager
def fp32_master_params(params):
    """Inside the block each parameter's ``.data`` is its whole fp32 master from the DeepSpeed optimizer.

    In bf16/fp16 mode the module's parameters are low-precision copies (ZeRO-3: empty placeholders); an
    adapter saved from them would round the trained values to bf16. ``safe_get_full_fp32_param`` is a
    collective under ZeRO-3: every rank enters. Read-only: changes inside the block are dropped.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    params = list(params)
    originals = [p.data for p in params]
    try:
        for p in params:
            full = safe_get_full_fp32_param(p)
            if full is None:
                raise RuntimeError("fp32_master_params: a parameter has no DeepSpeed fp32 master (not in the "
                                   "engine's optimizer)")
            p.data = full.view(getattr(p, "ds_shape", p.shape))
        yield
    finally:
        for p, data in zip(params, originals):
            p.data = data
