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

        packed = whole_weight(module)
        quant_state = quant_state_of(module)
        if quant_state is None:
            return packed.float()
        return bnbf.dequantize_4bit(packed, quant_state).float()
    return weight.data


def quant_state_of(module: nn.Module):
    """A 4-bit layer's QuantState: on its weight, or on the module once FSDP2 has put a DTensor (or the plain
    all-gathered tensor) in the weight's place."""
    state = getattr(module.weight, "quant_state", None)
    return state if state is not None else getattr(module, "quant_state", None)


def whole_weight(module: nn.Module) -> torch.Tensor:
    """``module.weight.data``, all-gathered first when FSDP2 shards it (a float-stored 4-bit weight outside
    forward is a DTensor holding this rank's rows; its quant_state stays on the module): then a collective
    that every rank must call."""
    from torch.distributed.tensor import DTensor

    weight = module.weight
    return weight.detach().full_tensor() if isinstance(weight, DTensor) else weight.data


def quantized_weights_digest(model) -> str | None:
    """SHA-256 of every bitsandbytes weight: proves the frozen int8/nf4 base is untouched by training.

    Hashes the raw bytes, so a 4-bit weight packed into bf16 words (``bnb_4bit_quant_storage``) hashes like
    the same packing in uint8. A collective when FSDP2 shards such weights (``whole_weight``)."""
    digest, found = hashlib.sha256(), False
    for name, module in model.named_modules():
        if is_quantized(module):
            found = True
            digest.update(name.removesuffix(".base_layer").encode())  # SparseGradLinear wraps the base as `.base_layer`
            digest.update(whole_weight(module).cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest() if found else None


def quantized_storage_bytes(model: nn.Module, scales: bool = False) -> int:
    """Bytes of frozen bitsandbytes weights held by this rank: the local rows of each weight FSDP2 shards (a
    float-stored 4-bit weight), the whole of every other int8 / nf4 weight (kept whole on every rank).

    scales: also count the dequantisation state, which stays whole on every rank (nf4: absmax, its nested
    absmax and the two 256-entry code tables; int8: the per-row SCB).
    """
    from torch.distributed.tensor import DTensor

    def nbytes(t: torch.Tensor | None) -> int:
        if isinstance(t, DTensor):
            t = t.to_local()
        return 0 if t is None else t.numel() * t.element_size()

    total = 0
    for module in model.modules():
        if not is_quantized(module):
            continue
        total += nbytes(module.weight)
        if not scales:
            continue
        if type(module).__name__ == "Linear8bitLt":
            scb = getattr(module.weight, "SCB", None)
            total += nbytes(scb if scb is not None else module.state.SCB)
        else:
            state = quant_state_of(module)
            for part in (state, getattr(state, "state2", None)):
                if part is not None:
                    total += nbytes(part.absmax) + nbytes(part.code)
    return total
