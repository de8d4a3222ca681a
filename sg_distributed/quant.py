"""Reading frozen base weights that may be bitsandbytes 8-bit or 4-bit."""
from __future__ import annotations

import hashlib
import logging

import torch
from torch import nn


class _FirstOccurrence(logging.Filter):
    """Let each distinct message template through once."""

    def __init__(self):
        super().__init__()
        self.seen: set = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg in self.seen:
            return False
        self.seen.add(record.msg)
        return True


def log_bnb_casts_once() -> None:
    """bitsandbytes logs "MatMul8bitLt: inputs will be cast from bfloat16 to float16" at every int8 matmul
    of a bf16 model (~8,400 lines in a 2-step run); keep the first."""
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _FirstOccurrence) for f in logger.filters):
        logger.addFilter(_FirstOccurrence())


QUANTIZATION_OF = {"Linear8bitLt": "8bit", "Linear4bit": "4bit"}  # bitsandbytes layer -> its quantisation


def is_quantized(module: nn.Module) -> bool:
    return type(module).__name__ in QUANTIZATION_OF


def quantization_of(modules) -> str | None:
    """``8bit``, ``4bit`` or None (float) for a set of frozen base layers; ValueError when they are mixed."""
    kinds = {QUANTIZATION_OF.get(type(m).__name__) for m in modules}
    if len(kinds) > 1:
        raise ValueError(f"the converted layers' bases mix quantisations {sorted(map(str, kinds))}")
    return next(iter(kinds), None)


def keep_cpu_nf4_trainable(model: nn.Module) -> None:
    """bitsandbytes' CPU nf4 eval fast path repacks a frozen Linear4bit weight *in place* into an
    inference-only layout at its first eval forward: input gradients stop, the weight digest changes, and a
    later ``dequantize_4bit`` of the repacked bytes returns garbage (an export's merge was 0.88 logits off on
    a tiny model). Turn it off for every Linear4bit of ``model``."""
    for module in model.modules():
        if type(module).__name__ == "Linear4bit":
            module.support_avx512bf16_for_cpu = False


@torch.no_grad()
def dequantized_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as a float tensor (out x in); int8 / nf4 / fp4 weights are dequantised."""
    kind = type(module).__name__
    weight = module.weight
    if kind == "Linear8bitLt":
        import bitsandbytes.functional as bnbf

        scb = getattr(weight, "SCB", None)
        if scb is None:
            scb = module.state.SCB
        cb = weight.data if weight.dtype == torch.int8 else getattr(module.state, "CB", None)
        if scb is None or cb is None or cb.dtype != torch.int8:  # not yet quantised (has_fp16_weights or on meta)
            return weight.data.float()
        return bnbf.int8_vectorwise_dequant(cb, scb)
    if kind == "Linear4bit":
        import bitsandbytes.functional as bnbf

        if getattr(weight, "quant_state", None) is None:
            return weight.data.float()
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    return weight.data


def quantized_weights_digest(model) -> str | None:
    """SHA-256 of every bitsandbytes weight: proves the frozen int8/nf4 base is untouched by training."""
    digest, found = hashlib.sha256(), False
    for name, module in model.named_modules():
        if is_quantized(module):
            found = True
            digest.update(name.removesuffix(".base_layer").encode())  # SparseGradLinear wraps the base as `.base_layer`
            digest.update(module.weight.data.cpu().numpy().tobytes())
    return digest.hexdigest() if found else None
