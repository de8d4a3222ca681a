"""HOSVD bases from streamed Gram matrices.

The HOSVD factor matrices of the stack {G_s} (s over layers of one type and calibration steps) are the
eigenvectors of the mode Grams  sum_s G_s G_s^T  (output side, P) and  sum_s G_s^T G_s  (input side, Q).
Accumulating those Grams needs O(m^2 + n^2) memory instead of the O(S*m*n) stack (half of it: only their
upper triangles are kept, ``UpperGram``), and ranks combine them with one all-reduce.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sg_distributed.distributed.process_group import in_place_collective, is_distributed


@dataclass
class Bases:
    """Orthogonal output-side P (m x m) and input-side R (n x n) with G~ = P^T G R."""

    P: torch.Tensor
    R: torch.Tensor

    def rotate(self, grad: torch.Tensor) -> torch.Tensor:
        return self.P.T.to(grad.dtype) @ grad @ self.R.to(grad.dtype)

    def rotate_factors(self, dy: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """P^T (dY^T X) R computed as (dY P)^T (X R): T(m^2 + n^2 + mn) flops instead of m n (m + n)."""
        return (dy @ self.P.to(dy.dtype)).T @ (x @ self.R.to(x.dtype))


CHUNK = 1024  # rows per step of the in-place symmetrisation and columns per step of the pivot search


def eigenbasis(gram: torch.Tensor, overwrite: bool = False, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Eigenvectors of a symmetric PSD matrix as columns, by descending eigenvalue, with a canonical sign.

    The sign rule (largest-magnitude entry of each vector positive) makes the result identical on every
    rank and across runs, whatever sign LAPACK happens to return.

    ``overwrite=True`` symmetrises a contiguous float64 ``gram`` in place: the caller gives it up (pass it
    without keeping a reference and it is freed as soon as the solver is done with it). Bit-identical to
    ``overwrite=False``: every entry gets 0.5 * (g_ij + g_ji) by the same float64 operations (entries a chunk
    already made symmetric give 0.5 * (s + s) = s exactly), and the flip and sign fix only move and negate
    values. ``dtype``: the result's (float64 by default), rounded once from the float64 solution.

    On the host the solver is LAPACK's dsyevr (MRRR, through scipy) working inside the symmetrised Gram: its
    working set above the Gram is the m x m output and O(m) workspace, and the sign fix, the descending order and
    the transpose to row-major all happen in that output's memory. torch's ``linalg.eigh`` (syevd, the CUDA path
    here) needs the Gram, a copy, and 2 m^2 doubles of workspace: at m = 11008 (LLaMA-2-7B's MLP) that is
    1.94 GB more (docs/cluster.md, "Calibration memory at 7B").
    """
    m = gram.shape[0]
    if overwrite and gram.dtype == torch.float64 and gram.is_contiguous():
        sym = gram
        for start in range(0, m, CHUNK):  # rows and cols [start, stop) become symmetric
            stop = min(start + CHUNK, m)
            part = sym[start:stop].add(sym[:, start:stop].T).mul_(0.5)
            sym[start:stop] = part
            sym[:, start:stop] = part.T
            del part
    else:
        sym = (0.5 * (gram + gram.T)).double().contiguous()
    del gram
    if host_solver_available(sym.device):
        holder = [sym]
        del sym
        return _host_eigenbasis(holder, dtype)
    _, vectors = torch.linalg.eigh(sym)  # column-major
    del sym, _
    pivots = torch.cat([vectors[:, s:s + CHUNK].abs().argmax(dim=0) for s in range(0, m, CHUNK)])
    signs = torch.sign(vectors[pivots, torch.arange(m, device=vectors.device)])
    signs[signs == 0] = 1
    vectors.mul_(signs)
    # descending eigenvalues: columns reversed, written row-major (collectives send raw storage)
    result = torch.empty((m, m), dtype=torch.float64, device=vectors.device)
    torch.index_select(vectors, 1, torch.arange(m - 1, -1, -1, device=vectors.device), out=result)
    del vectors
    return result if dtype in (None, torch.float64) else result.to(dtype)


def host_solver_available(device: torch.device) -> bool:
    """Whether Grams on ``device`` are solved by the host path (dsyevr), which reads one triangle only."""
    return torch.device(device).type == "cpu" and _scipy_eigh() is not None


class UpperGram:
    """A symmetric m x m Gram kept as its upper triangle, in row blocks: block b holds rows [s, s + CHUNK) and
    columns [s, m), about m^2 / 2 values (+ CHUNK m / 2 below the diagonal of the diagonal tiles).

    A mode Gram (G G^T, G^T G) is symmetric, so its upper triangle is the whole of it: accumulating just that
    halves the memory and the flops of the bases pass and the bytes of its all-reduce, and it is exactly what
    LAPACK reads of a symmetric matrix (``uplo``). The host solve copies the blocks into the upper triangle of
    an m x m matrix, whose lower triangle is never written nor read (most of its pages are never touched), and
    the CUDA solve (``full``) mirrors it (docs/cluster.md, "Calibration memory at 7B").
    """

    def __init__(self, size: int, dtype: torch.dtype, device: torch.device):
        self.size = size
        self.blocks = [torch.zeros(min(CHUNK, size - s), size - s, dtype=dtype, device=device)
                       for s in range(0, size, CHUNK)]

    @property
    def shape(self) -> tuple[int, int]:
        return self.size, self.size

    @property
    def device(self) -> torch.device:
        return self.blocks[0].device

    @property
    def dtype(self) -> torch.dtype:
        return self.blocks[0].dtype

    def add_product_(self, left: torch.Tensor, right: torch.Tensor) -> None:
        """+= left @ right, a product known to be symmetric: only its upper row blocks are computed. The product
        is never whole, nor is the float64 copy that ``add_`` makes on the CPU when the Gram is wider than it (at
        7B a whole 11008 x 11008 product is 0.48 GB and its copy 0.97 GB)."""
        for start, block in zip(range(0, self.size, CHUNK), self.blocks):
            block.add_(left[start:start + CHUNK] @ right[:, start:])

    def all_reduce(self) -> None:
        for block in self.blocks:
            in_place_collective(block, dist.all_reduce)

    def _drain(self, release: bool):
        """(start, block) in order; with ``release`` each block is dropped once the caller has copied it."""
        for index, start in enumerate(range(0, self.size, CHUNK)):
            yield start, self.blocks[index]
            if release:
                self.blocks[index] = None

    def full(self, release: bool = False) -> torch.Tensor:
        """The symmetric m x m matrix, the lower triangle mirrored from the upper."""
        m = self.size
        full = torch.empty((m, m), dtype=self.dtype, device=self.device)
        for start, block in self._drain(release):
            stop = start + block.shape[0]
            full[start:stop, start:] = block
            full[stop:, start:stop] = block[:, stop - start:].T
            tile = full[start:stop, start:stop]
            tile.copy_(torch.triu(tile) + torch.triu(tile, 1).T)
        del block, tile  # the loop variables would keep the last block alive through the solve
        return full

    def eigenbasis(self, dtype: torch.dtype | None = None, release: bool = False) -> torch.Tensor:
        """``eigenbasis`` of the Gram; ``release``: give the blocks up as they are copied into the solver's matrix."""
        if not host_solver_available(self.device):
            return eigenbasis(self.full(release), overwrite=True, dtype=dtype)
        upper = torch.empty((self.size, self.size), dtype=torch.float64)  # the lower triangle stays untouched
        for start, block in self._drain(release):
            upper[start:start + block.shape[0], start:] = block
        holder = [upper]
        del block, upper  # no reference here may outlive the solve: the solver's output is reordered without it
        return _host_eigenbasis(holder, dtype)


def _host_eigenbasis(holder: list[torch.Tensor], dtype: torch.dtype | None) -> torch.Tensor:
    """dsyevr on the upper triangle of the matrix in ``holder`` (row-major; destroyed), reordered inside the
    solver's output. The matrix comes in a list that this function empties: an argument passed directly stays
    referenced by the caller's frame until the call returns, and the Gram (0.97 GB at 7B) would then outlive
    its solve, through the reordering and the rounding to ``dtype``."""
    sym = holder.pop()
    rows = _host_eigenvectors_as_rows(sym)  # row j: the eigenvector of the j-th smallest eigenvalue
    del sym
    _fix_signs_(rows)
    _reverse_rows_(rows)  # descending eigenvalues
    transpose_(rows)  # row-major, eigenvectors as columns (collectives send raw storage)
    return rows if dtype in (None, torch.float64) else rows.to(dtype)


def _scipy_eigh():
    try:
        from scipy.linalg import eigh
    except ImportError:  # scipy is pinned in the lock; without it the host falls back to torch's syevd
        return None
    return eigh


def _host_eigenvectors_as_rows(sym: torch.Tensor) -> torch.Tensor:
    """dsyevr on ``sym`` (destroyed: LAPACK works in it). A C-ordered matrix read as Fortran-ordered is its
    transpose, so no copy is made, and LAPACK's lower triangle (scipy's default ``lower=True``) is the C-ordered
    upper triangle: the only part read. The Fortran-ordered output, read as C-ordered, has the eigenvectors as
    rows."""
    eigh = _scipy_eigh()
    _, vectors = eigh(sym.numpy().T, overwrite_a=True, driver="evr", check_finite=False)
    return torch.from_numpy(vectors.T)


def _fix_signs_(rows: torch.Tensor) -> None:
    for start in range(0, rows.shape[0], CHUNK):
        block = rows[start:start + CHUNK]
        pivot = block.abs().argmax(dim=1, keepdim=True)
        signs = torch.sign(block.gather(1, pivot))
        signs[signs == 0] = 1
        block.mul_(signs)


def _reverse_rows_(rows: torch.Tensor) -> None:
    m = rows.shape[0]
    for start in range(0, m // 2, CHUNK):
        stop = min(start + CHUNK, m // 2)
        top = rows[start:stop].clone()
        rows[start:stop] = rows[m - stop:m - start].flip(0)
        rows[m - stop:m - start] = top.flip(0)


def transpose_(square: torch.Tensor) -> None:
    """In-place transpose of a square matrix, tile by tile (one CHUNK x CHUNK tile of extra memory)."""
    m = square.shape[0]
    for i in range(0, m, CHUNK):
        for j in range(i, m, CHUNK):
            upper = square[i:i + CHUNK, j:j + CHUNK].clone()
            if i != j:  # a diagonal tile is its own mirror: only the clone is read
                square[i:i + CHUNK, j:j + CHUNK] = square[j:j + CHUNK, i:i + CHUNK].T
            square[j:j + CHUNK, i:i + CHUNK] = upper.T


class GramAccumulator:
    """Streams the two mode Grams of the gradients seen for each key (a layer type or a layer name).

    Each contribution is computed in the gradient's own precision (at least float32: fast) and added
    to accumulators of ``dtype`` (float64 by default), so the order in which ranks and micro-batches
    are summed cannot change the result beyond float64 rounding.
    """

    def __init__(self, dtype: torch.dtype = torch.float64):
        self.dtype = dtype
        self.out_gram: dict[str, UpperGram] = {}
        self.in_gram: dict[str, UpperGram] = {}
        self.count: dict[str, int] = {}

    def _accumulate(self, key: str, out_factors: tuple[torch.Tensor, torch.Tensor],
                    in_factors: tuple[torch.Tensor, torch.Tensor]) -> None:
        """Add left @ right of each side's factors to its Gram."""
        (out_left, out_right), (in_left, in_right) = out_factors, in_factors
        if key not in self.out_gram:
            self.out_gram[key] = UpperGram(out_left.shape[0], self.dtype, out_left.device)
            self.in_gram[key] = UpperGram(in_left.shape[0], self.dtype, in_left.device)
            self.count[key] = 0
        self.out_gram[key].add_product_(out_left, out_right)
        self.in_gram[key].add_product_(in_left, in_right)
        self.count[key] += 1

    def add(self, key: str, grad: torch.Tensor) -> None:
        g = grad.detach().to(compute_dtype(grad.dtype))
        self._accumulate(key, (g, g.T), (g.T, g))

    def add_factors(self, key: str, dy: torch.Tensor, x: torch.Tensor) -> None:
        """Add G = dY^T X given its factors (T x m, T x n); cheaper than ``add`` when T < min(m, n).

        G G^T = dY^T (X X^T) dY and G^T G = X^T (dY dY^T) X cost T(m^2 + n^2) + 2T^2(m + n) flops
        instead of mn(m + n).
        """
        T, m, n = dy.shape[0], dy.shape[1], x.shape[1]
        dtype = compute_dtype(dy.dtype)
        dy, x = dy.detach().to(dtype), x.detach().to(dtype)
        if T >= min(m, n):
            self.add(key, dy.T @ x)
            return
        self._accumulate(key, (dy.T, (x @ x.T) @ dy), (x.T, (dy @ dy.T) @ x))

    def all_reduce(self) -> None:
        """Sum the Grams over all ranks (no-op without an initialised process group)."""
        if not is_distributed():
            return
        for key in sorted(self.out_gram):  # same order on every rank
            self.out_gram[key].all_reduce()
            self.in_gram[key].all_reduce()

    def bases(self, input_convention: str = "textbook", dtype: torch.dtype | dict[str, torch.dtype] | None = None,
              release: bool = False) -> dict[str, Bases]:
        """P, R for every key. ``reference`` uses R = Q^T, the authors' convention.

        ``dtype`` (one for all keys, or per key; float64 by default): the bases' precision, each rounded once
        from its float64 solution as soon as it is solved. ``release=True`` consumes the accumulator: each
        Gram's blocks are freed as they are copied into its solve's matrix, so the Grams not yet solved, the
        bases solved so far and one solve's working set are all that is alive (same bits as without).

        The Grams are upper triangles (``UpperGram``): at LLaMA-2-7B's MLP the 11008 x 11008 Gram that waits
        while the other is solved holds 0.53 GB instead of 0.97 GB.

        In a process group rank 0 solves the eigenproblems and broadcasts the bases (on the Grams'
        device, so NCCL can carry them): every rank gets rank 0's bits, even where ranks' LAPACK /
        cuSOLVER builds would round differently (mixed GPU kinds), and the others skip the solve.
        """
        distributed = is_distributed()
        # Smallest Grams first (then key, output side before input side: the same order on every rank): while the
        # largest is solved, the fewest other Grams are still waiting (docs/cluster.md, "Calibration memory at 7B").
        jobs = sorted(((grams[key].shape[0], key, side) for key in sorted(self.out_gram)
                       for side, grams in enumerate((self.out_gram, self.in_gram))))
        solving = not distributed or dist.get_rank() == 0
        solved: dict[tuple[str, int], torch.Tensor] = {}
        for _, key, side in jobs:
            grams = (self.out_gram, self.in_gram)[side]
            out_dtype = (dtype.get(key) if isinstance(dtype, dict) else dtype) or torch.float64
            if solving:  # released: popped, so its blocks are freed as the solver's matrix is filled
                basis = (grams.pop(key) if release else grams[key]).eigenbasis(out_dtype, release=release)
            else:
                shape, device = grams[key].shape, grams[key].device
                if release:
                    del grams[key]
                basis = torch.empty(shape, dtype=out_dtype, device=device)
            if distributed:
                in_place_collective(basis, lambda t: dist.broadcast(t, src=0))
            solved[(key, side)] = basis
        result = {}
        for key in sorted({key for _, key, _ in jobs}):
            P, Q = solved.pop((key, 0)), solved.pop((key, 1))
            R = Q if input_convention == "textbook" else Q.T.contiguous()
            result[key] = Bases(P=P, R=R)
        if release:
            self.count.clear()
        return result


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of one contribution: the input's, but never below float32 (bf16 products lose too much)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def identity_bases(m: int, n: int, dtype=torch.float32, device=None) -> Bases:
    return Bases(P=torch.eye(m, dtype=dtype, device=device), R=torch.eye(n, dtype=dtype, device=device))
