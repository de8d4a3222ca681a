"""Convert a SparseGradModel adapter (format ``sg_distributed.sparsegrad/1``: what ``launch/train_qa.py``,
``SparseGradTrainer`` and ``SparseGradModel.save_pretrained`` write) into a peft adapter that
``PeftModel.from_pretrained`` loads. A pure file transform: no base model is needed.

    python -m sg_distributed.sparsegrad.convert old_adapter/ peft_adapter/
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from safetensors.torch import save_file

from ..io import atomic_directory
from ..model import ADAPTER_WEIGHTS, read_adapter
from .model import BASES, BLOCK_COLS, BLOCK_ROWS, SUPPORT

LAYER_KEYS = {"sparse_values": "sparsegrad_values", "support": SUPPORT, "block_rows": BLOCK_ROWS,
              "block_cols": BLOCK_COLS}


def convert(source: str | Path, target: str | Path) -> Path:
    """Write the peft form of the SparseGradModel adapter in ``source`` to ``target`` (atomically)."""
    meta, config, tensors = read_adapter(source)
    if config.support_mode != "fixed":
        raise ValueError(f"{source}: support_mode={config.support_mode!r} adapters are not peft adapters (dense rotated "
                         f"matrices); load them with SparseGradModel.from_pretrained")
    out = {}
    for name in meta["layers"]:
        for old, new in LAYER_KEYS.items():
            if f"{name}.{old}" in tensors:
                out[f"base_model.model.{name}.{new}"] = tensors.pop(f"{name}.{old}")
    for key in list(tensors):
        if key.startswith("bases."):
            out[f"base_model.{BASES}.{key.removeprefix('bases.')}"] = tensors.pop(key)
    if tensors:
        raise ValueError(f"{source}: entries with no peft counterpart: {sorted(tensors)[:5]}")
    with atomic_directory(target) as tmp:
        save_file(out, str(tmp / ADAPTER_WEIGHTS))
        config.save_pretrained(str(tmp))  # peft's adapter_config.json (peft_type SPARSEGRAD)
    return Path(target)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="a SparseGradModel adapter directory")
    p.add_argument("target", help="where to write the peft adapter")
    args = p.parse_args(argv)
    try:
        print(convert(args.source, args.target))
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
