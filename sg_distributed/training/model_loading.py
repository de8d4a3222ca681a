"""The model of a run: an HF causal LM and its tokenizer, in the run's dtype, over an optional frozen
bitsandbytes int8 / nf4 base, with optional activation checkpointing."""
from __future__ import annotations

import torch


def enable_gradient_checkpointing(model, mode: str) -> None:
    """HF activation checkpointing (``gradient_checkpointing_enable`` on transformers < 5.2x) with the chosen
    torch implementation; the input embeddings' output requires grad so frozen-input blocks still backprop."""
    kwargs = {"use_reentrant": mode == "reentrant"}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    model.enable_input_require_grads()


def load_model_and_tokenizer(path: str, load_in_8bit: bool = False, load_in_4bit: bool = False,
                             dtype: torch.dtype = torch.float32, fsdp: bool = False):
    """fsdp: a 4-bit base is packed into bf16 words (``bnb_4bit_quant_storage``) so that FSDP2 shards it
    (``integrations.fsdp``); bf16 whatever ``dtype`` is, because FSDP2 all-gathers mixed dtypes as bytes and a
    bf16 ``MixedPrecisionPolicy`` (``--precision bf16`` or ``--autocast bf16``) then has nothing to cast."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    quantization = None
    if load_in_8bit or load_in_4bit:
        from sg_distributed.quant import log_bnb_casts_once

        log_bnb_casts_once()
        storage = torch.bfloat16 if fsdp and load_in_4bit else torch.uint8
        quantization = BitsAndBytesConfig(load_in_8bit=load_in_8bit, load_in_4bit=load_in_4bit,
                                          bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                          bnb_4bit_quant_storage=storage)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, quantization_config=quantization)
    if quantization is not None:
        from sg_distributed.quant import keep_cpu_nf4_trainable

        keep_cpu_nf4_trainable(model)
    if torch.cuda.is_available():
        model = model.to(torch.cuda.current_device()) if quantization is None else model
    return model, tokenizer
