"""Choosing the support: which k entries of the rotated m x n weight are trained."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Support:
    """k index pairs (rows[i], cols[i]) of the rotated matrix: row-major (CSR order) when selected, slot order
    (entry i holds value i) once re-selection has replaced entries."""

    rows: torch.Tensor  # int64 (k,)
    cols: torch.Tensor  # int64 (k,)
    shape: tuple[int, int]
    # Under a row/column budget: the sorted rows and cols the support was chosen in (exactly the budget),
    # so every layer of a type computes with one block shape; None: the rows and cols the support touches.
    block: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def k(self) -> int:
        return int(self.rows.numel())

    def flat(self) -> torch.Tensor:
        return self.rows * self.shape[1] + self.cols

    @classmethod
    def from_flat(cls, flat: torch.Tensor, shape: tuple[int, int], sort: bool = True) -> "Support":
        """``sort=False`` keeps the given (slot) order: a re-selected support pairs slots with values."""
        flat = flat.to(torch.int64)
        if sort:
            flat = torch.sort(flat).values
        return cls(rows=flat // shape[1], cols=flat % shape[1], shape=tuple(shape))


def select_support(score: torch.Tensor, k: int, max_rows: int | None = None, max_cols: int | None = None) -> Support:
    """Top-k entries of ``score`` (m x n, non-negative), optionally inside the best rows x cols block.

    With a budget, rows and columns are ranked by their total score first, so the support touches at
    most ``max_rows`` columns of P and ``max_cols`` columns of R; that rows x cols block is returned as
    ``Support.block``. Ties break by index (deterministic). Calibration does the same in two passes without
    an m x n score (``choose_block`` on row/column sums, then ``top_k_in_block`` on the block's scores).
    """
    m, n = score.shape
    if k > m * n:
        raise ValueError(f"k={k} exceeds the {m}x{n} entries of the matrix")
    rows, cols = choose_block(score.sum(1), score.sum(0), max_rows, max_cols)
    block = score if (rows.numel(), cols.numel()) == (m, n) else score[rows][:, cols]  # no m x n copy unbudgeted
    return top_k_in_block(block, k, rows, cols, (m, n))


def choose_block(row_score: torch.Tensor, col_score: torch.Tensor, max_rows: int | None,
                 max_cols: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``max_rows`` rows and ``max_cols`` columns with the largest total score, sorted (all when None)."""
    def best(total, budget):
        size = total.numel()
        if budget is None or budget >= size:
            return torch.arange(size, device=total.device)
        return torch.sort(torch.topk(total, budget).indices).values

    return best(row_score, max_rows), best(col_score, max_cols)


def leading_block(rows: int, cols: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``rows`` rows and ``cols`` columns: the leading eigen-directions of bases sorted by descending
    eigenvalue (``SparseGradConfig.budget_block='leading'``)."""
    return torch.arange(rows, device=device), torch.arange(cols, device=device)


def top_k_in_block(block: torch.Tensor, k: int, rows: torch.Tensor, cols: torch.Tensor,
                   shape: tuple[int, int]) -> Support:
    """Top-k entries of the rows x cols ``block`` of scores, as a support of the m x n ``shape``."""
    m, n = shape
    if k > block.numel():
        raise ValueError(
            f"k={k} does not fit in the row/column budget {block.shape[0]}x{block.shape[1]}={block.numel()}; "
            "raise max_rows/max_cols or lower k/density"
        )
    top = torch.topk(block.reshape(-1).float(), k).indices
    local_r, local_c = top // block.shape[1], top % block.shape[1]
    support = Support.from_flat(rows[local_r] * n + cols[local_c], (m, n))
    support.block = (rows, cols) if (rows.numel() < m or cols.numel() < n) else None
    return support
