"""SparseGradLinear: a frozen base linear plus a trainable sparse update in a rotated basis.

    y = base(x) + ((x R_C) S^T) P_I^T,      W_eff = W0 + P S R^T

S is the m x n rotated update with support Omega (k entries) and values v (the only trainable
tensor). P_I / R_C are the columns of P / R that the support touches. The backward computes
dL/dv = gather_Omega((dY P_I)^T (x R_C)) and the input gradient without ever forming an m x n tensor.
Two kernels: under a row/column budget (the default) a dense r x c block at its cost floor
(``_BlockDelta``: the products x R_C and dY P_I that dL/dv needs, the rest in the cheaper order, output
added onto the base's); without a budget CSR sparse products (sparse @ dense, and a sampled dense-dense
product for dL/dv), whose touched rows x cols are most of the matrix.

P and R are stored once per layer type (``SharedBasis``, transposed so that P_I^T is a row slice) and every
layer reads its P_I / R_C at each use instead of keeping its own copies: ~160 MB less on SmolLM2 (60
matrices, budget 0.25), 1.54 GB -> 570 MB per GPU for the LLaMA-2-7B preset in bf16 (estimator). In the
default leading block (``SparseGradConfig.budget_block``) those are the first rows of P^T / R^T, read as
views; a scored block gathers its rows at each use, forward and backward, which cost 8-19 % of a 7B layer's
time on a 2-core CPU (README, Systems).

The same class is peft's tuner layer for SparseGrad (``sparsegrad.model.SparseGradTuner``).
"""
from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from peft.tuners.tuners_utils import BaseTunerLayer

from ..quant import dequantized_weight, is_quantized
from sg_distributed.sparsegrad.basis import transpose_
from sg_distributed.sparsegrad.selection import Support

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")

# The dense-block kernel is used when the touched block is at most this fraction of the matrix.
DENSE_BLOCK_FRACTION = 0.25


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, shape, check_invariants=False)


def _csr_dtype(dtype: torch.dtype) -> torch.dtype:
    """torch's CSR products have no bf16/fp16 on CPU (MKL) and no low-precision ``sampled_addmm`` on CUDA:
    those run in fp32 and are cast back."""
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


def master_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision kept for trained values and bases: float64 in a float64 model, else float32.

    bf16/fp16 models compute in low precision but keep these in fp32: a bf16 value of size 0.05 cannot
    move by less than ~2e-4, so small optimizer updates would round away (and a bf16 basis saved with an
    adapter would make loading it onto an fp32 base lossy).
    """
    return torch.float64 if dtype == torch.float64 else torch.float32


def compute_dtype_for(x: torch.Tensor) -> torch.dtype:
    """The dtype the sparse update runs in: autocast's for x's device when autocast is on, else x's own.

    Decided per call from the input, so engine casts that bypass ``Module._apply`` (DeepSpeed's
    ``p.data = p.data.to(bf16)``, FSDP2 mixed precision) never leave an fp32 delta in a bf16 model.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def _converted_like(fn, tensor: torch.Tensor) -> tuple[torch.device, torch.dtype]:
    """Device and dtype that ``Module._apply``'s ``fn`` would give ``tensor``, with the dtype kept at
    ``master_dtype`` precision when ``fn`` changes it (a device-only move keeps the dtype as it is: DeepSpeed
    casts its bf16 params itself, then moves the module)."""
    target = fn(torch.empty(0, dtype=tensor.dtype, device=tensor.device))
    dtype = tensor.dtype if target.dtype == tensor.dtype else master_dtype(target.dtype)
    return target.device, dtype


class SharedBasis:
    """P^T and R^T of one layer type, held once and read by all its layers.

    The *master* copy stays on the host in full precision (``master_dtype``: fp32, or float64 in a
    float64 model): it is what adapters save and checksums hash. Layers compute with a copy in their
    compute dtype on their device, made from the master on first use and kept (one per device) until
    the dtype or the model's placement changes; an fp32 CPU model uses the master itself. Not a buffer:
    registering it on every layer would make ``model.to()`` copy it once per layer. Each layer's
    ``_apply`` calls ``apply(fn)``, which acts once per ``fn`` (one ``model.to()`` passes the same
    ``fn`` to every module).
    """

    def __init__(self, P: torch.Tensor, R: torch.Tensor, dtype: torch.dtype | None = None, consume: bool = False):
        """``consume=True``: the caller gives P and R up (calibration's fresh bases), so a host matrix already in
        the master's dtype is transposed in place instead of copied (at 7B: 1.1 GB less while installing)."""
        dtype = master_dtype(dtype or P.dtype)
        self.Pt = _master_transpose(P, dtype, consume)  # m x m, row i = column i of P
        self.Rt = _master_transpose(R, dtype, consume)  # n x n
        self._compute: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self._applied_fn = None

    @property
    def dtype(self) -> torch.dtype:
        """The master's dtype (compute copies follow the input: see ``for_compute``)."""
        return self.Pt.dtype

    @property
    def P(self) -> torch.Tensor:
        return self.Pt.T

    @property
    def R(self) -> torch.Tensor:
        return self.Rt.T

    def for_compute(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(P^T, R^T) in ``dtype`` on ``device``: the master itself when it matches, else a cached copy."""
        device = torch.device(device)
        if dtype == self.Pt.dtype and device == self.Pt.device:
            return self.Pt, self.Rt
        cached = self._compute.get(device)
        if cached is None or cached[0].dtype != dtype:
            cached = self._compute[device] = (self.Pt.to(device, dtype), self.Rt.to(device, dtype))
        return cached

    def apply(self, fn) -> None:
        """Follow a ``model.to()``-style conversion: a float64 model gets a float64 master; compute copies
        are dropped (remade on the next forward where and as the layers then run)."""
        if fn is self._applied_fn:
            return
        self._applied_fn = fn
        _, dtype = _converted_like(fn, self.Pt)  # the master stays on the host
        self.Pt, self.Rt = self.Pt.to(dtype), self.Rt.to(dtype)
        self._compute.clear()

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor held: the master and the compute copies (for memory accounting)."""
        return [self.Pt, self.Rt] + [t for pair in self._compute.values() for t in pair]

    def __getstate__(self):  # the remembered fn is a closure: not picklable, and only meaningful in-process
        return {**self.__dict__, "_applied_fn": None, "_compute": {}}


def _master_transpose(matrix: torch.Tensor, dtype: torch.dtype, consume: bool) -> torch.Tensor:
    """``matrix.T`` as a contiguous host tensor of ``dtype``: in ``matrix``'s own memory when it may be consumed."""
    matrix = matrix.detach()
    if (consume and matrix.device.type == "cpu" and matrix.dtype == dtype and matrix.is_contiguous()
            and matrix.dim() == 2 and matrix.shape[0] == matrix.shape[1]):
        transpose_(matrix)
        return matrix
    return matrix.T.to("cpu", dtype).contiguous()


def _gather_rows(full: torch.Tensor, index: torch.Tensor | int | None) -> torch.Tensor:
    """The rows of a transposed basis a layer computes with: all (None), the leading ``index`` rows (an int:
    a contiguous view, no copy), or a gather of the given rows."""
    if index is None:
        return full
    return full[:index] if isinstance(index, int) else full.index_select(0, index)


def fold_into_output_side(tokens: int, r: int, c: int, m: int) -> bool:
    """Forward order: (B S^T) P_I^T costs T*c*r + T*r*m MACs, B (S^T P_I^T) costs r*c*m + T*c*m.

    B = x R_C (T x c) is computed either way (backward needs it). Folding S into P_I^T pays when r > c,
    e.g. up_proj under a 0.25/0.25 budget (r = m/4 > c = n/4): 0.30 -> 0.10 of the base forward.
    """
    return r * c * m + tokens * c * m < tokens * (c * r + r * m)


def fold_into_input_side(tokens: int, r: int, c: int, n: int) -> bool:
    """Input-gradient order: (A S) R_C^T costs T*r*c + T*c*n, A (S R_C^T) costs r*c*n + T*r*n.

    A = dY P_I (T x r) is computed either way (dL/dv needs it); folding pays when c > r (down_proj)."""
    return r * c * n + tokens * r * n < tokens * (r * c + c * n)


class _BlockDelta(torch.autograd.Function):
    """out = base_out + x R_C S^T P_I^T with S a dense r x c block (a row/column budget).

    The cost floor of the delta: the two products with the token dimension that the value gradient needs,
    B = x R_C and A = dY P_I, plus the cheaper of two orders for the rest of the forward and of the input
    gradient (``fold_into_output_side`` / ``fold_into_input_side``: S folded into the smaller side once per
    micro-batch). S is formed once per micro-batch and saved for backward; the output is added onto the
    base layer's (``addmm``), so no separate T x m delta is allocated. ``base2d`` None: return the delta
    alone (the base output has another dtype; the caller adds).

    ``Pt`` / ``Rt`` are the shared transposed bases; ``rows`` / ``cols`` pick P_I^T / R_C^T (``_gather_rows``:
    a ``leading`` block is a view). The full bases are kept on ctx (no copy, and not packed by saved-tensor
    hooks such as CPU offload); a scored block's slices are gathered again in backward rather than saved,
    so no layer's slice outlives its use.
    """

    @staticmethod
    def forward(ctx, base2d, x2d, values, Pt, Rt, rows, cols, structure):
        Pi_t, Rc_t = _gather_rows(Pt, rows), _gather_rows(Rt, cols)  # r x m, c x n
        B = x2d @ Rc_t.T  # T x c
        S = structure.dense(values)  # r x c
        (r, c), m = S.shape, Pi_t.shape[1]
        left, right = (B, S.T @ Pi_t) if fold_into_output_side(B.shape[0], r, c, m) else (B @ S.T, Pi_t)
        out = left @ right if base2d is None else torch.addmm(base2d, left, right)
        ctx.save_for_backward(B, S)
        ctx.bases = (Pt, Rt, rows, cols)
        ctx.structure = structure
        return out

    @staticmethod
    def backward(ctx, grad_out):
        B, S = ctx.saved_tensors
        Pt, Rt, rows, cols = ctx.bases
        A = grad_out.to(B.dtype) @ _gather_rows(Pt, rows).T  # T x r
        grad_x = grad_values = None
        if ctx.needs_input_grad[2]:
            grad_values = ctx.structure.sampled_product(A, B)  # gather_Omega(A^T B)
        if ctx.needs_input_grad[1]:
            Rc_t = _gather_rows(Rt, cols)
            (r, c), n = S.shape, Rc_t.shape[1]
            grad_x = A @ (S @ Rc_t) if fold_into_input_side(A.shape[0], r, c, n) else (A @ S) @ Rc_t
        return grad_out if ctx.needs_input_grad[0] else None, grad_x, grad_values, None, None, None, None, None


class _SparseDelta(torch.autograd.Function):
    """delta(x) = ((x R_C) S^T) P_I^T with S in CSR (no row/column budget: the touched rows x cols are most
    of the matrix, and a dense block would cost more than the base layer). Same bases and gathers as
    ``_BlockDelta``.
    """

    @staticmethod
    def forward(ctx, x2d, values, Pt, Rt, rows, cols, structure):
        B = x2d @ _gather_rows(Rt, cols).T  # T x c
        Z = structure.right_multiply_transpose(values, B)  # B S^T: T x r
        ctx.save_for_backward(B, values)
        ctx.bases = (Pt, Rt, rows, cols)
        ctx.structure = structure
        return Z @ _gather_rows(Pt, rows)

    @staticmethod
    def backward(ctx, grad_out):
        B, values = ctx.saved_tensors
        Pt, Rt, rows, cols = ctx.bases
        structure = ctx.structure
        A = grad_out.to(B.dtype) @ _gather_rows(Pt, rows).T  # T x r
        grad_x = grad_values = None
        if ctx.needs_input_grad[1]:
            grad_values = structure.sampled_product(A, B)  # gather_Omega(A^T B)
        if ctx.needs_input_grad[0]:
            grad_x = structure.right_multiply(values, A) @ _gather_rows(Rt, cols)  # (A S) R_C^T
        return grad_x, grad_values, None, None, None, None, None


class SupportStructure:
    """Index structure of S inside the touched r x c block, with the two kernels it needs.

    Entries are in *slot order* (slot i holds ``values[i]``): row-major after calibration, permuted when
    re-selection puts a new entry into a dropped entry's slot. CSR kernels see a row-major view.
    ``score`` (r*c, float32), when set, accumulates |G~| or G~^2 of the whole block at every backward:
    the growth scores of support re-selection (dense-block kernel only, where G~ of the block is computed
    anyway).
    """

    def __init__(self, local_rows: torch.Tensor, local_cols: torch.Tensor, r: int, c: int, dense_block: bool):
        self.r, self.c, self.dense_block = r, c, dense_block
        self.local_rows, self.local_cols = local_rows, local_cols
        self.flat = local_rows * c + local_cols
        k = local_rows.numel()
        self.order = torch.argsort(self.flat)  # slot order -> row-major
        self.in_order = bool(torch.equal(self.order, torch.arange(k, device=self.order.device)))
        # CSR of S (row-major view) and of S^T (needs a permutation of the values).
        self.crow = torch.zeros(r + 1, dtype=torch.int64, device=local_rows.device)
        self.crow[1:] = torch.bincount(local_rows, minlength=r).cumsum(0)
        self.col = local_cols[self.order]
        self.perm_t = torch.argsort(local_cols * r + local_rows)
        self.crow_t = torch.zeros(c + 1, dtype=torch.int64, device=local_rows.device)
        self.crow_t[1:] = torch.bincount(local_cols, minlength=c).cumsum(0)
        self.col_t = local_rows[self.perm_t]
        self._ones = None
        self.k = k
        self.score: torch.Tensor | None = None
        self.score_square = False

    def dense(self, values: torch.Tensor) -> torch.Tensor:
        return values.new_zeros(self.r * self.c).index_copy_(0, self.flat, values).view(self.r, self.c)

    def _row_major(self, values):
        return values if self.in_order else values[self.order]

    def right_multiply_transpose(self, values, B):
        """B S^T (T x r), S in CSR (the dense block's products are in ``_BlockDelta``)."""
        work = _csr_dtype(B.dtype)
        S = _csr(self.crow, self.col, self._row_major(values).to(work), (self.r, self.c))
        return (S @ B.T.to(work)).T.to(B.dtype)

    def right_multiply(self, values, A):
        """A S (T x c), S in CSR."""
        work = _csr_dtype(A.dtype)
        St = _csr(self.crow_t, self.col_t, values[self.perm_t].to(work), (self.c, self.r))
        return (St @ A.T.to(work)).T.to(A.dtype)

    def sampled_product(self, A, B):
        """(A^T B) at the support, in slot order."""
        if self.dense_block:
            block = (A.T @ B).reshape(-1)
            if self.score is not None:
                self.score.add_(block.float().square() if self.score_square else block.float().abs())
            return block.index_select(0, self.flat)
        work = _csr_dtype(A.dtype)
        if self._ones is None or self._ones.dtype != work or self._ones.device != A.device:
            self._ones = torch.ones(self.k, dtype=work, device=A.device)
        pattern = _csr(self.crow, self.col, self._ones, (self.r, self.c))
        sampled = torch.sparse.sampled_addmm(pattern, A.T.to(work).contiguous(), B.to(work).contiguous(),
                                             beta=0.0).values().to(A.dtype)
        return sampled if self.in_order else torch.empty_like(sampled).index_copy_(0, self.order, sampled)

    def to(self, device) -> "SupportStructure":
        for name in ("local_rows", "local_cols", "flat", "order", "crow", "col", "perm_t", "crow_t", "col_t"):
            setattr(self, name, getattr(self, name).to(device))
        if self.score is not None:
            self.score = self.score.to(device)
        self._ones = None
        return self


class SparseGradLinear(nn.Module, BaseTunerLayer):
    """Frozen ``base_layer`` (nn.Linear, bnb Linear8bitLt or Linear4bit) + trainable k-vector ``sparsegrad_values``.

    Pass the layer type's ``basis`` (a ``SharedBasis`` in the compute dtype) to share P and R with the
    other layers of that type; with ``P``, ``R`` only, the layer gets a private copy.

    It is also peft's tuner layer for SparseGrad (``sparsegrad.model.SparseGradTuner``, one adapter per
    layer): ``SparseGradLinear.placeholder(base, k)`` is the layer before calibration (a k-vector of zeros,
    no bases or support yet), and ``install`` gives it the calibrated bases and support. ``merge`` /
    ``unmerge`` fold the update into the base weight; a disabled adapter computes the base layer alone.
    """

    adapter_layer_names = ()  # the k-vector is a plain parameter: one adapter per layer (see set_adapter)
    other_param_names = ()

    def __init__(self, base: nn.Linear, P: torch.Tensor | None, R: torch.Tensor | None, support: Support | None,
                 values: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                 block: tuple[torch.Tensor, torch.Tensor] | None = None, basis: SharedBasis | None = None,
                 k: int | None = None, adapter_name: str = "default"):
        super().__init__()
        m, n = base.out_features, base.in_features
        for p in base.parameters():
            p.requires_grad_(False)
        self.base_layer = base
        self.in_features, self.out_features = n, m
        self._active_adapter = adapter_name
        self._disable_adapters = False
        self.merged_adapters = []
        self.passthrough = False  # calibration runs the base layer alone through an uncalibrated layer
        self._dequantized_by_merge = False
        self.basis: SharedBasis | None = None
        self.structure: SupportStructure | None = None
        k = support.k if support is not None else k
        if k is None:
            raise ValueError(f"SparseGradLinear({m}x{n}): give a support, or k for a layer calibrated later")
        dtype = master_dtype(basis.dtype if basis is not None else (dtype or compute_dtype_of(base)))
        init = torch.zeros(k, dtype=dtype) if values is None else values.detach().to(dtype).clone()
        self.sparsegrad_values = nn.Parameter(init)
        self.register_buffer("support_flat", torch.zeros(k, dtype=torch.int64))
        self.register_buffer("rows_used", torch.zeros(0, dtype=torch.int64), persistent=False)
        self.register_buffer("cols_used", torch.zeros(0, dtype=torch.int64), persistent=False)
        self._leading = (None, None)
        if support is not None:
            self.install(support, P, R, basis=basis, block=block)

    @classmethod
    def placeholder(cls, base: nn.Module, k: int, adapter_name: str = "default") -> "SparseGradLinear":
        """The layer before calibration: a zero k-vector (so an optimizer can be built on it), no support."""
        return cls(base, None, None, None, k=k, adapter_name=adapter_name)

    @property
    def calibrated(self) -> bool:
        return self.structure is not None

    @torch.no_grad()
    def install(self, support: Support, P: torch.Tensor | None = None, R: torch.Tensor | None = None,
                basis: SharedBasis | None = None, block: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """Give the layer its bases (a type's ``SharedBasis``, or private P and R) and its support; the
        k-vector keeps its values (zeros after calibration, the saved ones when loading)."""
        m, n = self.out_features, self.in_features
        if basis is None:
            if P is None or R is None:
                raise ValueError(f"SparseGradLinear({m}x{n}): give the bases, as P and R or as a SharedBasis")
            basis = SharedBasis(P, R, self.sparsegrad_values.dtype)
        shape_P, shape_R = tuple(basis.Pt.shape), tuple(basis.Rt.shape)
        if tuple(support.shape) != (m, n) or shape_P != (m, m) or shape_R != (n, n):
            raise ValueError(
                f"SparseGradLinear: base is {m}x{n} but support is {tuple(support.shape)}, "
                f"P is {shape_P}, R is {shape_R}"
            )
        if support.k != self.k:
            raise ValueError(f"SparseGradLinear({m}x{n}): the support has {support.k} entries, the layer's "
                             f"k-vector {self.k}")
        self.basis = basis
        # The block the layer computes in: the budget's rows x cols the support was chosen (and is re-grown) in,
        # one shape per layer type; without a budget, the rows x cols the support touches.
        rows_used, cols_used = (torch.unique(support.rows), torch.unique(support.cols)) if block is None else block
        rows_used, cols_used = rows_used.to(torch.int64), cols_used.to(torch.int64)
        if block is not None and not (torch.isin(support.rows, rows_used).all() and torch.isin(support.cols, cols_used).all()):
            raise ValueError(f"SparseGradLinear({m}x{n}): the support has entries outside the given rows x cols block")
        device = self.support_flat.device
        self.support_flat = support.flat().to(device)
        self.rows_used, self.cols_used = rows_used.to(device), cols_used.to(device)
        # Rows / cols 0..r-1 (a ``leading`` block, or a scored one that happens to be): read as slices.
        self._leading = tuple(int(used.numel()) if used.numel() and int(used[-1]) == used.numel() - 1 else None
                              for used in (rows_used, cols_used))
        self.structure = self._structure(support.rows.to(device), support.cols.to(device))

    def _structure(self, rows: torch.Tensor, cols: torch.Tensor) -> SupportStructure:
        r, c = self.rows_used.numel(), self.cols_used.numel()
        return SupportStructure(torch.searchsorted(self.rows_used, rows), torch.searchsorted(self.cols_used, cols),
                                r, c, dense_block=r * c <= DENSE_BLOCK_FRACTION * self.out_features * self.in_features)

    @property
    def support(self) -> Support:
        """The support in slot order: ``support.rows[i], support.cols[i]`` hold ``sparsegrad_values[i]``."""
        return Support.from_flat(self.support_flat, (self.out_features, self.in_features), sort=False)

    # --- support re-selection (see reselect.py) -----------------------------------------------------
    def start_scoring(self, square: bool = False) -> torch.Tensor:
        """Accumulate |G~| (or G~^2) of the r x c block at every backward; returns the (r*c,) buffer."""
        s = self.structure
        if not s.dense_block:
            raise ValueError(
                f"SparseGradLinear({self.out_features}x{self.in_features}): support re-selection needs the "
                f"dense-block kernel (a row/column budget with rows x cols <= {DENSE_BLOCK_FRACTION} of the "
                f"matrix; this layer touches {s.r}x{s.c}); set max_rows/max_cols, e.g. 0.25"
            )
        if s.score is None:
            s.score = torch.zeros(s.r * s.c, dtype=torch.float32, device=self.support_flat.device)
        s.score_square = square
        return s.score

    def block_to_flat(self, block_index: torch.Tensor) -> torch.Tensor:
        """Index in the r x c block -> index in the m x n rotated matrix."""
        c = self.cols_used.numel()
        return self.rows_used[block_index // c] * self.in_features + self.cols_used[block_index % c]

    @torch.no_grad()
    def replace_entries(self, slots: torch.Tensor, block_index: torch.Tensor) -> None:
        """Slot ``slots[i]`` now holds block entry ``block_index[i]``, starting from 0 (callers reset the
        slots' optimizer state: see ``reselect.reset_slots``)."""
        flat = self.support_flat.clone()
        flat[slots] = self.block_to_flat(block_index)
        if torch.unique(flat).numel() != flat.numel():
            raise ValueError("SparseGradLinear.replace_entries: the new support has repeated entries")
        n = self.in_features
        score, square = self.structure.score, self.structure.score_square
        self.support_flat.copy_(flat)
        self.structure = self._structure(flat // n, flat % n)
        self.structure.score, self.structure.score_square = score, square

    @property
    def k(self) -> int:
        return getattr(self.sparsegrad_values, "ds_numel", self.sparsegrad_values.numel())  # ZeRO-3: a placeholder

    def _apply(self, fn, recurse=True):
        _apply_keeping_precision(self, fn, recurse, ("sparsegrad_values",), super()._apply)
        if self.calibrated:
            self.basis.apply(fn)
            self.structure.to(self.support_flat.device)
        return self

    def _slice_index(self, side: int) -> torch.Tensor | int | None:
        """Which rows of P^T (side 0) or R^T (side 1) the layer uses: None, all of them; an int, the leading
        ones (a view); else the rows to gather."""
        used, full = (self.rows_used, self.out_features) if side == 0 else (self.cols_used, self.in_features)
        if used.numel() == full:
            return None
        return self._leading[side] or used

    def _master_slice(self, full: torch.Tensor, side: int) -> torch.Tensor:
        index = self._slice_index(side)
        return _gather_rows(full, index.to(full.device) if isinstance(index, torch.Tensor) else index)

    @property
    def P_sub(self) -> torch.Tensor:
        """P_I (m x r) in full precision, gathered from the shared basis's master (a copy on the host; the
        layer keeps no slice)."""
        return self._master_slice(self.basis.Pt, 0).T

    @property
    def R_sub(self) -> torch.Tensor:
        """R_C (n x c) in full precision, gathered from the shared basis's master."""
        return self._master_slice(self.basis.Rt, 1).T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.disable_adapters or self.merged or (self.passthrough and not self.calibrated):
            if self.disable_adapters and self.merged:
                self.unmerge()
            return self.base_layer(x)
        if not self.calibrated:
            raise RuntimeError(f"SparseGradLinear({self.out_features}x{self.in_features}) is not calibrated: call "
                               f"calibrate(batches) on the model (or load a trained adapter) before training or "
                               f"inference; with a Trainer or TRL's SFTTrainer, pass "
                               f"callbacks=[sg_distributed.SparseGradCallback()]")
        out = self.base_layer(x)
        dtype = compute_dtype_for(x)
        Pt, Rt = self.basis.for_compute(dtype, x.device)
        x2d = x.reshape(-1, x.shape[-1]).to(dtype)
        rows, cols = self._slice_index(0), self._slice_index(1)
        values = self.sparsegrad_values.to(dtype)
        with torch.autocast(x.device.type, enabled=False):  # dtypes are chosen above, for both passes
            if self.structure.dense_block:
                base2d = out.reshape(-1, self.out_features) if out.dtype == dtype else None
                y = _BlockDelta.apply(base2d, x2d, values, Pt, Rt, rows, cols, self.structure)
                if base2d is not None:
                    return y.view(*out.shape)
                delta = y
            else:
                delta = _SparseDelta.apply(x2d, values, Pt, Rt, rows, cols, self.structure)
        return out + delta.reshape(*out.shape[:-1], self.out_features).to(out.dtype)

    @torch.no_grad()
    def delta_weight(self, dtype=torch.float64) -> torch.Tensor:
        """P S R^T as a dense m x n matrix from the full-precision bases (for merging and tests, not for
        training), on the layer's device."""
        device = self.sparsegrad_values.device
        S = self.structure.dense(self.sparsegrad_values.to(dtype))
        return self.P_sub.to(device, dtype) @ S @ self.R_sub.to(device, dtype).T

    @torch.no_grad()
    def _merged_weight(self) -> torch.Tensor:
        """W0 + P S R^T in float64 (an 8-bit / 4-bit W0 dequantised first)."""
        W0 = dequantized_weight(self.base_layer).to(torch.float64)
        return W0 + self.delta_weight().to(W0.device)

    @torch.no_grad()
    def merged_linear(self, weight: torch.Tensor | None = None) -> nn.Linear:
        """A plain nn.Linear in the base's compute dtype holding ``weight`` (default: W0 + P S R^T)."""
        weight = self._merged_weight() if weight is None else weight
        dtype = compute_dtype_of(self.base_layer)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.base_layer.bias is not None,
                           dtype=dtype, device=self.sparsegrad_values.device)
        linear.weight.copy_(weight.to(dtype))
        if self.base_layer.bias is not None:
            linear.bias.copy_(self.base_layer.bias.to(dtype))
        return linear

    # --- peft's tuner-layer protocol ---------------------------------------------------------------------
    def set_adapter(self, adapter_names: str | list[str], inference_mode: bool = False) -> None:
        names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
        if names != [self._active_adapter]:
            raise ValueError(f"SparseGrad keeps one adapter per model ({self._active_adapter!r}); got {names}")
        self.sparsegrad_values.requires_grad_(not inference_mode)

    def enable_adapters(self, enabled: bool) -> None:
        if enabled:
            self.set_adapter(self._active_adapter)
        else:
            self.sparsegrad_values.requires_grad_(False)
        self._disable_adapters = not enabled

    @torch.no_grad()
    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """W0 += P S R^T, computed in float64 and rounded once into the base weight's dtype. An 8-bit / 4-bit
        base is dequantised into a plain nn.Linear of its compute dtype (no requantisation: it would round the
        update away); such a merge cannot be undone."""
        if self.merged:
            return
        if not self.calibrated:
            raise RuntimeError("SparseGradLinear: nothing to merge before calibration")
        new = self._merged_weight()
        if safe_merge and not torch.isfinite(new).all():
            raise ValueError(f"SparseGradLinear({self.out_features}x{self.in_features}): NaN/inf in the merged weight")
        if is_quantized(self.base_layer):
            self.base_layer = self.merged_linear(new)
            self._dequantized_by_merge = True
        else:
            self.base_layer.weight.copy_(new.to(self.base_layer.weight.dtype))
        self.merged_adapters.append(self._active_adapter)

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        if self._dequantized_by_merge:
            raise RuntimeError(f"SparseGradLinear({self.out_features}x{self.in_features}): the merge dequantised an "
                               f"8-bit/4-bit base; it cannot be unmerged")
        weight = self.base_layer.weight
        weight.copy_((weight.double() - self.delta_weight().to(weight.device)).to(weight.dtype))
        self.merged_adapters.clear()

    def extra_repr(self) -> str:
        s = self.structure
        if s is None:
            return f"in={self.in_features}, out={self.out_features}, k={self.k}, not calibrated"
        return (f"in={self.in_features}, out={self.out_features}, k={self.k}, rows={s.r}, cols={s.c}, "
                f"kernel={'dense-block' if s.dense_block else 'csr'}")


class _RotatedBiasGrad(torch.autograd.Function):
    """Identity on the bias; its gradient is rotated by P (the authors' bias-gradient quirk)."""

    @staticmethod
    def forward(ctx, bias, P):
        ctx.save_for_backward(P)
        return bias.clone()

    @staticmethod
    def backward(ctx, grad):
        (P,) = ctx.saved_tensors
        return grad.to(P.dtype) @ P, None


class ReferenceSparseGradLinear(nn.Module):
    """Paper-exact layer: the dense rotated weight W~ = P^T W R is the parameter, y = x R W~^T P^T + b.

    A gradient hook keeps the top-k |G~| entries of each backward and records them in ``rotated_weight._sg_mask``;
    ``LazyAdam`` then updates only those entries (SparseAdam semantics). The bias is trained; with
    ``rotated_bias_grad`` its gradient is (dY P) summed, as in the authors' code.
    """

    def __init__(self, base: nn.Linear, P: torch.Tensor | None, R: torch.Tensor | None, k: int,
                 rotated_bias_grad: bool = False):
        super().__init__()
        W = dequantized_weight(base)
        dtype = master_dtype(compute_dtype_of(base))  # trained in full precision, computed in the input's
        self.in_features, self.out_features, self.k = base.in_features, base.out_features, k
        self.identity = P is None
        if not self.identity:
            self.register_buffer("P", P.to(dtype), persistent=False)
            self.register_buffer("R", R.to(dtype), persistent=False)
            W = self.P.T @ W.to(dtype) @ self.R
        self.rotated_weight = nn.Parameter(W.to(dtype).clone())
        self.bias = nn.Parameter(base.bias.detach().to(dtype).clone()) if base.bias is not None else None
        self.rotated_bias_grad = rotated_bias_grad
        self.rotated_weight.register_hook(self._keep_top_k)

    def _keep_top_k(self, grad: torch.Tensor) -> torch.Tensor:
        idx = torch.topk(grad.abs().reshape(-1), self.k).indices
        mask = torch.zeros(grad.numel(), dtype=torch.bool, device=grad.device)
        mask[idx] = True
        mask = mask.view_as(grad)
        previous = getattr(self.rotated_weight, "_sg_mask", None)  # micro-batches of one step add up
        self.rotated_weight._sg_mask = mask if previous is None else previous | mask
        return grad * mask

    _full_precision = ("rotated_weight", "bias", "P", "R")

    def _apply(self, fn, recurse=True):
        _apply_keeping_precision(self, fn, recurse, self._full_precision, super()._apply)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = compute_dtype_for(x)
        x, weight = x.to(dtype), self.rotated_weight.to(dtype)
        if self.identity:
            out = F.linear(x, weight)
        else:
            out = F.linear(F.linear(F.linear(x, self.R.T.to(dtype)), weight), self.P.to(dtype))
        if self.bias is not None:
            bias = _RotatedBiasGrad.apply(self.bias, self.P) if (self.rotated_bias_grad and not self.identity) else self.bias
            out = out + bias.to(dtype)
        return out

    def merged_linear(self) -> nn.Linear:
        return linear_from_rotated(self.rotated_weight, None if self.identity else self.P,
                                   None if self.identity else self.R, self.bias)


@torch.no_grad()
def linear_from_rotated(rotated_weight: torch.Tensor, P: torch.Tensor | None, R: torch.Tensor | None,
                        bias: torch.Tensor | None) -> nn.Linear:
    """A plain nn.Linear with W = P W~ R^T (computed in float64; P, R None = identity bases)."""
    W = rotated_weight.to(torch.float64)
    if P is not None:
        W = P.to(torch.float64) @ W @ R.to(torch.float64).T
    out_features, in_features = W.shape
    linear = nn.Linear(in_features, out_features, bias=bias is not None, dtype=rotated_weight.dtype, device=W.device)
    linear.weight.copy_(W.to(linear.weight.dtype))
    if bias is not None:
        linear.bias.copy_(bias)
    return linear


def _apply_keeping_precision(module: nn.Module, fn, recurse: bool, names: tuple[str, ...], apply) -> None:
    """``Module._apply`` for ``module``, except that the parameters / buffers ``names`` follow ``fn``'s device
    but keep ``master_dtype`` precision: ``model.to(torch.bfloat16)`` must not round trained values to bf16."""
    kept = {(table, name): getattr(module, table).pop(name) for table in ("_parameters", "_buffers")
            for name in names if getattr(module, table).get(name) is not None}
    try:
        apply(fn, recurse)
    finally:
        for (table, name), tensor in kept.items():
            getattr(module, table)[name] = tensor
    for param in kept.values():
        device, dtype = _converted_like(fn, param)
        if param.device != device or param.dtype != dtype:
            param.data = param.data.to(device, dtype)
            if param.grad is not None:
                param.grad.data = param.grad.data.to(device, dtype)


def compute_dtype_of(base: nn.Module) -> torch.dtype:
    """Dtype activations flow in: the float weight's dtype, or the bnb layer's compute dtype. A 4-bit weight's
    dtype is only its packing's storage (``bnb_4bit_quant_storage=torch.bfloat16`` packs nf4 into bf16 words)."""
    weight = base.weight
    if type(base).__name__ != "Linear4bit" and weight.dtype.is_floating_point and weight.dtype not in (torch.float8_e4m3fn, torch.float8_e5m2):
        return weight.dtype
    return getattr(base, "compute_dtype", None) or torch.float32
