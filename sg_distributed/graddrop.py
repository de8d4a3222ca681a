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
parameter name (element granularity) or its module's name (row/layer granularity); the generator seed
comes from a keyed BLAKE2b hash, never Python's salted ``hash()``. Every rank of a data-parallel job
therefore draws the same mask with no communication, and a custom communication hook only needs to send
the kept entries (``controller.mask_for(name)`` gives them; ``kept_fraction()`` is the traffic ratio).
With stock DDP/ZeRO the dense (zero-filled) gradient is still reduced: the saving needs such a hook.

Caveats.

* Masking the gradient does not freeze the entry in the optimizer: momentum (SGD/Adam moments from
  earlier steps) and decoupled weight decay still move dropped entries. That is the "gradient noise"
  reading of GradDrop; use ``weight_decay=0`` and no momentum if a dropped entry must stay put.
* Masks are drawn on CPU (bit-identical on every machine) and cached on the gradient's device once per
  counter. For element granularity that costs one bool per parameter entry of device memory and a CPU
  ``torch.rand`` over all targets per resample; row/layer masks are tiny and broadcast.
* Under ZeRO-3 the parameter's logical shape is read from ``param.ds_shape``. Under FSDP2 the hooks
  sit on the parameters as they are when :func:`apply_graddrop` is called; whether they see the
  unsharded gradient after ``fully_shard`` has not been verified here.
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


def _draw_keep(seed: int, counter: int, key: str, n: int, p: float) -> torch.Tensor:
    """``n`` Bernoulli(1-p) keep flags (bool, CPU), a pure function of the arguments."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(_stable_seed(seed, counter, key))
    return torch.rand(n, generator=gen) >= p


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
        # name -> (counter, device, drop mask broadcastable to the grad)
        self._cache: dict[str, tuple[int, torch.device, torch.Tensor]] = {}
        self._handles: list[Any] = []
        self._resolve(model)
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
        self._cache.clear()

    # ------------------------------------------------------------------ masks
    def _compact_keep(self, t: _Target, counter: int) -> torch.Tensor:
        """Keep mask on CPU in its smallest broadcastable shape."""
        cfg, shape = self.config, t.shape
        if cfg.granularity == "element":
            n, view = shape.numel(), shape
        elif cfg.granularity == "row":
            n, view = shape[0], (shape[0],) + (1,) * (len(shape) - 1)
        else:  # layer
            n, view = 1, (1,) * len(shape)
        return _draw_keep(cfg.seed, counter, t.key, n, cfg.drop_prob).view(view)

    def mask_for(self, name: str) -> torch.Tensor:
        """Bool keep mask (CPU, same shape as the parameter) for the current counter."""
        if name not in self._targets:
            raise KeyError(f"{name!r} is not a GradDrop target; targets: {self.targets[:8]}...")
        t = self._targets[name]
        return self._compact_keep(t, self.mask_counter).expand(t.shape).clone()

    def kept_fraction(self) -> float:
        """Fraction of target entries whose gradient is kept for the current counter."""
        kept = total = 0
        for t in self._targets.values():
            m = self._compact_keep(t, self.mask_counter)
            kept += int(m.sum()) * (t.shape.numel() // m.numel())
            total += t.shape.numel()
        return kept / total

    def _drop_mask(self, t: _Target, device: torch.device) -> torch.Tensor:
        counter = self.mask_counter
        hit = self._cache.get(t.name)
        if hit is not None and hit[0] == counter and hit[1] == device:
            return hit[2]
        drop = (~self._compact_keep(t, counter)).to(device)
        self._cache[t.name] = (counter, device, drop)
        return drop

    def _make_hook(self, t: _Target):
        scale = self.config.scale

        def hook(grad: torch.Tensor) -> torch.Tensor:
            out = grad.masked_fill(self._drop_mask(t, grad.device), 0)
            return out * scale if scale != 1.0 else out

        return hook

    def remove(self) -> None:
        """Unregister every hook; gradients become dense again."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._cache.clear()


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
        seen: set[int] = set()
        for i, block in enumerate(self.blocks):
            for p in block.parameters():
                if not p.requires_grad or id(p) in seen:
                    continue
                seen.add(id(p))
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
