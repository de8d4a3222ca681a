"""Older SparseGrad adapters and the one loader for all of them.

``convert``: a SparseGradModel adapter (format ``sg_distributed.sparsegrad/1``, what ``launch/train_qa.py`` and
``SparseGradTrainer`` wrote before SparseGrad became a peft method) into a peft adapter that
``PeftModel.from_pretrained`` loads. A pure file transform: no base model is needed.

    python -m sg_distributed.sparsegrad.convert old_adapter/ peft_adapter/

``load_adapter``: any SparseGrad adapter onto a base model (peft's, an older one converted on the fly, or a
reference / dynamic mode one, which only the research wrapper ``SparseGradModel`` trains).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from torch import nn

from safetensors.torch import save_file

from ..io import atomic_directory
from sg_distributed.sparsegrad.wrapper import ADAPTER_CONFIG, ADAPTER_WEIGHTS, FORMAT, SparseGradModel, read_adapter
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


def load_adapter(model: nn.Module, directory: str | Path, is_trainable: bool = False) -> nn.Module:
    """``model`` with the SparseGrad adapter saved in ``directory``: a ``PeftModel`` (fixed support; an older
    adapter is converted on the fly) or a ``SparseGradModel`` (reference / dynamic mode). ``is_trainable``:
    the k-vectors (and any ``modules_to_save``) train, as for a resumed run; else peft's inference mode."""
    from peft import PeftModel

    config_path = Path(directory) / ADAPTER_CONFIG
    if not config_path.exists():
        raise FileNotFoundError(f"{config_path} not found: not a SparseGrad adapter directory")
    if json.loads(config_path.read_text()).get("format") != FORMAT:
        return PeftModel.from_pretrained(model, str(directory), is_trainable=is_trainable)
    if read_adapter(directory)[1].support_mode != "fixed":
        return SparseGradModel.from_pretrained(model, directory)
    with tempfile.TemporaryDirectory(prefix="sparsegrad-peft-") as tmp:
        return PeftModel.from_pretrained(model, str(convert(directory, Path(tmp) / "adapter")),
                                         is_trainable=is_trainable)


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
