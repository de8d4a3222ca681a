"""sg_distributed.graddrop.exchange + integrations.kept_exchange: only GradDrop's kept entries travel."""
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sg_distributed.graddrop import GradDropConfig, GradualUnfreezing, apply_graddrop
from sg_distributed.graddrop.exchange import KeptEntries, pack, unpack_
from sg_distributed.integrations.kept_exchange import kept_exchange_ds_config

from conftest import free_port, make_tiny_llama, run_ranks

ROOT = Path(__file__).resolve().parents[2]
TARGETS = ["mlp.up_proj", "mlp.down_proj"]


def _mlp_params(model):
    return [m.weight for name, m in model.named_modules() if name.endswith(tuple(TARGETS))]


@pytest.mark.parametrize("granularity", ["element", "row", "layer"])
def test_flat_keep_is_the_hooks_mask_in_flat_order(granularity):
    model = make_tiny_llama()
    controller = apply_graddrop(model, GradDropConfig(drop_prob=0.6, granularity=granularity, seed=3,
                                                      target_modules=TARGETS))
    controller.step()
    names = [n for n, p in model.named_parameters() if n.endswith(("up_proj.weight", "down_proj.weight"))]
    params = _mlp_params(model)
    keep = KeptEntries(controller).flat_keep(params, "cpu")
    expected = torch.cat([controller.mask_for(n).reshape(-1) for n in names])
    assert torch.equal(keep, expected)
    # by name (FSDP2 replaces parameter objects) gives the same flags
    by_name = KeptEntries(controller).flat_keep(params, "cpu", names=names)
    assert torch.equal(by_name, expected)


def test_non_targets_are_kept_whole_and_p0_keeps_everything():
    model = make_tiny_llama()
    controller = apply_graddrop(model, GradDropConfig(drop_prob=0.5, target_modules=["mlp.up_proj"]))
    embed = model.get_input_embeddings().weight
    up = model.model.layers[0].mlp.up_proj.weight
    keep = KeptEntries(controller).flat_keep([embed, up], "cpu")
    assert keep[:embed.numel()].all() and not keep[embed.numel():].all()
    assert KeptEntries(controller).flat_keep([embed], "cpu") is None  # nothing masked: the dense reduction
    other = make_tiny_llama()
    zero = apply_graddrop(other, GradDropConfig(drop_prob=0.0, target_modules=["mlp.up_proj"]))
    assert KeptEntries(zero).flat_keep([other.model.layers[0].mlp.up_proj.weight], "cpu") is None


def test_gradual_unfreezing_frozen_blocks_send_nothing():
    model = make_tiny_llama(layers=3)
    unfreezing = GradualUnfreezing(model.model.layers, unfreeze_every=2)
    kept = KeptEntries(unfreezing=unfreezing)
    bottom, top = model.model.layers[0].mlp.up_proj.weight, model.model.layers[2].mlp.up_proj.weight
    assert not kept.flat_keep([bottom], "cpu").any()
    assert kept.flat_keep([top], "cpu") is None
    for _ in range(4):
        unfreezing.step()
    assert kept.flat_keep([bottom], "cpu") is None  # all three blocks active at step 4


def test_pack_unpack_round_trip_and_layout_error():
    flat = torch.arange(10.0)
    keep = torch.tensor([1, 0, 0, 1, 1, 0, 0, 0, 1, 0], dtype=torch.bool)
    compact = pack(flat, keep)
    assert compact.tolist() == [0.0, 3.0, 4.0, 8.0]
    out = unpack_(flat.clone(), keep, compact * 2)
    assert out.tolist() == [0.0, 0, 0, 6, 8, 0, 0, 0, 16, 0]
    with pytest.raises(ValueError, match="buffer of 10 entries but keep flags for 9"):
        pack(flat, keep[:9])
    with pytest.raises(ValueError, match="GradDropController, a GradualUnfreezing, or both"):
        KeptEntries()


def test_ds_config_is_adapted_or_refused_with_the_setting_named():
    cfg = {"zero_optimization": {"stage": 2, "reduce_scatter": True}}
    out = kept_exchange_ds_config(cfg)
    assert out["zero_optimization"] == {"stage": 2, "reduce_scatter": False, "contiguous_gradients": True}
    assert cfg["zero_optimization"]["reduce_scatter"] is True  # the caller's dict is untouched
    with pytest.raises(ValueError, match="stage 3"):
        kept_exchange_ds_config({"zero_optimization": {"stage": 3}})
    with pytest.raises(ValueError, match="contiguous_gradients"):
        kept_exchange_ds_config({"zero_optimization": {"stage": 2, "contiguous_gradients": False}})


@pytest.fixture(scope="module")
def two_rank_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("kept") / "kept.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "tests" / "kept_exchange_worker.py"), str(out), str(ROOT)]
    proc = run_ranks(cmd, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.multiprocess
def test_two_ranks_kept_exchange_equals_the_dense_reduction_and_sends_k_values(two_rank_results):
    """DDP (comm hook), DeepSpeed ZeRO-2 (bucket reduction override) and FSDP2 (custom reduce-scatter, which is
    also where GradDrop masks there), element / row / layer granularity, rescale, gradual unfreezing (DDP), fp32
    and bf16: the reduced gradients are bit-identical to the engine's dense reduction of the masked gradients, agree with a float64 single-process mean over both ranks' batches
    (fp32: 1e-5, bf16: 2e-2 of the largest entry; bf16 runs its forward and backward in bf16), are zero where
    dropped, and the counted payload is exactly K values (FSDP2: ranks x the longest rank's kept count, computed
    here from the masks; dense: N)."""
    assert len(two_rank_results) == 14
    for name, r in two_rank_results.items():
        assert r["max_kept_vs_dense"] == 0.0, (name, r)
        tolerance = 2e-2 if r["dtype"] == "torch.bfloat16" else 1e-5  # bf16 forward and backward vs float64
        assert r["max_kept_vs_reference"] <= tolerance * r["max_reference"], (name, r)
        assert r["dropped_nonzero"] == 0, (name, r)
        if name.startswith("fsdp2"):  # reduce-scatter rows padded to the longest rank's kept count
            assert r["kept_bytes"] == r["padded_bytes"] >= r["K"] * r["bytes_per_value"], (name, r)
        else:
            assert r["kept_bytes"] == r["K"] * r["bytes_per_value"], (name, r)
        assert r["dense_bytes"] == r["N"] * r["bytes_per_value"], (name, r)
        assert 0 < r["K"] < r["N"], (name, r)


@pytest.mark.multiprocess
def test_two_ranks_kept_count_is_binomial_and_dropped_buckets_send_nothing(two_rank_results):
    r = two_rank_results["ddp_element_p0.9"]  # K ~ Binomial(N, 0.1)
    mean, sd = 0.1 * r["N"], math.sqrt(r["N"] * 0.1 * 0.9)
    assert abs(r["K"] - mean) < 4 * sd, r
    for name in ("ddp_element_p0.9", "zero2_element_p0.9", "fsdp2_element_p0.9"):
        r = two_rank_results[name]
        assert r["kept_bytes"] / r["dense_bytes"] <= 0.12, (name, r)
    row = two_rank_results["ddp_row_p0.9_rescale"]  # whole rows: K is a multiple of a row's length
    assert row["K"] % 32 == 0 and row["kept_bytes"] / row["dense_bytes"] <= 0.2, row
    for name in ("ddp_layer_p0.5_per_param_buckets", "ddp_unfreezing_per_param_buckets"):  # one bucket per weight
        r = two_rank_results[name]
        assert r["dense_calls"] == 4 and r["kept_calls"] == 2, (name, r)  # two whole weights dropped: no call


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("granularity", ["element", "row"])
def test_cuda_flat_keep_is_the_hooks_cuda_mask_and_packs_on_device(granularity):
    """On CUDA the flags are drawn with Philox on the device, like the hook's: flat_keep must equal the mask the
    hook applies on that device, and pack/unpack must stay on it."""
    model = make_tiny_llama().cuda()
    controller = apply_graddrop(model, GradDropConfig(drop_prob=0.9, granularity=granularity, seed=5,
                                                      target_modules=TARGETS))
    names = [n for n, p in model.named_parameters() if n.endswith(("up_proj.weight", "down_proj.weight"))]
    keep = KeptEntries(controller).flat_keep(_mlp_params(model), "cuda")
    assert keep.is_cuda
    assert torch.equal(keep, torch.cat([controller.mask_for(n, device="cuda").reshape(-1) for n in names]))
    flat = torch.randn(keep.numel(), device="cuda")
    out = unpack_(flat.clone(), keep, pack(flat, keep))
    assert out.is_cuda and torch.equal(out, flat * keep)


def test_the_exchange_takes_the_hooks_flags_instead_of_drawing_again(monkeypatch):
    """With an exchange attached, the hook holds the flags it drew until the reduction takes them: the
    reduction draws nothing, gets the hook's mask, and leaves nothing held; a stale counter is redrawn."""
    from sg_distributed.graddrop import masking

    model = make_tiny_llama()
    controller = apply_graddrop(model, GradDropConfig(drop_prob=0.7, seed=2, target_modules=TARGETS))
    kept = KeptEntries(controller)
    names = [n for n, p in model.named_parameters() if n.endswith(("up_proj.weight", "down_proj.weight"))]
    ids = torch.randint(0, 128, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    model(input_ids=ids, labels=ids).loss.backward()  # a second backward (no_sync-like) overwrites, never grows
    assert len(controller._flags_for_exchange) == len(names)
    draws = []
    real = masking._draw_drop
    monkeypatch.setattr(masking, "_draw_drop", lambda *a, **k: draws.append(a) or real(*a, **k))
    keep = kept.flat_keep(_mlp_params(model), "cpu")
    assert draws == [] and controller._flags_for_exchange == {}
    assert torch.equal(keep, torch.cat([controller.mask_for(n).reshape(-1) for n in names]))
    model(input_ids=ids, labels=ids).loss.backward()
    controller.step()  # flags of the old counter are not used for the new one
    draws.clear()
    keep = kept.flat_keep(_mlp_params(model), "cpu")
    assert len(draws) == len(names)
    assert torch.equal(keep, torch.cat([controller.mask_for(n).reshape(-1) for n in names]))
