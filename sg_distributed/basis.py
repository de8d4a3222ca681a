"""HOSVD bases from streamed Gram matrices.

The HOSVD factor matrices of the stack {G_s} (s over layers of one type and calibration steps) are the
eigenvectors of the mode Grams  sum_s G_s G_s^T  (output side, P) and  sum_s G_s^T G_s  (input side, Q).
Accumulating those Grams needs O(m^2 + n^2) memory instead of the O(S*m*n) stack, and ranks combine
them with one all-reduce.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from .runtime import in_place_collective, is_distributed


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


def eigenbasis(gram: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of a symmetric PSD matrix as columns, by descending eigenvalue, with a canonical sign.

    The sign rule (largest-magnitude entry of each vector positive) makes the result identical on every
    rank and across runs, whatever sign LAPACK happens to return.
    """
    sym = 0.5 * (gram + gram.T)
    _, vectors = torch.linalg.eigh(sym.double())
    vectors = vectors.flip(-1)
    pivots = vectors.abs().argmax(dim=0)
    signs = torch.sign(vectors[pivots, torch.arange(vectors.shape[1])])
    signs[signs == 0] = 1
    return (vectors * signs).contiguous()  # eigh's output is column-major; collectives send raw storage


class GramAccumulator:
    """Streams the two mode Grams of the gradients seen for each key (a layer type or a layer name).

    Each contribution is computed in the gradient's own precision (at least float32: fast) and added
    to accumulators of ``dtype`` (float64 by default), so the order in which ranks and micro-batches
    are summed cannot change the result beyond float64 rounding.
    """

    def __init__(self, dtype: torch.dtype = torch.float64):
        self.dtype = dtype
        self.out_gram: dict[str, torch.Tensor] = {}
        self.in_gram: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}

    def _accumulate(self, key: str, out_part: torch.Tensor, in_part: torch.Tensor) -> None:
        if key not in self.out_gram:
            self.out_gram[key] = torch.zeros(out_part.shape, dtype=self.dtype, device=out_part.device)
            self.in_gram[key] = torch.zeros(in_part.shape, dtype=self.dtype, device=in_part.device)
            self.count[key] = 0
        self.out_gram[key].add_(out_part)
        self.in_gram[key].add_(in_part)
        self.count[key] += 1

    def add(self, key: str, grad: torch.Tensor) -> None:
        g = grad.detach().to(compute_dtype(grad.dtype))
        self._accumulate(key, g @ g.T, g.T @ g)

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
        self._accumulate(key, dy.T @ ((x @ x.T) @ dy), x.T @ ((dy @ dy.T) @ x))

    def all_reduce(self) -> None:
        """Sum the Grams over all ranks (no-op without an initialised process group)."""
        if not is_distributed():
            return
        for key in sorted(self.out_gram):  # same order on every rank
            in_place_collective(self.out_gram[key], dist.all_reduce)
            in_place_collective(self.in_gram[key], dist.all_reduce)

    def bases(self, input_convention: str = "textbook") -> dict[str, Bases]:
        """P, R for every key. ``reference`` uses R = Q^T, the authors' convention.

        In a process group rank 0 solves the eigenproblems and broadcasts the bases (on the Grams'
        device, so NCCL can carry them): every rank gets rank 0's bits, even where ranks' LAPACK /
        cuSOLVER builds would round differently (mixed GPU kinds), and the others skip the solve.
        """
        distributed = is_distributed()
        result = {}
        for key in sorted(self.out_gram):  # same order on every rank
            out_gram, in_gram = self.out_gram[key], self.in_gram[key]
            if not distributed or dist.get_rank() == 0:
                P, Q = eigenbasis(out_gram), eigenbasis(in_gram)
            else:
                P, Q = torch.empty_like(out_gram, dtype=torch.float64), torch.empty_like(in_gram, dtype=torch.float64)
            if distributed:
                in_place_collective(P, lambda t: dist.broadcast(t, src=0))
                in_place_collective(Q, lambda t: dist.broadcast(t, src=0))
            R = Q if input_convention == "textbook" else Q.T.contiguous()
            result[key] = Bases(P=P, R=R)
        return result


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Precision of one contribution: the input's, but never below float32 (bf16 products lose too much)."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def identity_bases(m: int, n: int, dtype=torch.float32, device=None) -> Bases:
    return Bases(P=torch.eye(m, dtype=dtype, device=device), R=torch.eye(n, dtype=dtype, device=device))
