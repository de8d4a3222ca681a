"""2 ranks (gloo): GradDrop's kept-only exchange against the dense reduction of the masked gradients.

Each case builds the same tiny Llama on both ranks (MLP up/down weights trainable, GradDrop masks at step 3),
runs one backward on a per-rank batch (DDP: the second, after its bucket rebuild) through the engine twice -- once with the engine's dense reduction,
once with the kept-only exchange -- and writes, per case: the largest difference between the two reduced
gradients (DDP) or updated weights (ZeRO-2, SGD lr 1), the largest difference to a float64 single-process
reference (mean over both ranks' batches of the masked gradients), the payload bytes of the gradient
reduction counted by CommCounter for both, the number of kept entries K and of trainable entries N.
tests/graddrop/test_exchange.py asserts on the JSON. Usage: torchrun --nproc_per_node 2 <this> OUT ROOT
"""
import json
import os
import sys

out_path, root = sys.argv[1], sys.argv[2]
sys.path.insert(0, root)

import torch
import torch.distributed as dist
from torch import nn

from sg_distributed.distributed.comm import CommCounter
from sg_distributed.graddrop import GradDropConfig, GradualUnfreezing, apply_graddrop
from sg_distributed.graddrop.exchange import KeptEntries
from sg_distributed.integrations.deepspeed import init_distributed, initialize_engine
from sg_distributed.integrations.kept_exchange import ddp_comm_hook, install_on_deepspeed, kept_exchange_ds_config

init_distributed("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
TARGETS = [f"model.layers.{i}.mlp.{n}" for i in range(2) for n in ("up_proj", "down_proj")]

# name: (engine, granularity, drop_prob, rescale, unfreezing, dtype, bucket bytes or ZeRO communication dtype)
CASES = {
    "ddp_element_p0.9": ("ddp", "element", 0.9, False, False, torch.float32, None),
    "ddp_row_p0.9_rescale": ("ddp", "row", 0.9, True, False, torch.float32, None),
    "ddp_layer_p0.5_per_param_buckets": ("ddp", "layer", 0.5, False, False, torch.float32, 1),
    "ddp_unfreezing_per_param_buckets": ("ddp", None, 0.0, False, True, torch.float32, 1),
    "ddp_element_unfreezing": ("ddp", "element", 0.5, False, True, torch.float32, None),
    "ddp_element_p0.9_bf16": ("ddp", "element", 0.9, False, False, torch.bfloat16, None),
    "zero2_element_p0.9": ("zero2", "element", 0.9, False, False, torch.float32, None),
    "zero2_row_p0.5_small_buckets": ("zero2", "row", 0.5, True, False, torch.float32, 3000),
    "zero2_layer_p0.5": ("zero2", "layer", 0.5, False, False, torch.float32, None),
    "zero2_element_p0.9_bf16": ("zero2", "element", 0.9, False, False, torch.bfloat16, None),
    # bf16 gradients reduced in fp32 ("communication_data_type"): the override's dtype-cast branch
    "zero2_element_p0.9_bf16_fp32_comm": ("zero2", "element", 0.9, False, False, torch.bfloat16, "fp32"),
    "fsdp2_element_p0.9": ("fsdp2", "element", 0.9, False, False, torch.float32, None),
    "fsdp2_row_p0.9_rescale": ("fsdp2", "row", 0.9, True, False, torch.float32, None),
    "fsdp2_layer_p0.5": ("fsdp2", "layer", 0.5, False, False, torch.float32, None),
}


def build(granularity, p, rescale, unfreeze, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64)
    model = LlamaForCausalLM(config).to(dtype)
    for param in model.parameters():
        param.requires_grad_(False)
    for name in TARGETS:
        model.get_submodule(name).weight.requires_grad_(True)
    controller = None
    if granularity is not None:
        controller = apply_graddrop(model, GradDropConfig(drop_prob=p, granularity=granularity, rescale=rescale,
                                                          seed=7, target_modules=TARGETS))
        controller.load_state_dict({"step": 3, "epoch": 0})
    unfreezing = GradualUnfreezing(model.model.layers, unfreeze_every=100) if unfreeze else None  # top block only
    return model, controller, unfreezing


def batch(r):
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(100 + r))
    return {"input_ids": ids, "labels": ids}


def trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def reference(granularity, p, rescale, unfreeze):
    """float64, one process: mean over both ranks' batches of the masked gradients (and the kept count)."""
    model, controller, unfreezing = build(granularity, p, rescale, unfreeze, torch.float64)
    for r in range(world):
        (model(**batch(r)).loss / world).backward()
    kept = KeptEntries(controller, unfreezing)
    params = [q for _, q in trainable(model)]
    keep = kept.flat_keep(params, "cpu")
    return {n: q.grad.clone() for n, q in trainable(model)}, int(keep.sum()), keep.numel()


def ddp_run(case, kept_mode):
    _, granularity, p, rescale, unfreeze, dtype, bucket = case
    model, controller, unfreezing = build(granularity, p, rescale, unfreeze, dtype)
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=False,
                                              **({"bucket_cap_mb": bucket / 1e6} if bucket else {}))
    counter = CommCounter()
    ddp.register_comm_hook(None, ddp_comm_hook(KeptEntries(controller, unfreezing)) if kept_mode
                           else counter.ddp_hook())
    ddp(**batch(rank)).loss.backward()  # DDP rebuilds its buckets (bucket_cap_mb) after the first backward
    model.zero_grad(set_to_none=True)
    with counter:
        ddp(**batch(rank)).loss.backward()
    grads = {n: q.grad.double() for n, q in trainable(model)}
    return grads, counter.snapshot().total().payload, counter.snapshot().total().calls


def zero2_run(case, kept_mode):
    _, granularity, p, rescale, unfreeze, dtype, bucket = case
    model, controller, unfreezing = build(granularity, p, rescale, unfreeze, dtype)
    start = {n: q.detach().double().clone() for n, q in trainable(model)}
    comm = bucket if isinstance(bucket, str) else None  # a dtype name in the bucket slot: communication_data_type
    bucket = None if comm else bucket
    cfg = {"train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1, "zero_allow_untested_optimizer": True,
           "bf16": {"enabled": dtype == torch.bfloat16}, "steps_per_print": 10**6,
           **({"communication_data_type": comm} if comm else {}),
           "zero_optimization": {"stage": 2, "overlap_comm": False, "contiguous_gradients": True,
                                 "reduce_bucket_size": bucket or 5 * 10**8, "reduce_scatter": False}}
    optimizer = torch.optim.SGD([q for _, q in trainable(model)], lr=1.0)
    if kept_mode:
        cfg = kept_exchange_ds_config(cfg)
    engine = initialize_engine(model, optimizer, cfg)
    if kept_mode:
        install_on_deepspeed(engine, KeptEntries(controller, unfreezing))
    counter = CommCounter()
    with counter:
        with counter.label("backward"):
            engine.backward(engine(**batch(rank)).loss)
    backward = counter.snapshot().by_label().get("backward")
    engine.step()
    # SGD lr 1 on the fp32 masters (bf16 mode: the start values exactly): the update is minus the reduced gradient
    from deepspeed.utils import safe_get_full_fp32_param

    grads = {n: start[n] - safe_get_full_fp32_param(q).double() for n, q in trainable(model)}
    return grads, backward.payload if backward else 0, backward.calls if backward else 0


def fsdp2_run(case, kept_mode):
    """FSDP2: GradDrop masks inside the custom reduce-scatter; dense mode reduce-scatters the masked rows.
    Also returns the payload the padded compact rows should have: per block, ranks x max over ranks of the
    kept entries in that rank's dim-0 shards of the block's targets (from the controller's masks)."""
    from sg_distributed.integrations.fsdp import apply_fsdp2
    from sg_distributed.integrations.kept_exchange import install_on_fsdp2

    _, granularity, p, rescale, unfreeze, dtype, bucket = case
    model, controller, _ = build(granularity, p, rescale, unfreeze, dtype)
    masks = {n: controller.mask_for(n) for n in controller.targets}
    apply_fsdp2(model)
    install_on_fsdp2(model, KeptEntries(controller), compact=kept_mode)
    counter = CommCounter()
    with counter:
        with counter.label("backward"):
            model(**batch(rank)).loss.backward()
    by_op = counter.snapshot().by_op()
    grads = {n: q.grad.full_tensor().double() for n, q in trainable(model)}
    expected = 0
    for block in range(2):
        per_rank = [sum(int(m.chunk(world)[r].sum()) for n, m in masks.items() if f"layers.{block}." in n)
                    for r in range(world)]
        expected += world * max(per_rank) * (2 if dtype == torch.bfloat16 else 4)
    rs = by_op.get("reduce_scatter_tensor")
    return grads, rs.payload if rs else 0, rs.calls if rs else 0, expected


results = {}
for name, case in CASES.items():
    if case[0] == "fsdp2":
        dense, dense_bytes, dense_calls, _ = fsdp2_run(case, kept_mode=False)
        kept, kept_bytes, kept_calls, padded = fsdp2_run(case, kept_mode=True)
        ref, K, N = reference(*case[1:5])
        results[name] = {
            "max_kept_vs_dense": max(float((kept[n] - dense[n]).abs().max()) for n in dense),
            "max_kept_vs_reference": max(float((kept[n] - ref[n]).abs().max()) for n in ref),
            "max_reference": max(float(ref[n].abs().max()) for n in ref),
            "dropped_nonzero": sum(int(((ref[n] == 0) & (kept[n] != 0)).sum()) for n in ref),
            "dense_bytes": dense_bytes, "kept_bytes": kept_bytes, "dense_calls": dense_calls,
            "kept_calls": kept_calls, "padded_bytes": padded, "K": K, "N": N, "bytes_per_value": 4,
            "dtype": str(case[5]),
        }
        continue
    run = ddp_run if case[0] == "ddp" else zero2_run
    dense, dense_bytes, dense_calls = run(case, kept_mode=False)
    kept, kept_bytes, kept_calls = run(case, kept_mode=True)
    ref, K, N = reference(*case[1:5])
    bytes_per = 2 if case[5] == torch.bfloat16 and case[6] != "fp32" else 4
    results[name] = {
        "max_kept_vs_dense": max(float((kept[n] - dense[n]).abs().max()) for n in dense),
        "max_kept_vs_reference": max(float((kept[n] - ref[n]).abs().max()) for n in ref),
        "max_reference": max(float(ref[n].abs().max()) for n in ref),
        "dropped_nonzero": sum(int(((ref[n] == 0) & (kept[n] != 0)).sum()) for n in ref),
        "dense_bytes": dense_bytes, "kept_bytes": kept_bytes, "dense_calls": dense_calls, "kept_calls": kept_calls,
        "K": K, "N": N, "bytes_per_value": bytes_per, "dtype": str(case[5]),
    }
if rank == 0:
    with open(out_path, "w") as f:
        json.dump(results, f, indent=1)
dist.barrier()
dist.destroy_process_group()
