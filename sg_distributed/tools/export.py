"""Export a trained SparseGrad adapter: a PEFT-style adapter directory and a merged plain transformers model.

    python -m sg_distributed.tools.export --checkpoint outputs/run/checkpoints --base_model <hf dir> \\
        --adapter_out exported/adapter --merged_out exported/merged

``--checkpoint`` may be a checkpoint root (its newest complete ``step_N``), one ``step_N`` directory
(verified against its manifest), a training output directory (its ``adapter/``) or an adapter directory.
Every checkpoint written by launch/train_qa.py holds a whole adapter (``adapter/``, gathered from the
ZeRO-3 partitions / FSDP2 shards at save time), so no engine-specific conversion is needed; the engine
state next to it (``engine/``, ``dcp/``) is for resuming only.

The merged model is ``W0 + P S R^T`` folded into every converted ``nn.Linear`` (``merge_and_unload``):
a plain ``AutoModelForCausalLM`` directory with no sg_distributed dependency. Before writing, the script
runs a fixed probe batch through the adapter model and through the merged model reloaded from disk and
fails if the logits differ by more than ``--atol + --rtol x max |logit|`` (defaults 1e-5 and 1e-5, fp32).
Why relative: merging rounds W0 + P S R^T once per weight where the adapter model rounds W0 x and the delta
separately; fp32's 6e-8 unit roundoff, compounded over the layers, moves the logits by a few 1e-6 of their
scale (SmolLM2-135M, 30 blocks: 6.9e-5 at logits of ~20), while a wrong merge moves them by whole units.

8-bit / 4-bit bases: the adapter records the quantisation of the base it was trained on
(``base_quantization`` in its config; older adapters: the checkpoint manifest's run fingerprint), and the
base is loaded that way without a flag (``--load_in_8bit`` / ``--load_in_4bit`` are checked against the
record). Every bitsandbytes layer is then replaced by an ``nn.Linear`` holding its dequantised weight --
the weights the adapter was trained against -- and the update is merged onto them, so the result is a
plain fp32 model. The logit check compares it with the adapter model *on that dequantised base* (same
tolerance); the quantised adapter model's own logits differ from both by bitsandbytes' activation rounding
(int8 matmul, nf4 compute), reported as ``quantized_logit_diff`` and not checked.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import torch
from torch import nn

from sg_distributed.training.checkpoint import CheckpointError, find_latest, step_of, verify
from sg_distributed.io import atomic_directory
from sg_distributed.sparsegrad.wrapper import ADAPTER_CONFIG
from sg_distributed.quant import keep_cpu_nf4_trainable
from sg_distributed.sparsegrad.convert import load_adapter


def resolve_adapter(path: str | Path) -> Path:
    """The adapter directory inside a checkpoint root / step_N / training output / adapter directory."""
    path = Path(path)
    if (path / ADAPTER_CONFIG).exists():
        return path
    if step_of(path) is not None:
        verify(path)
        return path / "adapter"
    if (path / "adapter" / ADAPTER_CONFIG).exists():
        return path / "adapter"
    for root in (path, path / "checkpoints"):
        latest = find_latest(root, log=lambda m: print(m, file=sys.stderr))
        if latest is not None:
            if not (latest / "adapter" / ADAPTER_CONFIG).exists():
                raise CheckpointError(f"{latest} holds no SparseGrad adapter (a LoRA / full / GradDrop run?)")
            print(f"export: using checkpoint {latest}", file=sys.stderr)
            return latest / "adapter"
    raise CheckpointError(f"{path}: no adapter, step_N checkpoint or checkpoint root with a complete checkpoint")


def _dequantize_remaining(model: nn.Module) -> int:
    """Replace every bitsandbytes layer left in ``model`` by an nn.Linear with its dequantised weight."""
    from sg_distributed.quant import dequantized_weight, is_quantized

    names = [n for n, m in model.named_modules() if is_quantized(m)]
    for name in names:
        old = model.get_submodule(name)
        weight = dequantized_weight(old).float()
        new = nn.Linear(old.in_features, old.out_features, bias=old.bias is not None, dtype=torch.float32)
        with torch.no_grad():
            new.weight.copy_(weight)
            if old.bias is not None:
                new.bias.copy_(old.bias.float())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
    return len(names)


def _probe(model: nn.Module, vocab: int, seed: int = 0) -> torch.Tensor:
    ids = torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits.float()


def export(checkpoint: str | Path, base_model: str | Path, adapter_out: str | Path | None = None,
           merged_out: str | Path | None = None, load_in_8bit: bool = False, load_in_4bit: bool = False,
           atol: float = 1e-5, rtol: float = 1e-5) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    adapter_dir = resolve_adapter(checkpoint)
    base_model = Path(base_model)
    if not (base_model / "config.json").exists():
        raise FileNotFoundError(f"{base_model} is not a transformers model directory (no config.json)")
    report: dict = {"adapter": str(adapter_dir)}
    if adapter_out is not None:
        with atomic_directory(adapter_out) as tmp:
            for f in adapter_dir.iterdir():
                shutil.copy2(f, tmp / f.name)
        report["adapter_out"] = str(adapter_out)
    if merged_out is None:
        return report

    quantization = _recorded_quantization(adapter_dir, asked="8bit" if load_in_8bit else "4bit" if load_in_4bit else None)
    report["base_quantization"] = quantization
    bnb = (BitsAndBytesConfig(load_in_8bit=quantization == "8bit", load_in_4bit=quantization == "4bit",
                              bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
           if quantization else None)
    model = AutoModelForCausalLM.from_pretrained(base_model, dtype=torch.float32, quantization_config=bnb)
    keep_cpu_nf4_trainable(model)  # else the first eval forward repacks nf4 bytes that the merge then misreads
    model.eval()
    wrapped = load_adapter(model, adapter_dir)  # a peft adapter, an older one, or a reference / dynamic one
    vocab = model.config.vocab_size
    reference = _probe(wrapped, vocab)
    if quantization:
        quantized = reference
        report["dequantized_layers"] = _dequantize_remaining(model)  # the converted layers' bases included
        reference = _probe(wrapped, vocab)  # the adapter model on the dequantised base: what the merge must equal
        report["quantized_logit_diff"] = (quantized - reference).abs().max().item()
    merged = wrapped.merge_and_unload()
    if quantization:
        merged.config.quantization_config = None
        if hasattr(merged, "hf_quantizer"):
            merged.hf_quantizer = None
        merged.is_quantized = False
        for attr in ("is_loaded_in_8bit", "is_loaded_in_4bit"):
            if hasattr(merged, attr):
                setattr(merged, attr, False)
        if "quantization_config" in merged.config.__dict__:
            del merged.config.__dict__["quantization_config"]
    with atomic_directory(merged_out) as tmp:
        merged.save_pretrained(tmp)
        try:
            AutoTokenizer.from_pretrained(base_model).save_pretrained(tmp)
        except (OSError, ValueError):
            pass  # a base directory without a tokenizer: the model alone
    reloaded = AutoModelForCausalLM.from_pretrained(merged_out, dtype=torch.float32).eval()
    diff = (_probe(reloaded, vocab) - reference).abs().max().item()
    scale = reference.abs().max().item()
    limit = atol + rtol * scale
    report.update({"merged_out": str(merged_out), "max_abs_logit_diff": diff, "max_abs_logit": scale,
                   "tolerance": limit})
    if not diff <= limit:
        raise RuntimeError(f"merged model's logits differ from the adapter model's by {diff:.3g} > {limit:.3g} "
                           f"(atol {atol:g} + rtol {rtol:g} x max |logit| {scale:.3g})")
    return report


def _recorded_quantization(adapter_dir: Path, asked: str | None) -> str | None:
    """The base quantisation the adapter was trained on: its own record, else its checkpoint's fingerprint,
    else what the flags say. A flag that contradicts the record is an error."""
    meta = json.loads((adapter_dir / ADAPTER_CONFIG).read_text())
    recorded, source = meta.get("base_quantization"), "its adapter_config.json"
    known = "base_quantization" in meta
    manifest = adapter_dir.parent / "manifest.json"
    if not known and manifest.exists():
        fingerprint = json.loads(manifest.read_text()).get("fingerprint", {})
        if "load_in_8bit" in fingerprint:
            recorded = "8bit" if fingerprint["load_in_8bit"] else "4bit" if fingerprint.get("load_in_4bit") else None
            known, source = True, f"{manifest}"
    if not known:
        return asked
    if asked is not None and asked != recorded:
        raise ValueError(f"--load_in_{asked} given, but the adapter was trained on a "
                         f"{recorded + ' quantised' if recorded else 'float'} base (recorded in {source})")
    return recorded


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="checkpoint root, step_N, training output or adapter dir")
    p.add_argument("--base_model", required=True, help="the HF model directory the adapter was trained on")
    p.add_argument("--adapter_out", help="write the adapter (adapter_config.json + adapter_model.safetensors) here")
    p.add_argument("--merged_out", help="write the merged plain transformers model here")
    quant = p.add_mutually_exclusive_group()
    quant.add_argument("--load_in_8bit", action="store_true",
                       help="older adapters only: the base was int8 (recorded in adapters written since)")
    quant.add_argument("--load_in_4bit", action="store_true", help="older adapters only: the base was nf4")
    p.add_argument("--atol", type=float, default=1e-5, help="merged vs adapter model: |logit difference| allowed ...")
    p.add_argument("--rtol", type=float, default=1e-5, help="... plus this fraction of the largest |logit| (fp32)")
    args = p.parse_args(argv)
    if not (args.adapter_out or args.merged_out):
        p.error("give --adapter_out and/or --merged_out")
    try:
        report = export(args.checkpoint, args.base_model, args.adapter_out, args.merged_out, args.load_in_8bit,
                        args.load_in_4bit, args.atol, args.rtol)
    except (CheckpointError, FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
