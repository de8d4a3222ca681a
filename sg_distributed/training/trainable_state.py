"""The trainable state in a world-size-independent form: ``trainable_state.pt`` of every checkpoint.

SparseGrad trains a few k-vectors (plus ``modules_to_save``, or the norms in reference / dynamic mode), so
their values and Adam moments are small enough to gather whole on rank 0 at every checkpoint. The file
lets ``--resume`` continue on a different number of ranks under every engine, DeepSpeed included, whose
own checkpoint holds per-rank ZeRO partitions. Contents (``torch.load(..., weights_only=False)``)::

    format           "sg_distributed.trainable_state/1"
    backend          the writer's backend (deepspeed_zero2, fsdp2, ddp, single, ...), world_size
    params           {name: fp32 tensor}: every trainable parameter by its name in the engine's module
                     (DeepSpeed: the fp32 master, not the bf16/fp16 module copy)
    optimizer        {name: {"step": int, "exp_avg": fp32, "exp_avg_sq": fp32, ...}}: every state tensor
                     the optimizer keeps per element (AdamW / LazyAdam moments) and its step count (Adam's
                     bias correction); empty before the first optimizer step
    hyperparameters  the optimizer's param groups without their parameters (lr, betas, eps, ...; a record)
    deepspeed        DeepSpeed only: global_steps, global_samples, skipped_steps, LR scheduler state,
                     the fp16 loss scaler

Gathering (``gather``) and restoring (``restore``) are collectives: every rank calls them. DeepSpeed ZeRO-1/2/3
through ``deepspeed.utils.safe_get_full_fp32_param`` / ``safe_get_full_optimizer_state`` and their ``set``
counterparts; FSDP2 through ``DTensor.full_tensor`` / ``distribute_tensor``; one process and DDP from the
parameters and ``optimizer.state`` directly.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

FILENAME = "trainable_state.pt"
FORMAT = "sg_distributed.trainable_state/1"

# Where DeepSpeed's optimizers keep their flat fp32 partitions (one per param group / ZeRO-3 sub-group), each
# a parameter of the wrapped torch optimizer with its own state (``step``, moments): ZeRO-1/2, ZeRO-3, BF16_Optimizer
_DS_FLAT_ATTRS = ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat", "fp32_groups_flat_partition")


class TrainableStateError(RuntimeError):
    """The file does not fit this model / engine."""


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _trainable(module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in module.named_parameters() if p.requires_grad]


def _cpu(t: torch.Tensor, shape=None) -> torch.Tensor:
    t = t.detach().float().cpu().clone()
    return t.reshape(shape) if shape is not None else t


def _step_int(value) -> int:
    return int(value.item()) if torch.is_tensor(value) else int(value)


def _step_like(optimizer: torch.optim.Optimizer, param: torch.Tensor, step: int):
    """``step`` in the form ``optimizer`` keeps it: torch's Adam family a float32 tensor (on the parameter's
    device when capturable / fused, as torch creates it), others (LazyAdam) a Python int."""
    defaults = optimizer.defaults
    if "capturable" not in defaults:
        return int(step)
    from torch.optim.optimizer import _get_scalar_dtype

    if defaults.get("capturable") or defaults.get("fused"):
        return torch.tensor(float(step), dtype=_get_scalar_dtype(), device=param.device)
    return torch.tensor(float(step), dtype=_get_scalar_dtype())


def _hyperparameters(optimizer) -> list[dict]:
    return [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]


# ----------------------------------------------------------------------------------------------- gather


def gather(engine) -> dict | None:
    """Every rank: the trainable state, whole; rank 0 gets the dict, the other ranks None."""
    if engine.deepspeed:
        return _gather_deepspeed(engine)
    return _gather_torch(engine)


def _header(engine, backend: str) -> dict:
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    return {"format": FORMAT, "backend": backend, "world_size": world, "params": {}, "optimizer": {}}


def _gather_torch(engine) -> dict | None:
    """One process, DDP (replicated) and FSDP2 (DTensor parameters and moments made whole)."""
    from sg_distributed.training.checkpoint import backend_name

    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        DTensor = ()

    def whole(t):
        return t.full_tensor() if isinstance(t, DTensor) else t  # a collective for DTensors: every rank

    out = _header(engine, backend_name(engine))
    optimizer = engine.optimizer
    for name, p in _trainable(engine.module):
        value = whole(p.detach())
        state = optimizer.state.get(p, {})
        entry = {}
        for key in sorted(state):
            v = state[key]
            if key == "step":
                entry["step"] = _step_int(v)
            elif torch.is_tensor(v) and v.shape == p.shape:
                entry[key] = whole(v)
        if _rank() == 0:
            out["params"][name] = _cpu(value)
            if entry:
                out["optimizer"][name] = {k: (_cpu(v) if torch.is_tensor(v) else v) for k, v in entry.items()}
    out["hyperparameters"] = _hyperparameters(optimizer)
    return out if _rank() == 0 else None


def _ds_flats(zero_optimizer) -> list[torch.Tensor] | None:
    for attr in _DS_FLAT_ATTRS:
        flats = getattr(zero_optimizer, attr, None)
        if flats is not None:
            return list(flats)
    return None


def _ds_parts(engine):
    """(DeepSpeed's ZeRO optimizer, the torch optimizer inside it, its flat fp32 partitions)."""
    zero_optimizer = engine.wrapped.optimizer
    flats = _ds_flats(zero_optimizer)
    if flats is None or not hasattr(zero_optimizer, "optimizer"):
        raise TrainableStateError(f"DeepSpeed optimizer {type(zero_optimizer).__name__} is not a ZeRO-1/2/3 or "
                                  "bf16 optimizer; the world-size-independent state supports those only")
    if getattr(zero_optimizer, "swap_optimizer", False) or any(f is None for f in flats):
        raise TrainableStateError("DeepSpeed ZeRO-3 with the optimizer state swapped to NVMe is not supported")
    return zero_optimizer, zero_optimizer.optimizer, flats


def _ds_stepped(zero_optimizer, base, flats) -> bool:
    """The optimizer has stepped (its state exists and ZeRO-1/2 linked it to the parameters); the same on
    every rank, so every rank takes the same collectives."""
    return bool(base.state.get(flats[0])) and getattr(zero_optimizer, "_hp_optimizer_states_linked", True)


def _gather_deepspeed(engine) -> dict | None:
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    from sg_distributed.training.checkpoint import backend_name

    ds = engine.wrapped
    zero_optimizer, base, flats = _ds_parts(engine)
    out = _header(engine, backend_name(engine))
    keys, step = [], 0
    if _ds_stepped(zero_optimizer, base, flats):
        first = base.state[flats[0]]
        keys = sorted(k for k, v in first.items() if torch.is_tensor(v) and v.shape == flats[0].shape)
        steps = {_step_int(base.state[f]["step"]) for f in flats if "step" in base.state.get(f, {})}
        if len(steps) > 1:
            raise TrainableStateError(f"DeepSpeed's partitions have different step counts {sorted(steps)}")
        step = steps.pop() if steps else 0
    for name, p in _trainable(ds.module):
        shape = tuple(getattr(p, "ds_shape", p.shape))
        value = safe_get_full_fp32_param(p)  # a collective (ZeRO-1/2: all-reduce; ZeRO-3: all-gather)
        if value is None:
            raise TrainableStateError(f"{name} is trainable but not in DeepSpeed's optimizer")
        moments = {key: safe_get_full_optimizer_state(p, key) for key in keys}
        if _rank() == 0:
            out["params"][name] = _cpu(value, shape)
            if keys:
                out["optimizer"][name] = {"step": step, **{k: _cpu(v, shape) for k, v in moments.items()}}
    out["hyperparameters"] = _hyperparameters(base)
    out["deepspeed"] = {
        "global_steps": ds.global_steps, "global_samples": ds.global_samples, "skipped_steps": ds.skipped_steps,
        "lr_scheduler": ds.lr_scheduler.state_dict() if getattr(ds, "lr_scheduler", None) is not None else None,
        "loss_scaler": getattr(zero_optimizer, "loss_scaler", None) if ds.fp16_enabled() else None}
    return out if _rank() == 0 else None


def write(directory: Path, engine) -> None:
    """Every rank (a collective): gather the state; rank 0 writes ``directory/trainable_state.pt``."""
    state = gather(engine)
    if _rank() == 0:
        torch.save(state, Path(directory) / FILENAME)


# ---------------------------------------------------------------------------------------------- restore


def load(path: Path) -> dict:
    state = torch.load(Path(path) / FILENAME, map_location="cpu", weights_only=False)
    if state.get("format") != FORMAT:
        raise TrainableStateError(f"{path / FILENAME}: unknown format {state.get('format')!r}, expected {FORMAT!r}")
    return state


def _check_names(state: dict, module, where) -> None:
    saved, current = set(state["params"]), {n for n, _ in _trainable(module)}
    if saved != current:
        only_saved, only_now = sorted(saved - current)[:3], sorted(current - saved)[:3]
        raise TrainableStateError(f"{where} does not match the model's trainable parameters (only in the file: "
                                  f"{only_saved}; only in the model: {only_now})")


def restore(path: Path, engine) -> dict:
    """Every rank (under FSDP2 / DeepSpeed every rank must call it): set the trainable parameters and the
    optimizer state of a freshly built ``engine`` from ``path/trainable_state.pt``; returns the state."""
    state = load(path)
    _check_names(state, engine.module, Path(path) / FILENAME)
    if engine.deepspeed:
        _restore_deepspeed(engine, state)
    else:
        _restore_torch(engine, state)
    return state


@torch.no_grad()
def _restore_torch(engine, state: dict) -> None:
    try:
        from torch.distributed.tensor import DTensor, distribute_tensor
    except ImportError:  # pragma: no cover
        DTensor = ()

    def like(value: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        value = value.to(dtype=target.dtype)
        if isinstance(target, DTensor):  # every rank holds the whole value: take this rank's shard, no traffic
            return distribute_tensor(value.to(target.device), target.device_mesh, target.placements,
                                     src_data_rank=None)
        return value.to(target.device)

    optimizer = engine.optimizer
    if any(optimizer.state.values()):
        raise TrainableStateError("restore: the optimizer has already stepped (call it on a fresh engine)")
    for name, p in _trainable(engine.module):
        p.copy_(like(state["params"][name], p))
        entry = state["optimizer"].get(name)
        if entry:
            optimizer.state[p] = {key: (_step_like(optimizer, p, value) if key == "step" else like(value, p))
                                  for key, value in entry.items()}


def _ds_set_module_copy(p: torch.nn.Parameter, value: torch.Tensor) -> None:
    """The module's (low-precision) copy of a parameter, which DeepSpeed refreshes from the fp32 master only
    after an optimizer step. ZeRO-1/2: the parameter is whole on every rank (a view into DeepSpeed's flat
    buffer). ZeRO-3: this rank's partition ``ds_tensor`` (rank i holds [i*s, (i+1)*s), the last one padded),
    and the whole tensor too when the parameter is persistent."""
    if not hasattr(p, "ds_id"):
        p.data.copy_(value.view_as(p.data))
        return
    flat = value.reshape(-1)
    size = p.ds_tensor.numel()
    group = getattr(p, "ds_process_group", None)
    start = (dist.get_rank(group=group) if dist.is_initialized() else 0) * size
    part = flat[start:start + size]
    p.ds_tensor.data.view(-1)[:part.numel()].copy_(part)
    if p.data.numel() == p.ds_numel:  # persistent: whole on every rank
        p.data.copy_(value.view_as(p.data))


@torch.no_grad()
def _restore_deepspeed(engine, state: dict) -> None:
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    ds = engine.wrapped
    zero_optimizer, base, flats = _ds_parts(engine)
    entries = [state["optimizer"][n] for n, _ in _trainable(ds.module) if n in state["optimizer"]]
    if entries:
        if len(entries) != len(state["params"]):
            raise TrainableStateError("DeepSpeed steps all parameters together: the file has optimizer state for "
                                      f"{len(entries)} of {len(state['params'])} parameters")
        steps = {int(e["step"]) for e in entries}
        keys = {tuple(sorted(k for k in e if k != "step")) for e in entries}
        if len(steps) != 1 or len(keys) != 1:
            raise TrainableStateError(f"the file's parameters have different step counts {sorted(steps)} or "
                                      f"optimizer state keys {sorted(keys)}; DeepSpeed keeps one per partition")
        step, keys = steps.pop(), list(keys.pop())
        if any(base.state.get(f) for f in flats):
            raise TrainableStateError("restore: DeepSpeed's optimizer has already stepped (call it on a fresh engine)")
        # the state torch's optimizer would create at its first step, with the saved step count: each flat
        # fp32 partition (one per param group, ZeRO-3: per sub-group) gets zero moments, then the saved
        # moments are scattered into them per parameter below
        for flat in flats:
            base.state[flat] = {"step": _step_like(base, flat, step),
                                **{key: torch.zeros_like(flat, memory_format=torch.preserve_format) for key in keys}}
        if hasattr(zero_optimizer, "_lazy_init_hp_params_optimizer_state"):  # ZeRO-1/2, bf16: link fragments
            zero_optimizer._hp_optimizer_states_linked = False
            zero_optimizer._lazy_init_hp_params_optimizer_state()
    else:
        keys = []
    for name, p in _trainable(ds.module):
        value = state["params"][name]
        device = p.ds_tensor.device if hasattr(p, "ds_tensor") else p.device
        safe_set_full_fp32_param(p, value.to(device))
        for key in keys:
            safe_set_full_optimizer_state(p, state["optimizer"][name][key].to(device), key)
        _ds_set_module_copy(p, value.to(device))
    extra = state.get("deepspeed") or {}
    for attr in ("global_steps", "global_samples", "skipped_steps"):
        if attr in extra:
            setattr(ds, attr, extra[attr])
    if extra.get("lr_scheduler") is not None and getattr(ds, "lr_scheduler", None) is not None:
        ds.lr_scheduler.load_state_dict(extra["lr_scheduler"])
    if extra.get("loss_scaler") is not None and ds.fp16_enabled():
        zero_optimizer.loss_scaler = extra["loss_scaler"]
