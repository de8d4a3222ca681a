"""Byte accounting of collectives (what travels between ranks) and the analytic costs of DESIGN §2.

Counting
========
``CommCounter`` is a context manager that records every ``torch.distributed`` collective issued inside
it, on this rank::

    with CommCounter() as counter:
        for step in range(steps):
            ...  # forward / engine.backward / engine.step
    print(counter.table(steps=steps))

Two conventions are recorded for every call (``p`` = size of the call's process group):

* ``payload`` -- bytes of the tensor(s) *this rank contributes* (``numel * element_size``):
  all_reduce / reduce / reduce_scatter(_tensor) / all_to_all: the full input; all_gather(_into_tensor):
  the rank's shard; broadcast and scatter: the tensor on the source rank, 0 elsewhere; send / isend: the
  tensor, recv / irecv: 0; gather: the rank's tensor; barrier: 0. The ``*_object`` collectives count the
  tensors they build internally (sizes + pickled bytes).
* ``wire`` -- bytes *sent by this rank* under the textbook bandwidth-optimal ring algorithms, with ``N``
  the bytes of the full (logical) tensor: all_reduce ``2(p-1)/p*N``; reduce_scatter ``(p-1)/p*N``
  (``N`` = full input); all_gather ``(p-1)/p*N`` (``N`` = full output, i.e. ``(p-1)`` shards); all_to_all
  ``(p-1)/p*N``; broadcast ``N`` (pipelined ring; the source and every forwarding rank send N -- an upper
  bound for the last rank of the ring); reduce ``N`` (pipelined ring towards the root); send ``N``;
  gather: ``N`` on non-root ranks; scatter ``(p-1)/p*N`` on the root; barrier 0. This is the estimate
  DESIGN §2 uses ("dense all-reduce 2(p-1)/p*N*b"); real NCCL/gloo may pick tree algorithms for small
  messages, so it is an estimate, not a measurement of the network.

Where the calls are caught
==========================
``layer="python"`` (default) wraps the Python functions of ``torch.distributed.distributed_c10d`` and
re-exports them under ``torch.distributed`` (``dist.all_reduce is distributed_c10d.all_reduce``), so it
catches every call made through either module at call time, including DeepSpeed 0.19.8's ``TorchBackend``
(``deepspeed.comm`` looks ``torch.distributed.<fn>`` up on every call) and FSDP2, plus the functional
collectives of ``torch.distributed._functional_collectives`` (DTensor's). DeepSpeed caches two
functions at ``init_distributed`` (``cdb.all_gather_function`` = all_gather_into_tensor and
``cdb.reduce_scatter_function`` = reduce_scatter_tensor, the ZeRO-3 workhorses); those two attributes
of the live backend are re-pointed too. The overhead is nil for non-collective ops.

``layer="dispatch"`` instead installs a ``TorchDispatchMode`` that sees the ``c10d::*`` operators every
``ProcessGroup`` call goes through, so it also sees collectives issued from C++ (e.g. DDP's reducer, when
the backward runs on the thread that entered the counter). It costs a Python round trip per aten op.

DDP's reducer calls C++ collectives directly, invisible to ``layer="python"``: register
``model.register_comm_hook(None, counter.ddp_hook())`` (an all-reduce-mean hook that counts its bucket).

Why not CommDebugMode or DeepSpeed's comms logger
=================================================
Measured on 2 gloo ranks (torch 2.13, DeepSpeed 0.19.8; tests/comm_crosscheck_worker.py), these library
counters cannot replace the hooks above; they serve as independent cross-checks (tests/distributed/test_comm.py):

* ``torch.distributed.tensor.debug.CommDebugMode`` keeps **op counts only** (``get_comm_counts()``: op ->
  int, no sizes), so the bytes would still need a dispatch mode of our own (``layer="dispatch"``). It
  **raises** (IndexError in its module tracker) as soon as one context spans two forwards of a module, i.e.
  any multi-step count (its tracker adds one forward hook per call). Like any dispatch mode it only sees
  the thread that entered it, and its op set has no ``barrier``, ``send`` or ``recv_``. Where it is used one
  step at a time it agrees with CommCounter's op counts on every engine (c10d eager, DDP, FSDP2, ZeRO-2,
  ZeRO-3), the **functional collectives** included (``_c10d_functional``: DTensor's ``full_tensor`` /
  redistribute, and the one scalar all-reduce of ``clip_grad_norm_`` over FSDP2 DTensor gradients, i.e.
  ``Engine.step`` with ``max_grad_norm`` and sharded k-vectors), which CommCounter's python layer now
  wraps too (``torch.distributed._functional_collectives``: ``all_reduce``, ``all_gather_single``,
  ``reduce_scatter_single``, ``all_to_all_single``, counted under the eager op's name). It still sees one
  thing CommCounter misses: like ``layer="dispatch"``, DDP's C++ broadcasts when it rebuilds its buckets
  at the second backward (2 calls, 24 B on the tiny test model; ``ddp_hook`` counts the gradient
  all-reduces only).
* DeepSpeed's comms logger (``"comms_logger": {"enabled": true, "prof_all": true}``) logs the count and
  size of the ``tensor`` argument of each ``deepspeed.comm`` call: for ZeRO-2 and ZeRO-3 these equal
  CommCounter's calls and payload bytes exactly (broadcast: logged on every rank, payload on the source
  only). But it sees nothing outside ``deepspeed.comm`` (FSDP2, DDP, our own ``torch.distributed`` calls)
  nor, by its source, ``deepspeed.comm.all_gather_coalesced`` (not a ``timed_op``); it has no wire
  bytes and no labels, is process-global, and synchronizes the accelerator after every collective.

Collective-device check
=======================
NCCL takes CUDA tensors only: a CPU tensor handed to a collective kills a multi-GPU job, and code that
only ever ran on CPU/gloo never notices. ``CommCounter(check_device=True)``, :func:`check_collective_devices`
or ``SG_CHECK_COLLECTIVE_DEVICE=1`` (read by ``CommCounter`` and, for the whole run, by
``process_group.init_process_group`` and ``SparseGradCallback``) make every collective caught by the python layer
(DeepSpeed's cached functions and the DDP hook's all-reduce included) and, with ``layer="dispatch"``, every
c10d operator, raise :class:`CollectiveDeviceError` when a tensor argument is not on the device type the
call's process group takes (``process_group.collective_device``: cuda under NCCL, cpu under gloo) or on the
``expected_device`` given. On CPU/gloo the default expectation is met by construction: there the check only
shows that it is transparent; tests force ``expected_device`` to see it fire.

Attribution
===========
``with counter.label("converted"): ...`` attributes every call issued inside to that label (default
label ``"-"``). Attribution by tensor ``data_ptr`` is *not* offered: ZeRO-1/2 copy gradients into flat
``ipg`` buckets, ZeRO-3 reduces flat partitions and DDP reduces flat buckets, so the pointers a collective
sees almost never belong to a parameter. To split traffic by parameter group, measure configurations that
differ only in which parameters are trainable.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

__all__ = [
    "CommCounter",
    "CollectiveDeviceError",
    "check_collective_devices",
    "check_collective_devices_from_env",
    "OpStats",
    "wire_bytes",
    "dense_allreduce_bytes",
    "sparse_allgather_bytes",
    "kvector_allreduce_bytes",
    "sparse_breakeven_density",
    "design_cost_check",
    "fmt_bytes",
]


# --------------------------------------------------------------------------------------------------
# Analytic costs (DESIGN §2)
# --------------------------------------------------------------------------------------------------


def dense_allreduce_bytes(N: int, p: int, bytes_per: int = 2) -> float:
    """Bytes each rank sends in a ring all-reduce of ``N`` values of ``bytes_per`` bytes: ``2(p-1)/p*N*b``."""
    _check_p(p)
    return 2.0 * (p - 1) / p * N * bytes_per


def sparse_allgather_bytes(k: int, p: int, index_bytes: int = 4, value_bytes: int = 2) -> float:
    """Bytes each rank sends when every rank all-gathers its own ``k`` (index, value) pairs.

    Ring all-gather of ``p`` shards of ``k*(i+b)`` bytes: each rank forwards ``p-1`` shards,
    ``(p-1)*k*(i+b)`` (DESIGN's ``(p-1)k(b+4)`` with int32 flat indices).
    """
    _check_p(p)
    return float((p - 1) * k * (index_bytes + value_bytes))


def kvector_allreduce_bytes(k: int, p: int, value_bytes: int = 2) -> float:
    """Fixed support: the k values are a dense vector, ring all-reduced: ``2(p-1)/p*k*b``."""
    return dense_allreduce_bytes(k, p, value_bytes)


def sparse_breakeven_density(p: int, index_bytes: int = 4, value_bytes: int = 2) -> float:
    """Density below which the sparse all-gather beats the dense all-reduce: ``2b/(p(i+b))`` (2/(3p) in bf16)."""
    _check_p(p)
    return 2.0 * value_bytes / (p * (index_bytes + value_bytes))


def design_cost_check(blocks: int = 11, m: int = 11008, n: int = 4096, k_per_matrix: int = 100_000,
                      p: int = 8, value_bytes: int = 2, index_bytes: int = 4) -> dict[str, float]:
    """DESIGN §2's LLaMA-2-7B cost check: 11 blocks x {up, down} (11008x4096), 8 ranks, bf16.

    The printed numbers (3.47 GB, 92 MB (38x), 7.7 MB (451x)) come out with: decimal units (1 GB = 1e9 B),
    ring costs, bf16 values (2 B), int32 flat indices (4 B) and **k = 100,000 per matrix** (the paper's
    LLaMA budget; 100,000 / 45,088,768 = 0.2218 %, printed "0.22 %"). Taking k = 0.22 % exactly
    (99,195 per matrix) gives 7.64 MB and 454x for the k-vector instead.
    """
    matrices = 2 * blocks
    N = matrices * m * n
    k = matrices * k_per_matrix
    dense = dense_allreduce_bytes(N, p, value_bytes)
    sparse = sparse_allgather_bytes(k, p, index_bytes, value_bytes)
    kvec = kvector_allreduce_bytes(k, p, value_bytes)
    return {"N": N, "k": k, "density": k / N, "dense_allreduce": dense, "sparse_allgather": sparse,
            "kvector_allreduce": kvec, "sparse_ratio": dense / sparse, "kvector_ratio": dense / kvec,
            "breakeven_density": sparse_breakeven_density(p, index_bytes, value_bytes)}


def wire_bytes(op: str, full_bytes: float, p: int, is_root: bool = True) -> float:
    """Ring-algorithm bytes sent by one rank for ``op`` on a logical tensor of ``full_bytes`` (see module doc)."""
    if p <= 1:
        return 0.0
    frac = (p - 1) / p
    if op in ("all_reduce", "all_reduce_coalesced"):
        return 2.0 * frac * full_bytes
    if op in ("reduce_scatter", "reduce_scatter_tensor", "all_gather", "all_gather_into_tensor",
              "all_gather_coalesced", "all_to_all", "all_to_all_single"):
        return frac * full_bytes
    if op in ("broadcast", "reduce", "send", "isend"):
        return float(full_bytes)
    if op == "gather":
        return 0.0 if is_root else float(full_bytes)
    if op == "scatter":
        return frac * full_bytes if is_root else 0.0
    return 0.0  # recv, irecv, barrier


def _check_p(p: int) -> None:
    if not isinstance(p, int) or p < 1:
        raise ValueError(f"the number of ranks p must be a positive int, got {p!r}")


def fmt_bytes(b: float) -> str:
    """Decimal units (kB/MB/GB = 1e3/1e6/1e9), as DESIGN prints them."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(b) >= scale:
            return f"{b / scale:.3g} {unit}"
    return f"{b:.0f} B"


# --------------------------------------------------------------------------------------------------
# Counter
# --------------------------------------------------------------------------------------------------


@dataclass
class OpStats:
    calls: int = 0
    payload: int = 0
    wire: float = 0.0

    def add(self, other: "OpStats") -> None:
        self.calls += other.calls
        self.payload += other.payload
        self.wire += other.wire

    def scaled(self, f: float) -> "OpStats":
        return OpStats(self.calls * f, self.payload * f, self.wire * f)  # type: ignore[arg-type]


@dataclass
class Snapshot:
    """Per-(label, op) totals at one point in time."""

    stats: dict[tuple[str, str], OpStats] = field(default_factory=dict)

    def by_op(self) -> dict[str, OpStats]:
        out: dict[str, OpStats] = defaultdict(OpStats)
        for (_, op), s in self.stats.items():
            out[op].add(s)
        return dict(out)

    def by_label(self) -> dict[str, OpStats]:
        out: dict[str, OpStats] = defaultdict(OpStats)
        for (label, _), s in self.stats.items():
            out[label].add(s)
        return dict(out)

    def total(self) -> OpStats:
        out = OpStats()
        for s in self.stats.values():
            out.add(s)
        return out

    def __sub__(self, other: "Snapshot") -> "Snapshot":
        out = {}
        for key, s in self.stats.items():
            o = other.stats.get(key, OpStats())
            d = OpStats(s.calls - o.calls, s.payload - o.payload, s.wire - o.wire)
            if d.calls or d.payload or d.wire:
                out[key] = d
        return Snapshot(out)

    def scaled(self, f: float) -> "Snapshot":
        return Snapshot({k: v.scaled(f) for k, v in self.stats.items()})

    def to_dict(self) -> dict:
        return {"by_op": {op: vars(s) for op, s in sorted(self.by_op().items())},
                "by_label": {lab: vars(s) for lab, s in sorted(self.by_label().items())},
                "total": vars(self.total())}


_ACTIVE: list["CommCounter"] = []
_LOCK = threading.Lock()
_TLS = threading.local()


def _record(op: str, payload: int, wire: float) -> None:
    for counter in list(_ACTIVE):
        if counter.layer == "python":
            counter._add(op, payload, wire)


def _nbytes(t: Any) -> int:
    if isinstance(t, torch.Tensor):
        return t.numel() * t.element_size()
    if isinstance(t, (list, tuple)):
        return sum(_nbytes(x) for x in t)
    return 0


def _group_size(group) -> int:
    try:
        return dist.get_world_size(group)
    except Exception:
        return 1


def _my_rank(group=None) -> int:
    try:
        return dist.get_rank(group) if group is not None else dist.get_rank()
    except Exception:
        return 0


def _is_root(a: dict, key: str) -> bool:
    """Is this rank the src/dst of a rooted collective (global ``src``/``dst`` or ``group_src``/``group_dst``)?"""
    group = a.get("group")
    gkey = "group_" + key
    if a.get(gkey) is not None:
        return _my_rank(group) == a[gkey]
    if a.get(key) is not None:
        return _my_rank() == a[key]
    return _my_rank(group) == 0


def _cost(op: str, a: dict) -> tuple[int, float]:
    """(payload bytes this rank contributes, ring wire bytes this rank sends) of one call."""
    p = _group_size(a.get("group"))
    if op in ("all_reduce", "reduce"):
        n = _nbytes(a.get("tensor"))
        return n, wire_bytes(op, n, p)
    if op == "all_reduce_coalesced":
        n = _nbytes(a.get("tensors"))
        return n, wire_bytes(op, n, p)
    if op == "broadcast":
        n = _nbytes(a.get("tensor"))
        root = _is_root(a, "src")
        return (n if root else 0), (wire_bytes(op, n, p) if (root or p > 2) else 0.0)
    if op in ("reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter_single"):
        n = _nbytes(a.get("input"))
        return n, wire_bytes("reduce_scatter", n, p)
    if op == "reduce_scatter":
        n = _nbytes(a.get("input_list"))
        return n, wire_bytes(op, n, p)
    if op in ("all_gather_into_tensor", "_all_gather_base", "all_gather_single"):
        n = _nbytes(a.get("input_tensor"))
        return n, wire_bytes("all_gather", n * p, p)
    if op == "all_gather":
        n = _nbytes(a.get("tensor"))
        return n, wire_bytes(op, n * p, p)
    if op == "all_gather_coalesced":
        n = _nbytes(a.get("input_tensor_list"))
        return n, wire_bytes("all_gather", n * p, p)
    if op == "all_to_all_single":
        n = _nbytes(a.get("input"))
        return n, wire_bytes(op, n, p)
    if op == "all_to_all":
        n = _nbytes(a.get("input_tensor_list"))
        return n, wire_bytes(op, n, p)
    if op in ("send", "isend"):
        n = _nbytes(a.get("tensor"))
        return n, float(n)
    if op == "gather":
        n = _nbytes(a.get("tensor"))
        return n, wire_bytes(op, n, p, is_root=_is_root(a, "dst"))
    if op == "scatter":
        root = _is_root(a, "src")
        n = _nbytes(a.get("scatter_list")) if root else 0
        return n, wire_bytes(op, n, p, is_root=root)
    return 0, 0.0  # recv, irecv, barrier, monitored_barrier


# Functions that move tensors themselves ("leaf") and ones built from leaf calls ("composite": their
# inner leaf calls are counted under the composite's name).
_LEAF_FUNCS = ("all_reduce", "all_reduce_coalesced", "reduce", "broadcast", "all_gather", "all_gather_into_tensor",
               "_all_gather_base", "all_gather_single", "all_gather_coalesced", "reduce_scatter",
               "reduce_scatter_tensor", "_reduce_scatter_base", "reduce_scatter_single", "all_to_all",
               "all_to_all_single", "send", "recv", "isend", "irecv", "gather", "scatter", "barrier",
               "monitored_barrier")
_COMPOSITE_FUNCS = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list",
                    "send_object_list", "recv_object_list", "batch_isend_irecv")
_OP_NAME = {"_all_gather_base": "all_gather_into_tensor", "_reduce_scatter_base": "reduce_scatter_tensor",
            "all_gather_single": "all_gather_into_tensor", "reduce_scatter_single": "reduce_scatter_tensor",
            "monitored_barrier": "barrier"}

_ORIGINALS: dict[str, Callable] = {}
_WRAPPERS: dict[str, Callable] = {}
_DS_PATCHED: list[tuple[Any, str, Callable]] = []


def _make_wrapper(name: str, fn: Callable, composite: bool) -> Callable:
    sig = inspect.signature(fn)
    op_name = _OP_NAME.get(name, name)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _ACTIVE and not _DEVICE_CHECKS:
            return fn(*args, **kwargs)
        if _DEVICE_CHECKS and not composite:  # composites are checked through the leaf calls they make
            _check_call(op_name, sig, args, kwargs)
        if not _ACTIVE:
            return fn(*args, **kwargs)
        stack = getattr(_TLS, "stack", None)
        if stack is None:
            stack = _TLS.stack = []
        if any(kind == "leaf" for kind, _ in stack):  # a leaf inside a leaf: already counted
            return fn(*args, **kwargs)
        outer = next((nm for kind, nm in stack if kind == "composite"), None)
        if composite:
            stack.append(("composite", outer or op_name))
            try:
                if outer is None:
                    _record(op_name, 0, 0.0)  # one call of the composite itself
                return fn(*args, **kwargs)
            finally:
                stack.pop()
        try:
            bound = sig.bind_partial(*args, **kwargs)
            a = dict(bound.arguments)
            for pname, param in sig.parameters.items():
                if pname not in a and param.default is not inspect.Parameter.empty:
                    a[pname] = param.default
            payload, wire = _cost(name, a)
        except Exception:  # never break a collective because of accounting
            payload, wire = 0, 0.0
        if outer is not None:
            for counter in list(_ACTIVE):
                if counter.layer == "python":
                    counter._add(outer, payload, wire, count_call=False)
        else:
            _record(op_name, payload, wire)
        stack.append(("leaf", op_name))
        try:
            return fn(*args, **kwargs)
        finally:
            stack.pop()

    wrapper.__sg_comm_wrapper__ = True  # type: ignore[attr-defined]
    return wrapper


# torch's functional collectives (DTensor's redistribute / full_tensor, clip_grad_norm_ over DTensor gradients):
# Python functions of torch.distributed._functional_collectives that go straight to the _c10d_functional ops,
# never through the c10d functions above. Counted under the eager op they stand for.
_FUNCOL_FUNCS = ("all_reduce", "all_gather_single", "reduce_scatter_single", "all_to_all_single")
_FUNCOL_ORIGINALS: dict[str, Callable] = {}
_FUNCOL_WRAPPERS: dict[str, Callable] = {}


def _funcol_group(group: Any, tag: str = ""):
    """The ProcessGroup behind a functional collective's ``group`` (a group, ranks, (mesh, dim), a name)."""
    from torch.distributed import _functional_collectives as funcol

    try:
        return dist.distributed_c10d._resolve_process_group(funcol._resolve_group_name(group, tag))
    except Exception:
        return None  # counted with the default group's size


def _make_funcol_wrapper(name: str, fn: Callable) -> Callable:
    sig = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if not _ACTIVE or getattr(_TLS, "stack", None):  # inactive, or inside a counted call
            return fn(*args, **kwargs)
        try:
            a = dict(sig.bind_partial(*args, **kwargs).arguments)
            tensor, group = a.get("self"), _funcol_group(a.get("group"), a.get("tag", ""))
            payload, wire = _cost(name, {"tensor": tensor, "input": tensor, "input_tensor": tensor, "group": group})
        except Exception:  # never break a collective because of accounting
            payload, wire = 0, 0.0
        _record(_OP_NAME.get(name, name), payload, wire)
        return fn(*args, **kwargs)

    wrapper.__sg_comm_wrapper__ = True  # type: ignore[attr-defined]
    return wrapper


def _install_python_layer() -> None:
    from torch.distributed import _functional_collectives as funcol

    for name in _FUNCOL_FUNCS:
        fn = getattr(funcol, name, None)
        if fn is None or getattr(fn, "__sg_comm_wrapper__", False):
            continue
        if name not in _FUNCOL_WRAPPERS:
            _FUNCOL_ORIGINALS[name] = fn
            _FUNCOL_WRAPPERS[name] = _make_funcol_wrapper(name, fn)
        setattr(funcol, name, _FUNCOL_WRAPPERS[name])
    c10d = dist.distributed_c10d
    for name in _LEAF_FUNCS + _COMPOSITE_FUNCS:
        fn = getattr(c10d, name, None)
        if fn is None or getattr(fn, "__sg_comm_wrapper__", False):
            continue
        if name not in _WRAPPERS:
            _ORIGINALS[name] = fn
            _WRAPPERS[name] = _make_wrapper(name, fn, name in _COMPOSITE_FUNCS)
        setattr(c10d, name, _WRAPPERS[name])
        if getattr(dist, name, None) is fn:
            setattr(dist, name, _WRAPPERS[name])
    _patch_deepspeed_backend()


def _patch_deepspeed_backend() -> None:
    """Re-point the functions DeepSpeed's TorchBackend cached at init (all_gather / reduce_scatter)."""
    import sys

    mod = sys.modules.get("deepspeed.comm.comm")
    cdb = getattr(mod, "cdb", None) if mod is not None else None
    if cdb is None:
        return
    for attr in ("all_gather_function", "reduce_scatter_function"):
        fn = getattr(cdb, attr, None)
        for name, orig in _ORIGINALS.items():
            if fn is orig:
                setattr(cdb, attr, _WRAPPERS[name])
                _DS_PATCHED.append((cdb, attr, orig))
                break


def _uninstall_python_layer() -> None:
    from torch.distributed import _functional_collectives as funcol

    for name, orig in _FUNCOL_ORIGINALS.items():
        if getattr(funcol, name, None) is _FUNCOL_WRAPPERS[name]:
            setattr(funcol, name, orig)
    c10d = dist.distributed_c10d
    for name, orig in _ORIGINALS.items():
        if getattr(c10d, name, None) is _WRAPPERS[name]:
            setattr(c10d, name, orig)
        if getattr(dist, name, None) is _WRAPPERS[name]:
            setattr(dist, name, orig)
    while _DS_PATCHED:
        obj, attr, orig = _DS_PATCHED.pop()
        setattr(obj, attr, orig)


# --------------------------------------------------------------------------------------------------
# Collective-device check
# --------------------------------------------------------------------------------------------------

CHECK_ENV = "SG_CHECK_COLLECTIVE_DEVICE"
_DEVICE_CHECKS: list[torch.device | None] = []  # one entry per active check: the forced device, or None
_ENV_CHECK_ON = False


class CollectiveDeviceError(RuntimeError):
    """A tensor handed to a collective lives on a device the process group cannot take."""


def _tensors_of(name: str, value: Any):
    """(argument path, tensor) for every tensor in an argument (lists of tensors, lists of lists)."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            yield from _tensors_of(f"{name}[{i}]", item)


def _check_tensors(op: str, tensors, group) -> None:
    """Raise CollectiveDeviceError for the first tensor not on a device type every active check allows."""
    tensors = list(tensors)
    if not tensors:
        return
    group_types = None  # what the call's group takes: computed once, for the checks without a forced device
    for forced in list(_DEVICE_CHECKS):
        if forced is None:
            group_types = group_types if group_types is not None else _allowed_types(group)
            allowed = group_types
            why = f"the process group ({_backend_name(group)}) takes {' or '.join(sorted(allowed))} tensors"
        else:
            allowed, why = {forced.type}, f"the check was told to expect {forced.type}"
        for path, t in tensors:
            if t.device.type not in allowed:
                raise CollectiveDeviceError(
                    f"{op}: argument {path} ({tuple(t.shape)}, {t.dtype}) is on {t.device}, but {why}; build it "
                    f"with device=sg_distributed.distributed.process_group.collective_device() or move it there before the call")


def _allowed_types(group) -> set[str]:
    """Device types a collective on ``group`` may take: ``collective_device``'s (cuda under nccl, cpu under
    gloo), plus every type of a "cpu:gloo,cuda:nccl" backend string (each type goes to its own backend)."""
    from sg_distributed.distributed.process_group import collective_device

    try:
        allowed = {collective_device(group).type}
    except Exception:  # an unusual group object: judge by the default group
        allowed = {collective_device().type}
    backend = _backend_name(group)
    if ":" in backend:
        allowed |= {pair.split(":")[0].strip() for pair in backend.split(",")}
    return allowed


def _backend_name(group) -> str:
    try:
        return str(dist.get_backend(group))
    except Exception:
        return "unknown backend"


def _check_call(op: str, sig: inspect.Signature, args, kwargs) -> None:
    try:
        bound = sig.bind_partial(*args, **kwargs).arguments
    except TypeError:  # let the collective itself report a bad call
        return
    group = bound.get("group")
    _check_tensors(op, (pair for name, value in bound.items() if name != "group"
                        for pair in _tensors_of(name, value)), group)


def _as_device(device: str | torch.device | None) -> torch.device | None:
    return None if device is None else torch.device(device)


def _push_check(expected: torch.device | None) -> None:
    with _LOCK:
        _DEVICE_CHECKS.append(expected)
        _install_python_layer()


def _pop_check(expected: torch.device | None) -> None:
    with _LOCK:
        _DEVICE_CHECKS.remove(expected)
        if not _ACTIVE and not _DEVICE_CHECKS:
            _uninstall_python_layer()


@contextlib.contextmanager
def check_collective_devices(expected_device: str | torch.device | None = None):
    """Inside the block, a tensor handed to a collective on the wrong device raises CollectiveDeviceError.

    ``expected_device``: the device type every tensor must have; default: what
    ``process_group.collective_device(group)`` says for the call's group (cuda under NCCL, cpu under gloo).
    """
    expected = _as_device(expected_device)
    _push_check(expected)
    try:
        yield
    finally:
        _pop_check(expected)


def _env_check_enabled() -> bool:
    value = os.environ.get(CHECK_ENV, "").strip().lower()
    if value in ("", "0", "false", "no", "off"):
        return False
    if value in ("1", "true", "yes", "on"):
        return True
    raise ValueError(f"{CHECK_ENV}={value!r}: use 1 (check the device of every collective's tensors) or 0")


def check_collective_devices_from_env() -> bool:
    """With ``SG_CHECK_COLLECTIVE_DEVICE=1``, turn the check on for the rest of the process (idempotent).

    Called once the process group exists (``process_group.init_process_group``, ``SparseGradCallback``), so that
    a run launched by a test checks calibration, training, evaluation and checkpoint collectives alike."""
    global _ENV_CHECK_ON
    if _ENV_CHECK_ON or not _env_check_enabled():
        return _ENV_CHECK_ON
    _push_check(None)
    _ENV_CHECK_ON = True
    # one line per process, so a log (or a test) shows the run was checked
    print(f"{CHECK_ENV}=1: collective-device check on (rank {_my_rank()})", file=sys.stderr, flush=True)
    return True


# c10d operators (dispatcher level) -> (op name, cost function of the op's arguments)
def _dispatch_cost(packet_name: str, args: Sequence[Any], world: Callable[[Any], int]) -> tuple[str, int, float] | None:
    # Schemas (torch 2.x): allreduce_(Tensor[] tensors, pg, ...), _allgather_base_(Tensor out, Tensor in, pg, ...),
    # allgather_(Tensor[][] out, Tensor[] in, pg, ...), allgather_into_tensor_coalesced_(Tensor[] out, Tensor[] in, pg),
    # _reduce_scatter_base_(Tensor out, Tensor in, pg, ...), reduce_scatter_(Tensor[] out, Tensor[][] in, pg, ...),
    # reduce_scatter_tensor_coalesced_(Tensor[] out, Tensor[] in, pg, ...), broadcast_(Tensor[] t, pg, root_rank, ...),
    # reduce_(Tensor[] t, pg, ...), alltoall_base_(Tensor out, Tensor in, pg, ...),
    # alltoall_(Tensor[] out, Tensor[] in, pg),
    # send(Tensor[] t, pg, dst, tag), recv_(Tensor[] t, pg, src, tag), gather_, scatter_, barrier.
    pg = next((x for x in args if isinstance(x, torch.ScriptObject) or type(x).__name__ == "ProcessGroup"), None)
    p = world(pg)
    name = packet_name
    if name in ("allreduce_", "allreduce_coalesced_"):
        n = _nbytes(args[0])
        return "all_reduce", n, wire_bytes("all_reduce", n, p)
    if name == "reduce_":
        n = _nbytes(args[0])
        return "reduce", n, wire_bytes("reduce", n, p)
    if name == "broadcast_":
        n = _nbytes(args[0])
        root = _to_int(args[2]) if len(args) > 2 else 0
        me = _pg_rank(pg)
        return "broadcast", (n if me == root else 0), (wire_bytes("broadcast", n, p) if (me == root or p > 2) else 0.0)
    if name in ("_allgather_base_", "allgather_into_tensor_coalesced_"):
        n = _nbytes(args[1])
        return "all_gather_into_tensor", n, wire_bytes("all_gather", n * p, p)
    if name in ("allgather_", "allgather_coalesced_"):
        n = _nbytes(args[1])
        return "all_gather", n, wire_bytes("all_gather", n * p, p)
    if name in ("_reduce_scatter_base_", "reduce_scatter_tensor_coalesced_"):
        n = _nbytes(args[1])
        return "reduce_scatter_tensor", n, wire_bytes("reduce_scatter", n, p)
    if name == "reduce_scatter_":
        n = _nbytes(args[1])
        return "reduce_scatter", n, wire_bytes("reduce_scatter", n, p)
    if name in ("alltoall_base_", "alltoall_"):
        n = _nbytes(args[1])
        return "all_to_all", n, wire_bytes("all_to_all", n, p)
    if name == "send":
        n = _nbytes(args[0])
        return "send", n, float(n)
    if name in ("recv_", "recv_any_source_"):
        return "recv", 0, 0.0
    if name == "gather_":
        n = _nbytes(args[1])
        return "gather", n, float(n)  # root's self-copy not excluded (dispatch layer does not know the root cheaply)
    if name == "scatter_":
        n = _nbytes(args[1])
        return "scatter", n, wire_bytes("scatter", n, p)
    if name in ("barrier", "monitored_barrier_"):
        return "barrier", 0, 0.0
    return None


def _to_int(x: Any) -> int:
    try:
        return int(x)
    except Exception:
        return -1


def _pg_rank(pg) -> int:
    try:
        return pg.rank()
    except Exception:
        return _my_rank()


def _pg_size(pg) -> int:
    try:
        return pg.size()
    except Exception:
        return _group_size(None)


def _make_dispatch_mode(counter: "CommCounter"):
    from torch.utils._python_dispatch import TorchDispatchMode

    class _C10dCounterMode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            packet = func._overloadpacket
            if getattr(packet, "_qualified_op_name", "").startswith("c10d::"):
                if counter.check_device:  # also sees C++ callers (DDP's reducer) on this thread
                    pg = next((x for x in args if isinstance(x, dist.ProcessGroup)), None)
                    _check_tensors(f"c10d::{packet.__name__}", (pair for i, x in enumerate(args)
                                                                for pair in _tensors_of(f"args[{i}]", x)), pg)
                try:
                    res = _dispatch_cost(packet.__name__, args, _pg_size)
                except Exception:
                    res = None
                if res is not None:
                    counter._add(*res)
            return func(*args, **kwargs)

    return _C10dCounterMode()


class CommCounter:
    """Counts the collectives issued on this rank while active (see the module docstring for conventions).

    ``layer``: ``"python"`` (default; torch.distributed functions + DeepSpeed's cached ones) or
    ``"dispatch"`` (c10d operators through a TorchDispatchMode; also sees C++ callers on this thread).
    ``check_device``: while active, raise CollectiveDeviceError for a collective's tensor on the wrong
    device (see "Collective-device check" in the module doc); default: on when ``expected_device`` is
    given or ``SG_CHECK_COLLECTIVE_DEVICE=1``. ``expected_device``: the device type to require instead of
    ``process_group.collective_device(group)``.
    """

    def __init__(self, layer: str = "python", check_device: bool | None = None,
                 expected_device: str | torch.device | None = None):
        if layer not in ("python", "dispatch"):
            raise ValueError(f"layer must be 'python' or 'dispatch', got {layer!r}")
        self.layer = layer
        if check_device is None:
            check_device = expected_device is not None or _env_check_enabled()
        self.check_device = bool(check_device)
        self.expected_device = _as_device(expected_device)
        self._stats: dict[tuple[str, str], OpStats] = defaultdict(OpStats)
        self._labels: list[str] = []
        self._paused = 0
        self._mode = None
        self._lock = threading.Lock()

    # -- context management ------------------------------------------------------------------------
    def __enter__(self) -> "CommCounter":
        if self.check_device:
            _push_check(self.expected_device)
        if self.layer == "python":
            with _LOCK:
                _ACTIVE.append(self)
                _install_python_layer()
        else:
            self._mode = _make_dispatch_mode(self)
            self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self.layer == "python":
            with _LOCK:
                if self in _ACTIVE:
                    _ACTIVE.remove(self)
                if not _ACTIVE and not _DEVICE_CHECKS:
                    _uninstall_python_layer()
        elif self._mode is not None:
            self._mode.__exit__(*exc)
            self._mode = None
        if self.check_device:
            _pop_check(self.expected_device)

    @contextlib.contextmanager
    def label(self, name: str):
        """Attribute the collectives issued inside to ``name`` (labels nest; the innermost wins)."""
        self._labels.append(str(name))
        try:
            yield self
        finally:
            self._labels.pop()

    @contextlib.contextmanager
    def paused(self):
        """Do not count the collectives issued inside (e.g. the counter's own bookkeeping)."""
        self._paused += 1
        try:
            yield self
        finally:
            self._paused -= 1

    # -- recording ---------------------------------------------------------------------------------
    def _add(self, op: str, payload: int, wire: float, count_call: bool = True) -> None:
        if self._paused:
            return
        key = (self._labels[-1] if self._labels else "-", op)
        with self._lock:
            s = self._stats[key]
            s.calls += 1 if count_call else 0
            s.payload += int(payload)
            s.wire += float(wire)

    def record(self, op: str, payload: int, wire: float | None = None, group=None) -> None:
        """Record a collective issued where the counter cannot see it (custom C++ paths)."""
        p = _group_size(group)
        if wire is None:
            full = payload * p if op.startswith("all_gather") else payload  # all-gather payload is one shard
            wire = wire_bytes(op, full, p)
        self._add(op, payload, wire)

    def ddp_hook(self) -> Callable:
        """A DDP comm hook (all-reduce mean, as DDP's default) that counts each bucket:
        ``ddp_model.register_comm_hook(None, counter.ddp_hook())``. Counts only while the counter is active."""
        counter = self

        def hook(state, bucket):
            group = state if state is not None else dist.group.WORLD
            p = _group_size(group)
            buf = bucket.buffer()
            # the dispatch layer sees the all-reduce below itself; the python layer does not
            if counter in _ACTIVE:
                n = buf.numel() * buf.element_size()
                counter._add("all_reduce", n, wire_bytes("all_reduce", n, p))
            buf.div_(p)
            with _suppress_python_layer():
                work = dist.all_reduce(buf, group=group, async_op=True)
            return work.get_future().then(lambda f: f.value()[0])

        return hook

    # -- reading -----------------------------------------------------------------------------------
    def snapshot(self) -> Snapshot:
        with self._lock:
            return Snapshot({k: OpStats(v.calls, v.payload, v.wire) for k, v in self._stats.items()})

    def reset(self) -> Snapshot:
        """Return the totals so far and start from zero."""
        with self._lock:
            snap = Snapshot({k: OpStats(v.calls, v.payload, v.wire) for k, v in self._stats.items()})
            self._stats.clear()
        return snap

    def per_step(self, steps: int, snapshot: Snapshot | None = None) -> Snapshot:
        """The totals (or ``snapshot``) divided by ``steps``."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        return (snapshot or self.snapshot()).scaled(1.0 / steps)

    def table(self, steps: int = 1, snapshot: Snapshot | None = None, by: str = "op") -> str:
        """Markdown table of calls, payload and ring wire bytes per step, by op (or by ``"label"``)."""
        snap = self.per_step(steps, snapshot)
        rows = snap.by_op() if by == "op" else snap.by_label()
        head = f"| {by} | calls/step | payload bytes/step | wire bytes/step (ring) |\n|---|---:|---:|---:|"
        lines = [head]
        for key, s in sorted(rows.items(), key=lambda kv: -kv[1].payload):
            lines.append(f"| {key} | {s.calls:.3g} | {s.payload:,.0f} ({fmt_bytes(s.payload)}) | "
                         f"{s.wire:,.0f} ({fmt_bytes(s.wire)}) |")
        t = snap.total()
        lines.append(f"| **total** | {t.calls:.3g} | {t.payload:,.0f} ({fmt_bytes(t.payload)}) | "
                     f"{t.wire:,.0f} ({fmt_bytes(t.wire)}) |")
        return "\n".join(lines)

    def gather(self, snapshot: Snapshot | None = None) -> list[dict]:
        """Every rank's ``snapshot().to_dict()`` (a collective; not counted)."""
        snap = (snapshot or self.snapshot()).to_dict()
        if not (dist.is_available() and dist.is_initialized()):
            return [snap]
        out: list = [None] * dist.get_world_size()
        with self.paused(), _suppress_python_layer():
            _ORIGINALS.get("all_gather_object", dist.all_gather_object)(out, snap)
        return out


@contextlib.contextmanager
def _suppress_python_layer():
    """Calls inside are treated as nested in a leaf (so the python layer does not count them)."""
    stack = getattr(_TLS, "stack", None)
    if stack is None:
        stack = _TLS.stack = []
    stack.append(("leaf", "<internal>"))
    try:
        yield
    finally:
        stack.pop()
