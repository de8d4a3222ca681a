"""Per-GPU memory and bytes per step of every method under DeepSpeed ZeRO-2 / ZeRO-3, before you run.

    python -m sg_distributed.tools.estimate --model llama-2-7b --nodes 2 --gpus-per-node 8 --zero 3 --method all
    python -m sg_distributed.tools.estimate --model smollm2 --nodes 1 --gpus-per-node 2 --zero 2 --dtype fp32
    python -m sg_distributed.tools.estimate --model /path/to/config.json --nodes 1 --gpus-per-node 8 --zero 2 \\
        --method sparsegrad --micro_batch_size 4 --seq 512

The module tree is built on the ``meta`` device (no memory), so targets, shapes and counts are those of
the real model. ``llama-2-7b`` / ``llama-2-13b`` use the paper presets (up/down of every 3rd block,
k = 100,000 / 156,977 per matrix, :mod:`sg_distributed.tools.presets`); ``smollm2`` and ``config.json`` models use
``--density`` (default 1 %) on every block. Row/column budgets ``--max_rows/--max_cols`` default to 0.25
as in ``launch/train_qa.py``. p = nodes x gpus-per-node data-parallel ranks (one flat ring).

How each figure is obtained (b = bytes per value of ``--dtype``; D = trainable values; "targets" = the
converted matrices; every trainable tensor is what the library trains, see README "Methods"):

* weights: every parameter of the model x b; ZeRO-3 divides the *partitioned* ones by p (DeepSpeed
  partitions parameters, not buffers). Parameters of at most ``stage3_param_persistence_threshold`` values
  are persistent (whole on every rank, DeepSpeed's rule is ``numel <= threshold``); the threshold defaults to
  what :func:`~sg_distributed.integrations.deepspeed.resolve_auto` makes of ds_configs/zero3.json's "auto":
  max(10 h, largest k-vector) for ``sparsegrad`` (the k-vectors persist), 10 h otherwise (norms, small LoRA
  factors).
  ``lora`` adds its D adapter values; ``sparsegrad_dynamic`` moves the targets into unpartitioned
  buffers W~ (replicated on every rank even under ZeRO-3).
* bases/buffers: ``sparsegrad`` keeps P (m x m) and R (n x n) once per layer type, in b bytes (the
  layers share them and gather their P_I / R_C slices at each use; their float32 masters, 4 B per value of
  ``bases_numel``, stay on the host and are not counted), plus per converted layer int64 flat
  indices (8 B x k) and the used row/col indices (r = min(max_rows x m, k), c = min(max_cols x n, k): an
  upper bound, the layer keeps the rows/cols its support touches, which is the budget when k >> m, n as in
  the presets); ``sparsegrad_dynamic`` keeps
  P (m x m) and R (n x n) per converted layer (measured: the layers do not share them) plus its
  dense rotated-gradient accumulators (m x n x b
  per target); ``graddrop`` keeps no mask state (each backward draws a target's mask on its device and
  frees it: a transient 5 B per entry of one target, not counted). ``--reselect_every N``
  adds ``sparsegrad``'s float32 r x c growth-score block per layer (same upper bound on r, c).
* gradients: D x b, partitioned by p under ZeRO-2/3 (DeepSpeed reduces in the parameter dtype); the
  reduce bucket (at most ``min(D, h^2)`` values) is added when p > 1.
* optimizer state: AdamW moments, 8 B per trained value, + 4 B fp32 master copy when b < 4, on the
  partition D'/p (D' = D padded to a multiple of 2p, DeepSpeed's alignment). ``sparsegrad_dynamic``
  (``SparseStateAdam``) keeps int64 index + 2 fp32 moments for every entry *ever* selected: shown at its
  minimum (k per matrix, after the first step); it grows with the union of supports, up to m x n.
* activations (rough, not measured by the tests): Korthikanti et al. 2022 per transformer block without
  recomputation, s x B x (34 h + 5 a s) bytes in 16-bit (x2 in fp32), SwiGLU's wider MLP folded in as
  (34 h + 6 (I - 4h)); plus the fp32 logits and their gradient, 8 x s x B x V. Identical for every
  method (the frozen layers still need their inputs for dX); LoRA/SparseGrad's extra per-layer
  activations (s x B x (r or c)) are ignored.
* calibration memory (``calibration_memory``, ``sparsegrad`` and ``sparsegrad_dynamic``; per GPU, above the
  loaded weights, the same on every rank): the peak over the phases of ``calibrate`` (peft model), each
  the sum of what is alive at its own peak (``calibration_phases``; T = micro-batch x seq tokens):

  - bases pass: the float64 mode Grams, kept as upper triangles in row blocks of CHUNK (``UpperGram``:
    8 (m^2 + CHUNK m) / 2 each, two per basis key); the activations above; the inputs ``gradient_tap`` keeps
    from each converted layer's forward to its backward, T x n x b per layer (all alive when the backward
    starts); the largest hook transient of ``add_factors``: its T-side factors 4 (T^2 + T (m + n)) (the dense
    G, 4 m n, when T >= min(m, n)), one row block of a mode product in float32, 4 min(CHUNK, m) m for the
    wider side, and the float64 copy ``add_`` makes of it on the CPU (8 min(CHUNK, m) m: inside the kernel),
    plus the float32 casts of the factors 4 T (m + n) when b < 4.
  - solve (no activations: between passes; ``GramAccumulator.bases(release=True)``), smallest Grams first:
    each is copied into an m x m float64 matrix and solved while the others wait: the Grams not yet solved +
    the bases solved so far + that matrix + ``eigenbasis``'s working set (``eigh_working_set``), then, that
    matrix freed, the float64 eigenvectors and their rounding to the bases' dtype (float32). On the host
    (``solver='evr'``: dsyevr, its output 8 (m^2 + m) and O(m) workspace) only the matrix's upper triangle
    is ever touched, 8 m (m + 1) / 2 resident (with 4 KiB pages; under transparent huge pages 'always' the
    other half would be resident too). With ``solver='syevd'`` (CUDA) the matrix is the mirrored m x m one
    and syevd adds its output and 8 (2 m^2 + 6 m + 1) + 4 (5 m + 3) of workspace (CPU LAPACK's figure, used
    for cuSOLVER too; not measured by the tests: it is allocated inside the kernel).
  - scores pass: the bases, 4 B per value (``sparsegrad``: float32 for bf16/fp16/fp32 models, see
    ``Calibrator.basis_dtypes``; 8 B for ``sparsegrad_dynamic``, which has no scoring);
    row/column sums 8 (m + n) per budgeted layer; 8 m n per layer without a budget; activations; tapped
    inputs; the largest hook transient: 4 (T (m + n) + 2 m n) (rotated gradient and its |.| or square;
    + 4 m n for the float64 copy of an unbudgeted layer's score, + the casts when b < 4).
    With the default leading block (``budget_block='leading'``) budgeted layers need no sums: this pass
    runs only for unbudgeted layers.
  - block pass (under a row/column budget): the bases; the r x c float64 block scores of every budgeted
    layer (r, c: the budget); unbudgeted layers' m x n scores; activations; tapped inputs; the hook
    transient 4 (T (r + c) + 2 r c) + 8 r c, + 4 (m r + n c) for a scored block's gathered P_I, R_C (+ the
    casts when b < 4).

  The fixed layers' float32 masters go to the host at conversion and are not counted. The CLI prints the
  peak as a column and its phase's terms below the table. tests/tools/test_estimate.py compares every phase
  with the live tensor bytes of a real ``calibrate()`` (fp32 tiny Llama), within 10 %, with the
  activations term replaced by the measured peak of plain backward passes and LAPACK's workspace left out.
* bytes per step (per rank, sent, ring estimate as in :mod:`sg_distributed.distributed.comm`): ZeRO-2 = gradient
  all-reduce ``2(p-1)/p x b x D`` + all-gather of the updated partitions ``(p-1)/p x b x D'`` + one fp32
  scalar all-reduce (DeepSpeed's overflow check, 2(p-1)/p x 4). ZeRO-3 = gradient reduce-scatter
  ``(p-1)/p x b x D'`` + parameter all-gathers of every partitioned (non-persistent) weight, frozen ones
  included, in the forward and again in the backward ``2 x (p-1)/p x b x P_partitioned`` + the all-gather
  of the persistent parameters after the step ``(p-1)/p x b x P_persistent`` (DeepSpeed re-gathers them
  all, trained or not) + the scalar. ``sparsegrad_dynamic``
  adds its exchange of the rotated gradients: ``exact`` = dense all-reduce ``2(p-1)/p x b x N_targets``;
  ``sparse`` = all-gather of (int64 index, value) pairs ``(p-1) x k x (8 + b)`` + k-vector all-reduce.
  ``graddrop`` with its kept-only exchange (``--graddrop_exchange kept``, default, as train_qa's ``auto``:
  ZeRO-2 only, ZeRO-3 stays dense where it is not built, and the note says so): the gradient all-reduce
  carries the expected kept entries, ``2(p-1)/p x b x (1 - p_drop) x D`` (``--drop_prob`` p_drop;
  ``--graddrop_granularity element``: K ~ Binomial(D, 1 - p_drop); ``row``: the same expectation in whole
  rows, with a wider spread step to step); the all-gather of updated partitions stays dense
  ``(p-1)/p x b x D`` (Adam's momentum still moves dropped entries, so every updated weight travels).
  The ZeRO-2 figures equal what ``CommCounter`` measures (tests/tools/test_estimate.py); ZeRO-3's parameter
  gathers depend on prefetching/persistence and are an estimate.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any

from sg_distributed.distributed.comm import fmt_bytes
from sg_distributed.sparsegrad.config import DEFAULT_BUDGET, DEFAULT_BUDGET_BLOCK

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
EST_METHODS = ("sparsegrad", "lora", "full", "graddrop", "sparsegrad_dynamic")
GRADDROP_GRANULARITIES = ("element", "row")  # the kept exchange's masks (layer masks: not estimated)

# SmolLM2-135M-Instruct's config.json (HuggingFaceTB), typed in so no asset is needed.
SMOLLM2_CONFIG = dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True,
                      max_position_embeddings=8192, rms_norm_eps=1e-5, rope_theta=100000.0)


def build_meta_model(model: str):
    """(meta-device model, SparseGradConfig overrides from a preset) for a preset name or a config path."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, LlamaConfig

    from sg_distributed.tools.presets import PRESETS

    if model in PRESETS:
        preset = PRESETS[model]
        return preset.build_meta_model(), {"k": preset.k, "block_stride": preset.block_stride,
                                           "target_modules": list(preset.target_modules)}
    if model == "smollm2":
        config = LlamaConfig(**SMOLLM2_CONFIG)
    else:
        path = Path(model)
        if not path.exists():
            raise ValueError(f"--model {model!r}: not a preset (llama-2-7b, llama-2-13b, smollm2) nor an existing "
                             "config.json / model directory")
        config = AutoConfig.from_pretrained(path.parent if path.is_file() else path)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config), {}


def _pad(d: int, p: int) -> int:
    a = 2 * p
    return int(math.ceil(d / a) * a) if d else 0


EIGH_CHUNK = 1024  # sg_distributed.sparsegrad.basis.CHUNK


def quantized_linears(model) -> dict[str, tuple[int, int]]:
    """(out, in) of the linears a bitsandbytes config quantises: every nn.Linear but the output head."""
    from torch import nn

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: (module.out_features, module.in_features) for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and module is not head}


def quantized_weight_bytes(out_features: int, in_features: int, quant: str, shards: int = 1) -> float:
    """Bytes of one bitsandbytes weight: int8 codes + a float32 scale per row (8bit); nf4 codes packed two per
    byte + a float32 absmax per block of 64 values and the 16-entry code table (4bit, no double quantisation:
    transformers' default). ``shards``: the packed codes split over that many ranks, the scales whole."""
    n = out_features * in_features
    if quant == "8bit":
        return n / shards + 4 * out_features
    return n / 2 / shards + 4 * math.ceil(n / 64) + 4 * 16


def upper_gram_bytes(m: int) -> int:
    """Bytes of a float64 ``UpperGram``: rows [s, s + CHUNK) x columns [s, m) per row block."""
    return 8 * sum(min(EIGH_CHUNK, m - s) * (m - s) for s in range(0, m, EIGH_CHUNK))


def eigh_working_set(m: int, solver: str = "evr") -> dict[str, int]:
    """Bytes ``basis.eigenbasis(gram, overwrite=True)`` holds above its m x m float64 Gram, at its peak.

    ``evr`` (the host: LAPACK dsyevr through scipy, working inside the Gram): its output + eigenvalues and an
    O(m) workspace (26 m doubles, 10 m ints); the reordering happens inside the output. ``syevd`` (CUDA:
    ``torch.linalg.eigh``): the solver's copy + eigenvalues, and syevd's workspace (2 m^2 + 6 m + 1 doubles,
    5 m + 3 ints; allocated inside the kernel). The chunked temporaries (CHUNK x m) never meet the solve."""
    if solver == "evr":
        return {"eigh output": 8 * (m * m + m), "eigh workspace (LAPACK syevr)": 8 * 26 * m + 4 * 10 * m}
    if solver == "syevd":
        return {"eigh output": 8 * (m * m + m),
                "eigh workspace (LAPACK syevd)": 8 * (2 * m * m + 6 * m + 1) + 4 * (5 * m + 3)}
    raise ValueError(f"solver must be 'evr' (host) or 'syevd' (CUDA), got {solver!r}")


def calibration_phases(shapes: dict[str, tuple[int, int]], keys: dict[str, str], budgets: dict[str, tuple[int, int]],
                       *, b: int, tokens: int, activations: float, basis_bytes: int = 4,
                       score: bool = True, leading: bool = True, solver: str = "evr") -> dict[str, dict[str, float]]:
    """Bytes alive at the peak of each phase of ``calibrate`` (peft model) (see the module docstring).

    ``shapes``: (m, n) per converted layer; ``keys``: its basis key; ``budgets``: its (rows, cols) budget;
    ``tokens``: micro-batch x sequence; ``basis_bytes``: 4 when the bases are kept in float32 (fixed mode
    with float32 masters), 8 otherwise; ``score=False``: no support passes (reference / dynamic modes);
    ``leading``: budgeted layers compute in their leading block (no row/column-sum pass, bases sliced as views).
    """
    types: dict[str, tuple[int, int]] = {}
    for name, (m, n) in shapes.items():
        types[keys[name]] = (m, n)
    T = tokens
    cast = 4 if b < 4 else 0  # bf16 / fp16 factors are cast to float32 for every product
    tap = sum(T * n * b for m, n in shapes.values())  # gradient_tap keeps every layer's X until its backward
    grams = sum(upper_gram_bytes(m) + upper_gram_bytes(n) for m, n in types.values())

    def gram_hook(m, n):  # GramAccumulator.add_factors: the T-side factors (or the dense G), and one row block
        # of a mode product (float32, up to CHUNK x m) with the float64 copy add_ makes of it on the CPU
        block = max(min(EIGH_CHUNK, side) * side for side in (m, n))
        factors = 4 * m * n if T >= min(m, n) else 4 * (T * T + T * (m + n))
        return {"hook transient": factors + 4 * block + cast * T * (m + n), "hook float64 copy (inside add_)": 8 * block}

    phases: dict[str, dict[str, float]] = {}
    hook = max((gram_hook(m, n) for m, n in shapes.values()), key=lambda terms: sum(terms.values()))
    phases["bases pass"] = {"grams": grams, "activations": activations, "tap inputs": tap, **hook}
    # solve (GramAccumulator.bases): smallest first, each Gram copied into an m x m matrix (its blocks freed as they
    # are copied) and solved while the others wait; the solved bases are kept. On the host (evr) only the upper
    # triangle of that matrix is ever touched; syevd (CUDA) gets the mirrored full matrix.
    remaining, solved, solve_peak = grams, 0, {}
    for side in sorted(side for key in sorted(types) for side in types[key]):
        remaining -= upper_gram_bytes(side)
        matrix = 8 * (side * (side + 1) // 2) if solver == "evr" else 8 * side * side
        during = {"grams": remaining, "bases": solved, "solved gram": matrix, **eigh_working_set(side, solver)}
        # then, the Gram freed: the float64 eigenvectors and their rounding to the bases' dtype
        rounding = {"grams": remaining, "bases": solved, "eigh output": 8 * (side * side + side),
                    "rounded basis": basis_bytes * side * side if basis_bytes != 8 else 0}
        for alive in (during, rounding):
            if sum(alive.values()) > sum(solve_peak.values()):
                solve_peak = alive
        solved += basis_bytes * side * side
    phases["solve"] = solve_peak
    bases = solved
    if not score:
        return phases
    budgeted = {name for name, (m, n) in shapes.items() if budgets[name] != (m, n)}
    full = sum(8 * m * n for name, (m, n) in shapes.items() if name not in budgeted)

    def score_hook(name):  # (dY P)^T (X R), its |.|, and for an unbudgeted layer its float64 copy
        (m, n) = shapes[name]
        value = 4 * (T * (m + n) + 2 * m * n) + cast * T * (m + n)
        return value + (8 * m * n - 4 * m * n if name not in budgeted else 0)

    def block_hook(name):  # P_I, R_C (gathered unless leading), the sliced factors, the r x c product, |.|, float64
        (m, n), (r, c) = shapes[name], budgets[name]
        slices = 0 if leading else 4 * (m * r + n * c)
        return slices + 4 * (T * (r + c) + 2 * r * c) + 8 * r * c + cast * T * (m + n)

    summed = set() if leading else budgeted  # layers whose block comes from a row/column-sum pass
    if summed or len(budgeted) < len(shapes):
        phases["scores pass"] = {"bases": bases, "row/col sums": sum(8 * (m + n) for name, (m, n) in shapes.items()
                                                                     if name in summed),
                                 "full scores": full, "activations": activations, "tap inputs": tap,
                                 "hook transient": max(score_hook(name) for name in shapes
                                                       if name in summed or name not in budgeted)}
    if budgeted:
        phases["block pass"] = {"bases": bases, "block scores": sum(8 * budgets[name][0] * budgets[name][1]
                                                                    for name in budgeted),
                                "full scores": full, "activations": activations, "tap inputs": tap,
                                "hook transient": max(block_hook(name) for name in budgeted)}
    return phases


def estimate(model, method: str, *, p: int = 1, zero: int = 2, dtype: str = "bf16", density: float = 0.01,
             k: int | None = None, block_stride: int = 1, target_modules=None, max_rows: float | None = DEFAULT_BUDGET,
             max_cols: float | None = DEFAULT_BUDGET, micro_batch_size: int = 1, seq: int = 512, exchange: str = "exact",
             lora_rank: int | None = None, include_norms: bool = True,
             reduce_bucket_size: int | None = None, reselect_every: int = 0,
             persistence_threshold: int | None = None, budget_block: str = DEFAULT_BUDGET_BLOCK,
             drop_prob: float = 0.5, graddrop_exchange: str = "kept",
             graddrop_granularity: str = "element", solver: str = "evr", base_quant: str | None = None,
             shard_quantized: bool = False) -> dict[str, Any]:
    """Every figure of one (method, p, zero, dtype) as a dict of bytes (see the module docstring).

    ``base_quant`` ("8bit" / "4bit"): the frozen linears bitsandbytes quantises (every nn.Linear but the output
    head, as transformers does) weigh ``quantized_weight_bytes`` each instead of b per value, whole on every rank;
    ``shard_quantized``: their packed words are split over the p ranks (FSDP2 with a bf16-stored 4-bit base,
    ``integrations.fsdp``), their scales stay whole."""
    from torch import nn

    from sg_distributed.sparsegrad.config import SparseGradConfig
    from sg_distributed.training.methods import matched_lora_rank
    from sg_distributed.sparsegrad.calibration import assign_basis_keys
    from sg_distributed.sparsegrad.targets import find_target_linears, layer_type

    if method not in EST_METHODS:
        raise ValueError(f"method must be one of {EST_METHODS}, got {method!r}")
    if zero not in (2, 3):
        raise ValueError(f"zero must be 2 or 3, got {zero!r}")
    if p < 1:
        raise ValueError(f"the number of ranks must be >= 1, got {p}")
    if not 0.0 <= drop_prob < 1.0:
        raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob!r}")
    if graddrop_exchange not in ("kept", "dense"):
        raise ValueError(f"graddrop_exchange must be 'kept' or 'dense', got {graddrop_exchange!r}")
    if graddrop_granularity not in GRADDROP_GRANULARITIES:
        raise ValueError(f"graddrop_granularity must be one of {', '.join(GRADDROP_GRANULARITIES)}, "
                         f"got {graddrop_granularity!r}")
    b = DTYPE_BYTES[dtype]
    cfg = SparseGradConfig(density=density, k=k, block_stride=block_stride, target_modules=target_modules,
                           max_rows=max_rows, max_cols=max_cols, budget_block=budget_block)
    targets = find_target_linears(model, cfg.target_modules, cfg.blocks, cfg.block_stride)
    shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
    ks = {n: cfg.entries_for(o, i, n) for n, (o, i) in shapes.items()}
    N_t = sum(o * i for o, i in shapes.values())
    K = sum(ks.values())
    n_params = sum(q.numel() for q in model.parameters())
    norm_numel = sum(q.numel() for mod in model.modules() if "Norm" in type(mod).__name__
                     for q in mod.parameters(recurse=False))
    mcfg = model.config
    h, L, V = mcfg.hidden_size, mcfg.num_hidden_layers, mcfg.vocab_size
    a = mcfg.num_attention_heads
    inter = getattr(mcfg, "intermediate_size", 4 * h)

    if base_quant not in (None, "8bit", "4bit"):
        raise ValueError(f"base_quant must be None, '8bit' or '4bit', got {base_quant!r}")
    quantized = quantized_linears(model) if base_quant else {}
    quantized_bytes = sum(quantized_weight_bytes(o, i, base_quant, p if shard_quantized else 1)
                          for o, i in quantized.values())
    quantized_ids = {id(model.get_submodule(name).weight) for name in quantized}
    # ZeRO-3 decides persistence per tensor; quantised weights are counted apart
    tensor_numels = [q.numel() for q in model.parameters() if id(q) not in quantized_ids]
    buffers = 0
    extra_state_note = ""
    rank_used = None
    score_block = 0  # sum of r x c over layers: re-selection's float32 score blocks
    bases_numel = 0  # values of the shared bases (sparsegrad): b bytes each per device, + a float32 master on the host
    if method == "sparsegrad":
        D = K
        shared: dict[tuple, int] = {}  # P, R of each layer type (and shape), shared by its layers
        for n, (o, i) in shapes.items():
            # the layer keeps the rows/cols its support touches: at most the budget and at most k
            r, c = (min(side, ks[n]) for side in cfg.block_budget(o, i))
            shared[layer_type(n), o, i] = o * o + i * i
            buffers += 8 * ks[n] + 8 * (r + c)
            score_block += r * c
        bases_numel = sum(shared.values())
        buffers += b * bases_numel
        if reselect_every:
            buffers += 4 * score_block
        tensor_numels += list(ks.values())
    elif method == "lora":
        rank_used = lora_rank or matched_lora_rank(model, cfg)
        D = rank_used * sum(o + i for o, i in shapes.values())
        tensor_numels += [rank_used * n for o, i in shapes.values() for n in (i, o)]  # A: r x in, B: out x r
    elif method in ("full", "graddrop"):
        D = N_t  # graddrop: no persistent mask buffers (drawn per backward, see the module docstring)
    else:  # sparsegrad_dynamic
        D = norm_numel if include_norms else 0
        target_ids = {id(m.weight) for m in targets.values()}  # W~ are buffers, replicated
        tensor_numels = [q.numel() for q in model.parameters() if id(q) not in target_ids]
        buffers += b * N_t  # W~
        buffers += b * sum(o * o + i * i for o, i in shapes.values())  # P, R: each layer holds its own copy
        buffers += b * N_t  # rotated-gradient accumulators
        extra_state_note = "SparseStateAdam: minimum (k entries per matrix), grows with the union of supports"
    if persistence_threshold is None:  # resolve_auto's rule for a "auto" threshold
        persistence_threshold = max(10 * h, max(ks.values(), default=0) if method == "sparsegrad" else 0)
    persistent = sum(n for n in tensor_numels if n <= persistence_threshold) if zero == 3 else 0
    partitioned = sum(tensor_numels) - persistent  # parameters DeepSpeed ZeRO-3 would partition
    Dp = _pad(D, p) if p > 1 else D
    weights = b * (partitioned / p + persistent if zero == 3 else partitioned)  # dynamic: W~ are in buffers
    weights += quantized_bytes
    bucket = min(D, reduce_bucket_size if reduce_bucket_size is not None else h * h) * b if p > 1 else 0
    grads = b * Dp / p + bucket
    per_entry = 8 + (4 if b < 4 else 0)
    optimizer = per_entry * Dp / p
    if method == "sparsegrad_dynamic":
        optimizer += 16 * K  # int64 index + fp32 exp_avg + exp_avg_sq, minimum
    act_block = seq * micro_batch_size * (34 * h + 6 * max(0, inter - 4 * h) + 5 * a * seq) * (b / 2)
    activations = L * act_block + 8 * seq * micro_batch_size * V

    calibration = None
    if method in ("sparsegrad", "sparsegrad_dynamic"):
        keys = assign_basis_keys(targets, cfg.basis_sharing)  # what calibration solves: one basis per key
        budgets = {n: cfg.block_budget(o, i) for n, (o, i) in shapes.items()}
        calibration = calibration_phases(shapes, keys, budgets, b=b, tokens=micro_batch_size * seq, solver=solver,
                                         activations=activations, basis_bytes=4 if method == "sparsegrad" else 8,
                                         score=method == "sparsegrad", leading=cfg.budget_block == "leading")
    calibration_peak = max(calibration, key=lambda ph: sum(calibration[ph].values())) if calibration else None

    ring_ar = lambda n_bytes: 2 * (p - 1) / p * n_bytes
    ring_ag = lambda n_bytes: (p - 1) / p * n_bytes
    comm: dict[str, float] = {}
    kept_only = method == "graddrop" and graddrop_exchange == "kept" and zero == 2  # not built for ZeRO-3
    if kept_only:  # only the expected (1 - p) D kept entries travel; Adam still moves dropped ones: dense all-gather
        kept_unit = "entries" if graddrop_granularity == "element" else "rows"  # same expectation, in whole rows
        comm[f"grad all-reduce (kept {kept_unit}, (1-p) D, p = {drop_prob:g})"] = ring_ar(b * (1 - drop_prob) * D)
        comm["all-gather updated partitions"] = ring_ag(b * Dp)
    elif zero == 2:
        comm["grad all-reduce"] = ring_ar(b * D)
        comm["all-gather updated partitions"] = ring_ag(b * Dp)
    else:
        comm["grad reduce-scatter"] = ring_ag(b * Dp)
        comm["param all-gather (fwd + bwd)"] = 2 * ring_ag(b * partitioned)
        comm["persistent param all-gather (after step)"] = ring_ag(b * persistent)
    comm["scalar all-reduce"] = ring_ar(4)
    if method == "sparsegrad" and reselect_every:
        comm[f"re-selection scores (every {reselect_every} steps, amortised)"] = ring_ar(4 * score_block) / reselect_every
    if method == "sparsegrad_dynamic":
        if exchange == "exact":
            comm["rotated-grad all-reduce (exact)"] = ring_ar(b * N_t)
        else:
            comm["sparse all-gather (int64, value)"] = (p - 1) * K * (8 + b)
            comm["k-vector all-reduce"] = ring_ar(b * K)
    if method == "graddrop" and graddrop_exchange == "kept" and zero == 3:
        extra_state_note = ((extra_state_note + " ") if extra_state_note else "") + (
            "graddrop: ZeRO-3 reduces the dense gradient (the kept-only exchange is built for DDP, ZeRO-2, FSDP2).")
    elif kept_only:
        extra_state_note = ((extra_state_note + " ") if extra_state_note else "") + (
            f"graddrop: kept-only exchange ({graddrop_granularity} masks, p = {drop_prob:g}), the expected "
            "(1-p) D kept values per step; ZeRO-3 would reduce the dense gradient (not built there).")
    total_mem = weights + buffers + grads + optimizer + activations
    return {"method": method, "p": p, "zero": zero, "dtype": dtype, "matrices": len(shapes), "N_targets": N_t,
            "k_total": K, "trainable": D, "trainable_padded": Dp, "lora_rank": rank_used, "model_params": n_params,
            "weights": weights, "buffers": buffers, "gradients": grads, "optimizer": optimizer,
            "bases_numel": bases_numel,
            "activations": activations, "total_memory": total_mem, "comm": comm,
            "comm_total": sum(comm.values()), "note": extra_state_note,
            "persistence_threshold": persistence_threshold if zero == 3 else None, "persistent": persistent,
            "micro_batch_size": micro_batch_size, "seq": seq,
            "calibration_memory": sum(calibration[calibration_peak].values()) if calibration else None,
            "calibration_peak_phase": calibration_peak, "calibration_phases": calibration}


def format_table(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| method | trainable | weights | bases/buffers | gradients | optimizer state | activations (est.) | "
             "total / GPU | calibration / GPU | bytes / step / rank | of which |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        tr = f"{r['trainable']:,}" + (f" (r={r['lora_rank']})" if r["lora_rank"] else "")
        parts = "; ".join(f"{k} {fmt_bytes(v)}" for k, v in r["comm"].items() if v)
        calib = fmt_bytes(r["calibration_memory"]) if r["calibration_memory"] is not None else "-"
        lines.append(f"| {r['method']} | {tr} | {fmt_bytes(r['weights'])} | {fmt_bytes(r['buffers'])} | "
                     f"{fmt_bytes(r['gradients'])} | {fmt_bytes(r['optimizer'])} | {fmt_bytes(r['activations'])} | "
                     f"{fmt_bytes(r['total_memory'])} | {calib} | {fmt_bytes(r['comm_total'])} | {parts} |")
    notes = sorted({r["note"] for r in rows if r["note"]})
    lines += ["", "Units: 1 GB = 1e9 B. Ring estimate of bytes sent per rank (sg_distributed.distributed.comm). "
              "Activations: rough (module docstring)."] + notes
    for r in rows:
        if r["calibration_phases"]:
            phase = r["calibration_phases"][r["calibration_peak_phase"]]
            lines.append(f"{r['method']} calibration peak ({r['calibration_peak_phase']}, above the weights): "
                         + "; ".join(f"{k} {fmt_bytes(v)}" for k, v in phase.items() if v))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sg_distributed.tools.estimate", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True, help="llama-2-7b | llama-2-13b | smollm2 | path to config.json")
    ap.add_argument("--nodes", type=int, default=1)
    ap.add_argument("--gpus-per-node", "--gpus_per_node", dest="gpus_per_node", type=int, default=8)
    ap.add_argument("--zero", type=int, choices=[2, 3], default=2)
    ap.add_argument("--method", default="all", help=f"one of {', '.join(EST_METHODS)} or 'all'")
    ap.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16")
    ap.add_argument("--micro_batch_size", "--micro-batch-size", type=int, default=1)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--density", type=float, default=0.01)
    ap.add_argument("--k", type=int, default=None)
    ap.add_argument("--block_stride", type=int, default=None)
    ap.add_argument("--max_rows", type=float, default=DEFAULT_BUDGET, help="0 = no budget")
    ap.add_argument("--max_cols", type=float, default=DEFAULT_BUDGET, help="0 = no budget")
    ap.add_argument("--exchange", choices=["exact", "sparse"], default="sparse", help="sparsegrad_dynamic's exchange")
    ap.add_argument("--lora_rank", type=int, default=None)
    ap.add_argument("--reselect_every", type=int, default=0, help="sparsegrad: support re-selection every N steps")
    ap.add_argument("--drop_prob", type=float, default=0.5, help="graddrop: the drop probability p")
    ap.add_argument("--graddrop_exchange", choices=["kept", "dense"], default="kept",
                    help="graddrop: only the kept entries travel (ZeRO-2) or the dense, zero-filled gradient")
    ap.add_argument("--graddrop_granularity", choices=GRADDROP_GRANULARITIES, default="element",
                    help="graddrop: element or whole-row masks (same expected kept fraction 1 - p)")
    ap.add_argument("--solver", choices=["evr", "syevd"], default="evr",
                    help="calibration's eigensolver: evr where the Grams live on the host (the library's CPU path), "
                         "syevd where they live on a GPU (torch.linalg.eigh / cuSOLVER: +2 m^2 doubles of workspace)")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1:
        ap.error("--nodes and --gpus-per-node must be >= 1")
    if not 0.0 <= args.drop_prob < 1.0:
        ap.error(f"--drop_prob must be in [0, 1), got {args.drop_prob}")
    methods = EST_METHODS if args.method == "all" else [args.method]
    for m in methods:
        if m not in EST_METHODS:
            ap.error(f"--method must be one of {', '.join(EST_METHODS)} or all")
    model, over = build_meta_model(args.model)
    kw = dict(density=args.density, k=args.k if args.k is not None else over.get("k"),
              block_stride=args.block_stride or over.get("block_stride", 1), target_modules=over.get("target_modules"),
              max_rows=args.max_rows or None, max_cols=args.max_cols or None)
    p = args.nodes * args.gpus_per_node
    rows = [estimate(model, m, p=p, zero=args.zero, dtype=args.dtype, micro_batch_size=args.micro_batch_size,
                     seq=args.seq, exchange=args.exchange, lora_rank=args.lora_rank, reselect_every=args.reselect_every,
                     drop_prob=args.drop_prob, graddrop_exchange=args.graddrop_exchange,
                     graddrop_granularity=args.graddrop_granularity, solver=args.solver, **kw) for m in methods]
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        header = (f"## {args.model}: {args.nodes} node(s) x {args.gpus_per_node} GPU(s) = {p} ranks, ZeRO-{args.zero}, "
                  f"{args.dtype}, micro-batch {args.micro_batch_size} x {args.seq} tokens; {rows[0]['matrices']} "
                  f"converted matrices, {rows[0]['N_targets']:,} target values, sum k = {rows[0]['k_total']:,}")
        print(format_table(rows, header))
    return 0


if __name__ == "__main__":
    sys.exit(main())
