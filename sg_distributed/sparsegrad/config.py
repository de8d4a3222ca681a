"""SparseGradConfig: what to convert, how many entries to train, and how the bases are built.

A ``peft.PeftConfig`` (``peft_type`` SPARSEGRAD, see ``sparsegrad/registration.py``), so peft's
``get_peft_model``, ``PeftModel.from_pretrained`` and TRL's ``SFTTrainer(peft_config=...)`` take it. Validated
on construction so a bad value fails before any model is touched; JSON round trip so the config travels
with saved adapters (``adapter_config.json``).
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from peft import PeftConfig

from .registration import peft_type

LLAMA_TARGETS = ["up_proj", "down_proj"]
# BERT's attention output is also called `output.dense`: a regex keeps only the MLP pair.
BERT_TARGETS = r".*layer\.\d+\.(intermediate|output)\.dense"

BASIS_KINDS = ("hosvd", "identity")
INPUT_CONVENTIONS = ("textbook", "reference")
BASIS_SHARING = ("type", "layer")
SUPPORT_MODES = ("fixed", "reference", "dynamic")
EXCHANGES = ("exact", "sparse")
SCORES = ("abs", "square")
BUDGET_AXES = ("own", "balanced")
BUDGET_BLOCKS = ("scored", "leading")
# The block SparseGradConfig() and launch/train_qa.py use (README, Systems: "The layer at its cost floor, and
# one default"): the same quality as ``scored`` on QA and BBC, 8-19 % faster layers at LLaMA-2-7B shapes.
DEFAULT_BUDGET_BLOCK = "leading"


# The row/column budget of SparseGradConfig() and launch/train_qa.py (README, Systems: "The layer at its cost
# floor, and one default").
DEFAULT_BUDGET = 0.25


@dataclass
class SparseGradConfig(PeftConfig):
    """Configuration of a SparseGrad adapter.

    target_modules: list of module-name suffixes (PEFT style) or one regex matched against full names.
        ``None`` picks Llama-style (``up_proj``, ``down_proj``) or BERT-style MLP names automatically.
    blocks / block_stride: which transformer blocks (index = first integer in the module name) to
        convert: an explicit list, or every ``block_stride``-th block (the paper used every 3rd for LLaMA).
    k / density: trainable entries per matrix: ``k`` when given, else ``round(density * m * n)``.
    basis: ``hosvd`` (bases from calibration) or ``identity`` (no rotation: MeProp-style).
    input_convention: ``textbook`` rotates the input side by Q (HOSVD core ``P^T G Q``); ``reference``
        by Q^T as in the authors' code.
    basis_sharing: ``type`` shares one (P, Q) pair per layer type (paper), ``layer`` fits one per layer.
    max_rows / max_cols: budget on touched rows of P / columns of R (int, or a fraction of m/n when < 1;
        default 0.25, as ``launch/train_qa.py``): the support is chosen inside the top rows x cols block and
        the layer computes in that dense block (``layer._BlockDelta``). ``None`` for both: no budget, the
        support may touch every row and column and the layer takes the CSR kernels, ~2-4x slower (README,
        Systems); re-selection needs a budget.
    budget_axes: what a fractional budget is a fraction of. ``own``: rows of m, columns of n. ``balanced``:
        rows of n and columns of m, the block of the same area whose two token products x R_C (T*n*c) and
        dY P_I (T*m*r) cost the same -- for a wide MLP matrix (m = 2.7 n) a third fewer MACs than ``own``.
    budget_block: which rows x cols block. ``leading`` (default): the leading eigen-directions (the first
        r columns of P, c of R, by descending eigenvalue): the layer reads its bases as contiguous slices
        (no per-use gather) and calibration skips the row/column-sum pass. ``scored``: the rows and columns
        with the largest summed |G~| over calibration (one more pass, gathers at every use). On SmolLM2 the
        scored block shares 67-94 % of its rows and columns with the leading one; quality is the same on
        QA and BBC (README, Systems).
    support_mode: ``fixed`` (support chosen once from calibration; optimizer state only for k values),
        ``reference`` (paper-exact: dense rotated weight, top-k of |G~| at every backward), or
        ``dynamic`` (reference mode made data-parallel: W~ is a buffer, each optimizer step exchanges the
        ranks' rotated gradients and SparseStateAdam keeps moments only for entries ever selected).
    exchange / exchange_oversample: dynamic mode's exchange: ``exact`` (dense all-reduce, then top-k;
        equals one process) or ``sparse`` (local top-k -> all-gather (index, value) -> global top-k ->
        one k-vector all-reduce; approximate choice, exact values).
    reselect_every / reselect_fraction: every N optimizer steps (0 = never) a fixed support drops the
        ``reselect_fraction`` of its entries with the smallest |v| and grows as many entries of its rows x
        cols block with the largest |G~| since the last re-selection (``reselect.py``). Needs a row/column
        budget (the dense-block kernel provides the scores).
    calibration_steps: batches used by ``calibrate`` when the caller does not limit them.
    score: accumulate ``abs`` |G~| or ``square`` G~^2 to rank entries.
    reference_rotated_bias_grad / reference_freeze_layernorm: the authors' quirks, reference mode only.
    modules_to_save: names of further modules trained densely and saved with the adapter (peft's
        ``modules_to_save``: a fresh classification head, embeddings), e.g. ``["classifier"]``.
    base_quantization: set at injection, not by users: ``8bit`` / ``4bit`` when the converted layers' bases are
        bitsandbytes layers, else None. Saved with the adapter, so ``sg_distributed.tools.export`` loads the base as
        it was trained.
    """

    target_modules: list[str] | str | None = None
    blocks: list[int] | None = None
    block_stride: int = 1
    k: int | None = None
    density: float = 0.01
    basis: str = "hosvd"
    input_convention: str = "textbook"
    basis_sharing: str = "type"
    max_rows: float | None = DEFAULT_BUDGET
    max_cols: float | None = DEFAULT_BUDGET
    budget_axes: str = "own"
    budget_block: str = DEFAULT_BUDGET_BLOCK
    support_mode: str = "fixed"
    exchange: str = "exact"
    exchange_oversample: float = 1.0
    reselect_every: int = 0
    reselect_fraction: float = 0.2
    calibration_steps: int = 8
    score: str = "abs"
    reference_rotated_bias_grad: bool = False
    reference_freeze_layernorm: bool = False
    modules_to_save: Optional[list[str]] = None
    base_quantization: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = peft_type()
        if self.k is not None and (isinstance(self.k, bool) or not isinstance(self.k, int) or self.k <= 0):
            raise ValueError(f"SparseGradConfig.k must be a positive integer, got {self.k!r}")
        if not (0.0 < float(self.density) <= 1.0):
            raise ValueError(f"SparseGradConfig.density must be in (0, 1], got {self.density!r}")
        for name, value, valid in (
            ("basis", self.basis, BASIS_KINDS),
            ("input_convention", self.input_convention, INPUT_CONVENTIONS),
            ("basis_sharing", self.basis_sharing, BASIS_SHARING),
            ("support_mode", self.support_mode, SUPPORT_MODES),
            ("exchange", self.exchange, EXCHANGES),
            ("score", self.score, SCORES),
            ("budget_axes", self.budget_axes, BUDGET_AXES),
            ("budget_block", self.budget_block, BUDGET_BLOCKS),
        ):
            if value not in valid:
                raise ValueError(f"SparseGradConfig.{name}={value!r} is not valid; choose one of {list(valid)}")
        if self.block_stride < 1:
            raise ValueError(f"SparseGradConfig.block_stride must be >= 1, got {self.block_stride}")
        for name in ("max_rows", "max_cols"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"SparseGradConfig.{name} must be > 0 (an int, or a fraction < 1), got {value}")
        if (self.k is None and all(isinstance(v, float) and v < 1 for v in (self.max_rows, self.max_cols))
                and self.density > self.max_rows * self.max_cols):
            raise ValueError(f"SparseGradConfig.density={self.density} does not fit in the row/column budget "
                             f"max_rows={self.max_rows} x max_cols={self.max_cols} = {self.max_rows * self.max_cols:g} "
                             f"of each matrix; raise the budget or pass max_rows=None, max_cols=None (no budget)")
        if self.reselect_every < 0:
            raise ValueError(f"SparseGradConfig.reselect_every must be >= 0, got {self.reselect_every}")
        if not 0.0 < float(self.reselect_fraction) <= 1.0:
            raise ValueError(f"SparseGradConfig.reselect_fraction must be in (0, 1], got {self.reselect_fraction!r}")
        if self.reselect_every and self.support_mode != "fixed":
            raise ValueError(f"SparseGradConfig.reselect_every re-selects a fixed support; support_mode="
                             f"{self.support_mode!r} already selects at every step (use reselect_every=0)")
        if self.reselect_every and self.max_rows is None and self.max_cols is None:
            raise ValueError("SparseGradConfig.reselect_every needs a row/column budget (max_rows/max_cols, e.g. "
                             "0.25): growth scores come from the dense-block kernel")
        if self.calibration_steps < 1:
            raise ValueError(f"SparseGradConfig.calibration_steps must be >= 1, got {self.calibration_steps}")

    # --- sizes -------------------------------------------------------------------------------------
    def entries_for(self, m: int, n: int, name: str = "") -> int:
        """Number of trainable entries for an m x n matrix; errors name the layer."""
        k = self.k if self.k is not None else max(1, round(float(self.density) * m * n))
        if k > m * n:
            raise ValueError(f"SparseGradConfig.k={k} exceeds the {m}x{n}={m * n} entries of layer {name!r}")
        return k

    @staticmethod
    def _budget(value: float | None, size: int, fraction_of: int) -> int:
        if value is None:
            return size
        count = int(round(value * fraction_of)) if value < 1 else int(value)
        return max(1, min(size, count))

    def block_budget(self, m: int, n: int) -> tuple[int, int]:
        """(rows of P, columns of R) the support of an m x n matrix may touch (m, n: no budget)."""
        row_of, col_of = (n, m) if self.budget_axes == "balanced" else (m, n)
        return self._budget(self.max_rows, m, row_of), self._budget(self.max_cols, n, col_of)

    # --- serialisation -----------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "SparseGradConfig":
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"SparseGradConfig: unknown keys {unknown}; valid keys are {sorted(known)}")
        return cls(**{k: v for k, v in data.items() if k in known})

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls, text_or_path: str | Path) -> "SparseGradConfig":
        path = Path(text_or_path)
        is_file = not str(text_or_path).lstrip().startswith("{") and path.exists()
        text = path.read_text() if is_file else str(text_or_path)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            where = f"file {path}" if is_file else "JSON text"
            raise ValueError(f"SparseGradConfig: {where} is not valid JSON ({err})") from None
        if not isinstance(data, dict):
            raise ValueError("SparseGradConfig: JSON must be an object of config keys")
        return cls.from_dict(data)
