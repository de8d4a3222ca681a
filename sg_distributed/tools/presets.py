"""LLaMA-2-7B / 13B presets as the SparseGrad paper ran them, and their analytic costs.

The paper (Chekalina et al., EMNLP 2024) fine-tunes LLaMA-2 with SparseGrad on the MLP pair
(``up_proj``, ``down_proj``) of every 3rd transformer block, k = 100,000 trainable entries per
11008x4096 matrix (0.2218 %, printed "0.22 %" in DESIGN §2). For 13B the same *fraction* is kept:
k = round(100,000 * 13824*5120 / (11008*4096)) = 156,977 per 13824x5120 matrix.

The model configs below are the public ``config.json`` values of ``meta-llama/Llama-2-7b-hf`` and
``meta-llama/Llama-2-13b-hf``, typed in (nothing is downloaded). ``Preset.build_meta_model()`` builds the
real module tree on the ``meta`` device (no memory, well under a second), so target selection runs on
the true layer names and shapes::

    python -m sg_distributed.tools.presets --model llama-2-7b --ranks 8 64 --dtype bf16

prints converted matrices, trainable parameters, optimizer-state and adapter bytes, and bytes on the
wire per step (the formulas of :mod:`sg_distributed.distributed.comm`) as markdown tables.

Conventions (also printed under the tables)
-------------------------------------------
* Optimizer state, per trained entry: Adam(W)'s two fp32 moments, 8 B; with ``--dtype bf16`` also the
  fp32 master copy that mixed-precision engines keep (DeepSpeed bf16 / ZeRO, FSDP MixedPrecision): 12 B.
  ``fp32``: 8 B (the parameter is its own master). Dense AdamW of the same layers: the same per-entry
  cost on all N entries. Totals over all ranks (ZeRO-1/2/3 divide them by p).
* Adapter (peft's ``save_pretrained``): values fp32 in any ``--dtype`` (the trained k-vectors stay fp32 in a
  bf16 model); flat indices as int32 (every matrix has < 2**31 entries); bases P (m x m) and R (n x n) once per
  layer type, as their fp32 masters.
* Wire bytes: sent per rank per step by a ring collective, decimal units (1 GB = 1e9 B), values in
  ``--dtype``, int32 flat indices for the sparse exchange (DESIGN §2's cost check).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Any

from sg_distributed.distributed.comm import (
    dense_allreduce_bytes, fmt_bytes, kvector_allreduce_bytes, sparse_allgather_bytes, sparse_breakeven_density)
from sg_distributed.sparsegrad.config import LLAMA_TARGETS, SparseGradConfig

DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}

# Public config.json of meta-llama/Llama-2-7b-hf (typed in; no hub access).
LLAMA_2_7B_CONFIG: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 11008,
    "max_position_embeddings": 4096,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 32,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": None,
    "tie_word_embeddings": False,
    "torch_dtype": "float16",
    "vocab_size": 32000,
}

# Public config.json of meta-llama/Llama-2-13b-hf: same as 7B but wider and deeper.
LLAMA_2_13B_CONFIG: dict[str, Any] = {
    **LLAMA_2_7B_CONFIG,
    "hidden_size": 5120,
    "intermediate_size": 13824,
    "num_attention_heads": 40,
    "num_hidden_layers": 40,
    "num_key_value_heads": 40,
}

K_7B = 100_000  # the paper's budget per 11008x4096 matrix
PAPER_DENSITY = K_7B / (11008 * 4096)  # 0.2218 %
K_13B = round(PAPER_DENSITY * 13824 * 5120)  # 156,977: same fraction of a 13824x5120 matrix


@dataclass(frozen=True)
class Preset:
    name: str
    hf_id: str  # for documentation only: nothing is downloaded
    model_config: dict[str, Any]
    k: int
    block_stride: int = 3
    target_modules: list[str] = field(default_factory=lambda: list(LLAMA_TARGETS))

    def llama_config(self):
        from transformers import LlamaConfig

        cfg = {k: v for k, v in self.model_config.items() if k not in ("architectures", "model_type", "torch_dtype")}
        return LlamaConfig(**cfg)

    def build_meta_model(self):
        """The real ``LlamaForCausalLM`` module tree on the ``meta`` device (shapes only, no storage)."""
        import torch
        from transformers import LlamaForCausalLM

        with torch.device("meta"):
            return LlamaForCausalLM(self.llama_config())

    def sparsegrad_config(self, **overrides) -> SparseGradConfig:
        return SparseGradConfig(**{"target_modules": list(self.target_modules), "block_stride": self.block_stride,
                                   "k": self.k, **overrides})

    def train_args(self) -> list[str]:
        """The ``launch/train_qa.py`` flags that select this preset's layers and budget."""
        return ["--block_stride", str(self.block_stride), "--k", str(self.k)]


PRESETS: dict[str, Preset] = {
    "llama-2-7b": Preset("llama-2-7b", "meta-llama/Llama-2-7b-hf", LLAMA_2_7B_CONFIG, K_7B),
    "llama-2-13b": Preset("llama-2-13b", "meta-llama/Llama-2-13b-hf", LLAMA_2_13B_CONFIG, K_13B),
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}") from None


def cost_report(preset: Preset | str, ranks=(8, 64), dtype: str = "bf16", k: int | None = None,
                block_stride: int | None = None, model=None) -> dict[str, Any]:
    """All numbers of the preset's tables, computed on the real (meta-device) module tree."""
    from sg_distributed.training.methods import matched_lora_rank
    from sg_distributed.sparsegrad.targets import block_index, find_target_linears, layer_type

    preset = get_preset(preset) if isinstance(preset, str) else preset
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {dtype!r}")
    b = DTYPE_BYTES[dtype]
    overrides = {}
    if k is not None:
        overrides["k"] = k
    if block_stride is not None:
        overrides["block_stride"] = block_stride
    config = preset.sparsegrad_config(**overrides)
    model = model if model is not None else preset.build_meta_model()
    targets = find_target_linears(model, config.target_modules, config.blocks, config.block_stride)

    shapes = {n: (m.out_features, m.in_features) for n, m in targets.items()}
    ks = {n: config.entries_for(o, i, n) for n, (o, i) in shapes.items()}
    types: dict[str, tuple[int, int]] = {}
    for n, shape in shapes.items():
        types.setdefault(layer_type(n), shape)
    blocks = sorted({b for b in map(block_index, shapes) if b is not None})
    N = sum(o * i for o, i in shapes.values())
    K = sum(ks.values())
    state_per_entry = 8 + (4 if b < 4 else 0)
    basis_entries = sum(o * o + i * i for o, i in types.values())
    rank = matched_lora_rank(model, config)
    lora_params = rank * sum(o + i for o, i in shapes.values())

    wire = []
    for p in ranks:
        dense = dense_allreduce_bytes(N, p, b)
        sparse = sparse_allgather_bytes(K, p, index_bytes=4, value_bytes=b)
        kvec = kvector_allreduce_bytes(K, p, value_bytes=b)
        wire.append({"p": p, "dense_allreduce": dense, "sparse_allgather": sparse, "kvector_allreduce": kvec,
                     "sparse_ratio": dense / sparse, "kvector_ratio": dense / kvec,
                     "breakeven_density": sparse_breakeven_density(p, 4, b)})
    return {
        "preset": preset.name, "hf_id": preset.hf_id, "dtype": dtype,
        "num_hidden_layers": preset.model_config["num_hidden_layers"],
        "block_stride": config.block_stride, "blocks": blocks,
        "matrices": len(shapes), "types": {t: list(s) for t, s in types.items()},
        "k_per_matrix": sorted(set(ks.values())), "N": N, "k_total": K, "density": K / N,
        "optimizer_state_per_entry": state_per_entry,
        "optimizer_state_sparsegrad": state_per_entry * K, "optimizer_state_dense": state_per_entry * N,
        "adapter_values": 4 * K, "adapter_indices_int64": 8 * K, "adapter_indices_int32": 4 * K,
        "adapter_bases_entries": basis_entries,
        "adapter_bases_fp64": 8 * basis_entries, "adapter_bases_fp32": 4 * basis_entries,
        "lora_rank": rank, "lora_params": lora_params,
        "wire": wire,
        "train_args": preset.train_args() if not overrides else
        ["--block_stride", str(config.block_stride), "--k", str(config.k)],
    }


def _ordinal(n: int) -> str:
    if n == 1:
        return "block"
    suffix = "th" if 10 <= n % 100 <= 20 else {1: "st", 2: "nd", 3: "rd"}.get(n % 10, "th")
    return f"{n}{suffix}"


def _b(x: float) -> str:
    return f"{x:,.0f} ({fmt_bytes(x)})"


def format_report(r: dict[str, Any]) -> str:
    types = ", ".join(f"{t.rsplit('.', 1)[-1]} {o}x{i}" for t, (o, i) in r["types"].items())
    ks = "/".join(f"{k:,d}" for k in r["k_per_matrix"])
    spe = r["optimizer_state_per_entry"]
    lines = [
        f"## {r['preset']} ({r['hf_id']}), {r['dtype']}",
        "",
        "| quantity | value |",
        "|---|---:|",
        f"| converted matrices | {r['matrices']} |",
        f"| converted blocks (every {_ordinal(r['block_stride'])} of {r['num_hidden_layers']}) | "
        f"{len(r['blocks'])}: {' '.join(map(str, r['blocks']))} |",
        f"| layer types (out x in) | {types} |",
        f"| entries of converted matrices N | {r['N']:,d} |",
        f"| k per matrix | {ks} |",
        f"| trainable parameters (sum of k) | {r['k_total']:,d} |",
        f"| density k/N | {100 * r['density']:.4f} % |",
        f"| optimizer state, SparseGrad ({spe} B/entry) | {_b(r['optimizer_state_sparsegrad'])} |",
        f"| optimizer state, dense AdamW same layers ({spe} B/entry) | {_b(r['optimizer_state_dense'])} |",
        f"| optimizer state ratio | {100 * r['optimizer_state_sparsegrad'] / r['optimizer_state_dense']:.4f} % |",
        f"| adapter values (fp32) | {_b(r['adapter_values'])} |",
        f"| adapter indices (int32, as saved) | {_b(r['adapter_indices_int32'])} |",
        f"| adapter bases, once per type (fp32) | {_b(r['adapter_bases_fp32'])} |",
        f"| LoRA matched rank | {r['lora_rank']} |",
        f"| LoRA trainable parameters at that rank | {r['lora_params']:,d} |",
        f"| train_qa.py flags | `{' '.join(r['train_args'])}` |",
        "",
        f"Bytes on the wire per step and rank, converted layers only (ring, {r['dtype']} values, int32 indices):",
        "",
        "| ranks | dense all-reduce | sparse all-gather (dynamic support) | dense/sparse | "
        "k-vector all-reduce (fixed support) | dense/k-vector | sparse break-even density |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for w in r["wire"]:
        lines.append(f"| {w['p']} | {_b(w['dense_allreduce'])} | {_b(w['sparse_allgather'])} | "
                     f"{w['sparse_ratio']:.1f}x | {_b(w['kvector_allreduce'])} | {w['kvector_ratio']:.0f}x | "
                     f"{100 * w['breakeven_density']:.3f} % |")
    lines += [
        "",
        f"Optimizer state: Adam(W) moments in fp32 (8 B/entry)"
        f"{' + fp32 master copy (4 B/entry) for ' + r['dtype'] + ' parameters' if spe == 12 else ''}; "
        "totals over all ranks (ZeRO shards them by p). Units: 1 GB = 1e9 B.",
    ]
    return "\n".join(lines)


def parse_markdown_tables(text: str) -> list[list[list[str]]]:
    """Every markdown table in ``text`` as a list of rows of stripped cells (separator rows dropped)."""
    tables, current = [], []
    for line in text.splitlines():
        if line.startswith("|") and line.rstrip().endswith("|"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if not all(set(c) <= set("-:") and c for c in cells):
                current.append(cells)
        elif current:
            tables.append(current)
            current = []
    if current:
        tables.append(current)
    return tables


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sg_distributed.tools.presets", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=sorted(PRESETS), default="llama-2-7b")
    ap.add_argument("--ranks", type=int, nargs="+", default=[8, 64], help="data-parallel ranks p")
    ap.add_argument("--dtype", choices=sorted(DTYPE_BYTES), default="bf16", help="parameter/communication dtype")
    ap.add_argument("--k", type=int, default=None, help="override the entries per matrix")
    ap.add_argument("--block_stride", type=int, default=None, help="override the block stride")
    ap.add_argument("--json", action="store_true", help="print the raw numbers as JSON instead")
    args = ap.parse_args(argv)
    if any(p < 1 for p in args.ranks):
        ap.error("--ranks must be positive integers")
    report = cost_report(args.model, tuple(args.ranks), args.dtype, k=args.k, block_stride=args.block_stride)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
