"""GradDrop: stochastic gradient masking (O'Neill & Dutta, arXiv 2307.10098), plus gradual unfreezing.

The paper's full text is not available here, so the method is built as a family with explicit knobs
(see :class:`GradDropConfig`):

* ``drop_prob`` (p): probability that a gradient unit is dropped (set to zero) in a given step/epoch.
* ``granularity``: the unit that is kept or dropped.

  - ``"element"``: every entry independently.
  - ``"row"``: whole rows along dim 0 (output rows of an ``nn.Linear`` weight). With
    ``include_bias=True`` the bias entry of a row shares the row's fate.
  - ``"layer"``: the whole module (weight, and bias if included) is kept or dropped.
* ``resample``: ``"step"`` draws a new mask every optimizer step (``controller.step()``), so all
  micro-batches of one step share it; ``"epoch"`` draws one per epoch (``controller.set_epoch(e)``).
* ``rescale``: multiply kept gradients by ``1/(1-p)`` so the masked gradient is unbiased.

How it works. A tensor hook (``param.register_hook``) on every target parameter replaces the incoming
gradient by ``grad * mask`` before it is accumulated into ``param.grad``. Tensor hooks run before the
``AccumulateGrad`` node and therefore before the reduction hooks that DDP and DeepSpeed ZeRO-1/2/3
attach to it, so dropped entries are zero in what gets reduced.

Distributed twist. A mask is a pure function of ``(seed, mask_counter, key)`` where ``key`` is the
parameter name (element granularity) or its module's name (row/layer granularity): the generator seed
comes from a keyed BLAKE2b hash, never Python's salted ``hash()``. Every rank of a data-parallel job
therefore draws the same mask with no communication, every micro-batch of one step draws the same mask,
and a gradient exchange only needs to send the kept entries: ``sg_distributed.graddrop.exchange`` packs them
(DDP comm hook, DeepSpeed ZeRO-2 and FSDP2 glue in ``integrations.kept_exchange``; ``kept_fraction()`` is
the traffic ratio). Without it, DDP and ZeRO reduce the dense, zero-filled gradient.

How masks are drawn. Inside the gradient hook, on ``grad.device``, in the mask's compact shape (the
parameter's shape for ``element``, one value per row or per layer otherwise): a
``torch.Generator(device=grad.device)`` is seeded with the BLAKE2b seed and ``torch.rand`` (float32) draws
the uniforms; an entry is dropped where the uniform is ``< p``. On CUDA that generator is Philox-4x32-10,
a counter-based generator, so seeding is a host-side assignment and the draw is one kernel: no
host-device sync, nothing kept between calls (the controller holds no tensor of its own). A hand-rolled
integer hash would be bit-identical between CPU and CUDA too, but costs about ten elementwise int32
passes per entry against one for Philox; the mask only has to agree between ranks, which share the
device type, so Philox wins.

Caveats.

* Masking the gradient does not freeze the entry in the optimizer: momentum (SGD/Adam moments from
  earlier steps) and decoupled weight decay still move dropped entries. That is the "gradient noise"
  reading of GradDrop; use ``weight_decay=0`` and no momentum if a dropped entry must stay put.
* Cost: every backward of every target redraws its mask (micro-batches included): for ``element``
  granularity one uniform per entry, i.e. a transient float32 tensor and a bool tensor the size of that
  parameter (5 B per entry, one target at a time, freed when the hook returns) plus the masked copy of
  the gradient that any out-of-place hook makes. Row/layer masks are one value per row / per layer.
* Identical across ranks only within one device type *and model*: CPU masks come from CPU
  ``torch.rand`` (mt19937: the same on every machine and thread count, and the same masks
  as earlier versions of this module, which drew everything on CPU). CUDA masks come from Philox and are
  *not* bit-identical to the CPU masks (same distribution, different draws). PyTorch's CUDA kernel also
  caps its grid at (SM count x max threads per SM / 256) blocks, and which Philox subsequence feeds which
  entry depends on that grid: for tensors larger than SM count x max threads per SM entries (221,184 on
  an A100, 270,336 on an H100 SXM) the mask differs between GPU models. A data-parallel job must
  therefore run on one GPU model and one PyTorch version (usual anyway); mixing them silently gives
  ranks different masks. ``mask_for(name, device=...)`` and
  ``kept_fraction(device=...)`` reproduce the hook's mask exactly only when given the gradient's device.
  Resuming a CUDA run that used the earlier CPU-drawn masks continues with a different (equally
  distributed) mask sequence.
* Under ZeRO-3 the parameter's logical shape is read from ``param.ds_shape``; the hook checks that the
  gradient it receives has that shape (DeepSpeed hands tensor hooks the full gradient) and raises
  otherwise, naming the parameter. Under FSDP2 the hooks never fire: ``fully_shard`` replaces the
  parameter objects they sit on (measured: the reduced gradients were not masked).
  ``integrations.kept_exchange.install_on_fsdp2`` removes them and masks inside FSDP2's reduce-scatter.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Iterable, Sequence

import torch
from torch import nn

__all__ = [
    "GradDropConfig",
    "GradDropController",
    "GradualUnfreezing",
    "apply_graddrop",
]

GRANULARITIES = ("element", "row", "layer")
RESAMPLE_MODES = ("step", "epoch")


@dataclass
class GradDropConfig:
    """Knobs of the GradDrop family (see the module docstring)."""

    drop_prob: float = 0.5
    granularity: str = "element"
    resample: str = "step"
    rescale: bool = False
    seed: int = 0
    target_modules: list[str] | None = None
    include_bias: bool = False

    def __post_init__(self) -> None:
        p = self.drop_prob
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise ValueError(f"drop_prob must be a number in [0, 1), got {p!r}")
        if not 0.0 <= float(p) < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1) (p=1 would drop every gradient), got {p!r}")
        self.drop_prob = float(p)
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {list(GRANULARITIES)}, got {self.granularity!r}"
            )
        if self.resample not in RESAMPLE_MODES:
            raise ValueError(f"resample must be one of {list(RESAMPLE_MODES)}, got {self.resample!r}")
        for name in ("rescale", "include_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {self.seed!r}")
        tm = self.target_modules
        if tm is not None:
            if isinstance(tm, str) or not isinstance(tm, (list, tuple)):
                raise ValueError(
                    f"target_modules must be a list of module-name suffixes or None, got {tm!r}"
                )
            if not tm or not all(isinstance(t, str) and t for t in tm):
                raise ValueError(
                    f"target_modules must be a non-empty list of non-empty strings, got {tm!r}"
                )
            self.target_modules = list(tm)

    @property
    def scale(self) -> float:
        """Factor applied to kept gradients."""
        return 1.0 / (1.0 - self.drop_prob) if self.rescale else 1.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "GradDropConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown GradDropConfig keys {unknown}; valid keys are {sorted(known)}"
            )
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, s: str) -> "GradDropConfig":
        return cls.from_dict(json.loads(s))


def _stable_seed(seed: int, counter: int, key: str) -> int:
    """63-bit generator seed from (seed, counter, key); identical in every process and machine."""
    h = hashlib.blake2b(f"{seed}\x1f{counter}\x1f{key}".encode(), digest_size=8)
    return int.from_bytes(h.digest(), "little") & ((1 << 63) - 1)


def _draw_drop(seed: int, counter: int, key: str, shape: Sequence[int], p: float,
               device: torch.device) -> torch.Tensor:
    """Bool drop flags of ``shape`` on ``device`` (True with probability ``p``), a pure function of the
    arguments for a given device type (see the module docstring on CPU vs CUDA)."""
    gen = torch.Generator(device=device)
    gen.manual_seed(_stable_seed(seed, counter, key))  # host-side: sets Philox's key / reseeds mt19937
    # float32 explicitly: a caller's torch.set_default_dtype(bf16) must not coarsen the uniforms
    return torch.rand(shape, generator=gen, device=device, dtype=torch.float32) < p


def _logical_shape(param: torch.Tensor) -> torch.Size:
    # DeepSpeed ZeRO-3 partitions params in place; ds_shape keeps the full shape.
    return torch.Size(getattr(param, "ds_shape", param.shape))


def _match(name: str, suffix: str) -> bool:
    return name == suffix or name.endswith("." + suffix)


@dataclass
class _Target:
    name: str  # parameter name, e.g. "layers.0.mlp.up_proj.weight"
    key: str  # mask key: the parameter name (element) or the module name (row/layer)
    param: nn.Parameter
    shape: torch.Size


class GradDropController:
    """Owns the gradient hooks of one model; create it with :func:`apply_graddrop`."""

    def __init__(self, model: nn.Module, config: GradDropConfig):
        self.config = config
        self._step = 0
        self._epoch = 0
        self._targets: dict[str, _Target] = {}
        self._handles: list[Any] = []
        self._resolve(model)
        self._by_id = {id(t.param): t for t in self._targets.values()}
        # id(param) -> (counter, drop flags) the hook drew, until an exchange takes them (share_flags_with_exchange)
        self._flags_for_exchange: dict[int, tuple[int, torch.Tensor]] | None = None
        for t in self._targets.values():
            self._handles.append(t.param.register_hook(self._make_hook(t)))

    # ------------------------------------------------------------------ targets
    def _resolve(self, model: nn.Module) -> None:
        cfg = self.config
        seen: set[int] = set()
        hit = {s: False for s in cfg.target_modules or []}
        for mname, module in model.named_modules():
            if cfg.target_modules is None:
                if not isinstance(module, nn.Linear):
                    continue
            else:
                matched = [s for s in cfg.target_modules if _match(mname, s)]
                if not matched:
                    continue
            pnames = ["weight"] + (["bias"] if cfg.include_bias else [])
            for pn in pnames:
                param = module._parameters.get(pn)
                if param is None or id(param) in seen:  # absent, or tied and already hooked
                    continue
                if not param.requires_grad:
                    raise ValueError(
                        f"GradDrop target {mname}.{pn} has requires_grad=False; "
                        "unfreeze it or leave it out of target_modules"
                    )
                seen.add(id(param))
                if cfg.target_modules is not None:
                    for s in matched:
                        hit[s] = True
                full = f"{mname}.{pn}" if mname else pn
                key = full if cfg.granularity == "element" else (mname or "<root>")
                self._targets[full] = _Target(full, key, param, _logical_shape(param))
        missing = [s for s, ok in hit.items() if not ok]
        if missing or not self._targets:
            cands = sorted(
                {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if "weight" in m._parameters}
            )
            what = f"target_modules {missing}" if missing else "the model (no nn.Linear found)"
            raise ValueError(
                f"GradDrop: {what} matched no module with a trainable weight; "
                f"candidate module names: {cands[:12]}"
            )

    @property
    def targets(self) -> list[str]:
        """Names of the masked parameters."""
        return list(self._targets)

    # ------------------------------------------------------------------ counters
    @property
    def mask_counter(self) -> int:
        return self._step if self.config.resample == "step" else self._epoch

    @property
    def step_count(self) -> int:
        return self._step

    @property
    def epoch(self) -> int:
        return self._epoch

    def step(self) -> None:
        """Call once per optimizer step (after ``optimizer.step()``)."""
        self._step += 1

    def set_epoch(self, epoch: int) -> None:
        self._epoch = int(epoch)

    def state_dict(self) -> dict[str, int]:
        return {"step": self._step, "epoch": self._epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._step = int(state["step"])
        self._epoch = int(state["epoch"])

    # ------------------------------------------------------------------ masks
    def _compact_shape(self, t: _Target) -> tuple[int, ...]:
        """Smallest shape of ``t``'s mask that broadcasts to the parameter."""
        shape, granularity = t.shape, self.config.granularity
        if granularity == "element":
            return tuple(shape)
        if granularity == "row":
            return (shape[0],) + (1,) * (len(shape) - 1)
        return (1,) * len(shape)  # layer

    def _drop_flags(self, t: _Target, counter: int, device: torch.device) -> torch.Tensor:
        """Drop mask of ``t`` for ``counter`` in its compact shape, drawn on ``device``."""
        cfg = self.config
        return _draw_drop(cfg.seed, counter, t.key, self._compact_shape(t), cfg.drop_prob, device)

    def mask_for(self, name: str, device: torch.device | str | None = None) -> torch.Tensor:
        """Bool keep mask (same shape as the parameter) for the current counter, drawn on ``device``
        (default CPU). Equals the mask the gradient hook applies when ``device`` is the gradient's."""
        if name not in self._targets:
            raise KeyError(f"{name!r} is not a GradDrop target; targets: {self.targets[:8]}...")
        t = self._targets[name]
        dev = torch.device("cpu") if device is None else torch.device(device)
        return (~self._drop_flags(t, self.mask_counter, dev)).expand(t.shape).clone()

    def kept_fraction(self, device: torch.device | str | None = None) -> float:
        """Fraction of target entries whose gradient is kept for the current counter, with the masks
        drawn on ``device`` (default CPU; pass the gradients' device for the exact figure of a GPU run).
        Redraws every mask: meant for logging, not for the training loop."""
        dev = torch.device("cpu") if device is None else torch.device(device)
        kept = torch.zeros((), dtype=torch.int64, device=dev)  # summed on device: one sync at the end
        total = 0
        for t in self._targets.values():
            drop = self._drop_flags(t, self.mask_counter, dev)
            entries_per_flag = t.shape.numel() // drop.numel()
            kept += (drop.numel() - drop.sum()) * entries_per_flag
            total += t.shape.numel()
        return int(kept) / total

    def share_flags_with_exchange(self) -> None:
        """From now on the hook keeps the flags it draws until :meth:`keep_flags` takes them, so a gradient
        exchange reads them instead of drawing them again (on CPU the draw dominates; measured in
        bench_comm.py). Each parameter's flags are held from its backward hook to its reduction (about one
        bucket's worth); a backward whose reduction never comes (DDP ``no_sync``) overwrites them, so at most
        one byte per target entry (element granularity) is held."""
        if self._flags_for_exchange is None:
            self._flags_for_exchange = {}

    def keep_flags(self, param: torch.Tensor, device: torch.device | str) -> torch.Tensor | None:
        """Keep flags of ``param``'s gradient for the current counter in the mask's compact shape (they
        broadcast to the parameter's logical shape), drawn on ``device`` exactly as the hook draws them;
        ``None`` when every entry is kept (``param`` is not a target, or ``drop_prob`` is 0). Looked up by
        parameter identity: what a gradient exchange that sees only the engine's parameters needs."""
        return self._keep_flags(self._by_id.get(id(param)), device)

    def keep_flags_by_name(self, name: str, device: torch.device | str) -> torch.Tensor | None:
        """:meth:`keep_flags` looked up by parameter name (engines that replace the parameter objects,
        such as FSDP2, keep the names); ``None`` for a name that is not a target."""
        return self._keep_flags(self._targets.get(name), device)

    def _keep_flags(self, target: _Target | None, device: torch.device | str) -> torch.Tensor | None:
        if target is None or self.config.drop_prob == 0.0:
            return None
        device, counter = torch.device(device), self.mask_counter
        shared = (self._flags_for_exchange.pop(id(target.param), None) if self._flags_for_exchange is not None
                  else None)
        if shared is not None and shared[0] == counter and shared[1].device == device:
            return ~shared[1]  # what the hook drew for this counter: no second draw
        return ~self._drop_flags(target, counter, device)

    def _make_hook(self, t: _Target):
        cfg = self.config
        scale = cfg.scale

        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            # shapes are host metadata: this check costs no sync
            if grad.shape != t.shape:
                raise RuntimeError(
                    f"GradDrop: the gradient of {t.name} has shape {tuple(grad.shape)}, not the parameter's "
                    f"logical shape {tuple(t.shape)}; the engine hands tensor hooks a sharded or reshaped "
                    "gradient, which GradDrop does not support"
                )
            if cfg.drop_prob == 0.0:  # nothing to drop and scale == 1: leave the gradient as it is
                return None
            counter = self.mask_counter  # read at backward time
            drop = self._drop_flags(t, counter, grad.device)
            if self._flags_for_exchange is not None:  # the exchange reduces this gradient next: no second draw
                self._flags_for_exchange[id(t.param)] = (counter, drop)
            out = grad.masked_fill(drop, 0)  # keeps grad's dtype (bf16/fp16 included)
            return out.mul_(scale) if scale != 1.0 else out

        return hook

    def remove(self) -> None:
        """Unregister every hook; gradients become dense again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()


def apply_graddrop(model: nn.Module, config: GradDropConfig | None = None) -> GradDropController:
    """Register GradDrop gradient hooks on ``model``'s targets and return their controller."""
    return GradDropController(model, config if config is not None else GradDropConfig())


class GradualUnfreezing:
    """ULMFiT-style gradual unfreezing, the comparison baseline for GradDrop.

    ``blocks`` is ordered bottom to top (e.g. ``model.model.layers``). At step ``s`` only the top
    ``1 + s // unfreeze_every`` blocks receive gradients. Frozen blocks keep ``requires_grad=True``;
    their gradients are replaced by zeros with the same tensor-hook mechanism as GradDrop, so the
    optimizer's parameter groups and ZeRO/FSDP's flat buffers never change shape. Caveat, as for
    GradDrop: decoupled weight decay (AdamW) still shrinks "frozen" weights; use ``weight_decay=0``
    for them if that matters. Parameters outside ``blocks`` (embeddings, head) are left alone.
    """

    def __init__(self, blocks: Sequence[nn.Module] | Iterable[nn.Module], unfreeze_every: int):
        self.blocks = list(blocks)
        if not self.blocks:
            raise ValueError("blocks must be a non-empty ordered list of modules (bottom to top)")
        if isinstance(unfreeze_every, bool) or not isinstance(unfreeze_every, int) or unfreeze_every < 1:
            raise ValueError(f"unfreeze_every must be a positive int, got {unfreeze_every!r}")
        self.unfreeze_every = unfreeze_every
        self._step = 0
        self._handles: list[Any] = []
        self._numel = [0] * len(self.blocks)
        self._block_of: dict[int, int] = {}  # id(parameter) -> block index
        seen: set[int] = set()
        for i, block in enumerate(self.blocks):
            for p in block.parameters():
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
                self._block_of[id(p)] = i
                self._numel[i] += _logical_shape(p).numel()
                self._handles.append(p.register_hook(self._make_hook(i)))

    @property
    def step_count(self) -> int:
        return self._step

    @property
    def num_active(self) -> int:
        return min(len(self.blocks), 1 + self._step // self.unfreeze_every)

    def is_active(self, index: int) -> bool:
        return index >= len(self.blocks) - self.num_active

    def active_blocks(self) -> list[int]:
        return list(range(len(self.blocks) - self.num_active, len(self.blocks)))

    def param_is_active(self, param: torch.Tensor) -> bool | None:
        """Whether ``param``'s block receives gradients this step; ``None`` for a parameter outside the blocks."""
        index = self._block_of.get(id(param))
        return None if index is None else self.is_active(index)

    def kept_fraction(self) -> float:
        """Fraction of block parameters that receive gradients at the current step."""
        total = sum(self._numel)
        return sum(self._numel[i] for i in self.active_blocks()) / total if total else 0.0

    def _make_hook(self, index: int):
        def hook(grad: torch.Tensor) -> torch.Tensor | None:
            return None if self.is_active(index) else torch.zeros_like(grad)

        return hook

    def step(self) -> None:
        """Call once per optimizer step."""
        self._step += 1

    def state_dict(self) -> dict[str, int]:
        return {"step": self._step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._step = int(state["step"])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
