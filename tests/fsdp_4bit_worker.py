"""Worker for tests/integrations/test_integrations_fsdp.py: SparseGrad (peft) over a 4-bit nf4 base packed into
bf16 words, sharded by FSDP2 on 2 gloo ranks (CPU, fp32 compute).

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 --master_addr 127.0.0.1 \\
        --master_port 29533 tests/fsdp_4bit_worker.py --out /tmp/fsdp_4bit.json

Each rank trains on its half of every global batch (``global_batches``) under ``apply_fsdp2``; rank 0 writes
JSON with the global loss per step, the trained k-vectors, the quantised base's digest before and after, and
each rank's bytes of packed 4-bit storage before and after sharding. ``build_model`` and ``global_batches``
are imported by the test for its one-process reference.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from conftest import lm_batches, make_tiny_llama, quantize_linears  # noqa: E402

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
STEPS, GLOBAL_BATCH, LR = 3, 4, 1e-2


def build_model(quant_storage=torch.bfloat16):
    """Tiny Llama (hidden 64) with every attention / MLP linear in nf4, SparseGrad (peft) on up/down, calibrated."""
    from peft import get_peft_model

    from sg_distributed import SparseGradConfig
    from sg_distributed.quant import keep_cpu_nf4_trainable

    base = make_tiny_llama(hidden=64, intermediate=128)
    quantize_linears(base, [n for n, _ in base.named_modules() if n.endswith(LINEARS)], bits=4,
                     quant_storage=quant_storage)
    keep_cpu_nf4_trainable(base)
    model = get_peft_model(base, SparseGradConfig(density=0.3, max_rows=None, max_cols=None))
    model.calibrate(lm_batches())
    return model


def global_batches():
    return lm_batches(n=STEPS, batch=GLOBAL_BATCH, seed=5)


def k_vectors(model) -> dict:
    return {name: m.sparsegrad_values.detach().reshape(-1).tolist() for name, m in model.converted_layers().items()}


def main() -> None:
    import torch.distributed as dist

    from sg_distributed.integrations.fsdp import apply_fsdp2, sync_replicated_grads
    from sg_distributed.quant import quantized_storage_bytes, quantized_weights_digest

    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    model = build_model()
    whole_bytes = quantized_storage_bytes(model)
    digest_before = quantized_weights_digest(model)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    apply_fsdp2(model, optimizer=optimizer)
    local_bytes = quantized_storage_bytes(model)
    sharded = [type(m.base_layer.weight).__name__ for m in model.converted_layers().values()]

    per = GLOBAL_BATCH // world
    losses = []
    for batch in global_batches():
        mine = {k: v[rank * per:(rank + 1) * per] for k, v in batch.items()}
        loss = model(**mine).loss
        loss.backward()
        sync_replicated_grads(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        total = loss.detach().clone()
        dist.all_reduce(total)
        losses.append(total.item() / world)
    digest_after = quantized_weights_digest(model)  # a collective: gathers the sharded packed weights

    per_rank = [None] * world
    dist.all_gather_object(per_rank, {"rank": rank, "local_bytes": local_bytes, "k_vectors": k_vectors(model)})
    if rank == 0:
        with open(args.out, "w") as f:
            json.dump({"world": world, "losses": losses, "whole_bytes": whole_bytes, "sharded_weight_types": sharded,
                       "digest_before": digest_before, "digest_after": digest_after, "ranks": per_rank}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
