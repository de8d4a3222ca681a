"""PyTorch FSDP2 (fully_shard) for SparseGrad: sg_distributed.integrations.fsdp and train_qa.py --fsdp."""
import json
import os
import sys

import pytest
import torch
from safetensors.torch import load_file

from conftest import (RESELECT_ARGS, ROOT, free_port, lm_batches, make_tiny_llama, quantize_linears, run_ranks,
                      supports_reselected)
from conftest import run_train_qa as run

COMMON = ["--steps", "4", "--calibration_steps", "2", "--eval_size", "4", "--no_eval_before", "--density", "0.5",
          "--max_rows", "0", "--max_cols", "0", "--lr", "1e-2", "--micro_batch_size", "2"]




def two_ranks(*args):
    return [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
            "--master_port", str(free_port()), "launch/train_qa.py", *args]


def _calibrated():
    from peft import get_peft_model

    from sg_distributed import SparseGradConfig

    model = get_peft_model(make_tiny_llama(), SparseGradConfig(density=0.3, max_rows=None, max_cols=None))
    model.calibrate(lm_batches())
    return model


def _trainable(model):
    return [p for p in model.parameters() if p.requires_grad]


def _train(model, optimizer, batches, sync=None):
    for b in batches:
        model(**b).loss.backward()
        if sync is not None:
            sync(model)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.mark.parametrize("shard", [False, True])
def test_fsdp2_one_rank_matches_plain_training_and_kernel_sees_plain_tensors(one_rank_group, shard, monkeypatch, tmp_path):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    from sg_distributed.integrations.fsdp import apply_fsdp2, find_blocks, sync_replicated_grads
    from sg_distributed.sparsegrad.layer import _SparseDelta

    seen = []
    original = _SparseDelta.forward

    def spy(ctx, x2d, values, Pt, Rt, rows, cols, structure):
        seen.append(tuple(type(t) for t in (x2d, values, Pt, Rt)))
        return original(ctx, x2d, values, Pt, Rt, rows, cols, structure)

    monkeypatch.setattr(_SparseDelta, "forward", staticmethod(spy))
    batches = lm_batches(n=3, seed=5)
    plain = _calibrated()
    _train(plain, torch.optim.AdamW(_trainable(plain), lr=1e-2), batches)

    model = _calibrated()
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-2)  # built before sharding: re-pointed
    apply_fsdp2(model, shard_sparse_values=shard, optimizer=optimizer)
    assert len(find_blocks(model)) == 2 and isinstance(model.base_model.model, FSDPModule)
    values = [m.sparsegrad_values for m in model.converted_layers().values()]
    assert all(isinstance(v, DTensor) == shard for v in values)
    _train(model, optimizer, batches, sync=sync_replicated_grads)
    assert seen and all(t is torch.Tensor or t is torch.nn.Parameter for types in seen for t in types), seen

    model.save_pretrained(tmp_path / "adapter")  # DTensor k-vectors are gathered (world 1: no peers)
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    for name, module in plain.converted_layers().items():
        torch.testing.assert_close(saved[f"base_model.model.{name}.sparsegrad_values"], module.sparsegrad_values.detach(),
                                   atol=1e-6, rtol=0)
    assert any(v.abs().sum() > 0 for k, v in saved.items() if k.endswith("sparsegrad_values"))


def test_int8_weights_fsdp_cannot_shard_are_a_clear_error(one_rank_group):
    from torch.distributed.fsdp import fully_shard

    from sg_distributed.integrations.fsdp import FSDPSetupError, apply_fsdp2, quantized_params

    def int8_llama():
        model = make_tiny_llama(hidden=64, intermediate=128)
        return quantize_linears(model, [n for n, _ in model.named_modules() if n.endswith(("up_proj", "down_proj"))])

    batch = lm_batches(n=1)[0]
    raw = int8_llama()  # why: plain fully_shard accepts int8 weights, then bnb fails at the first forward
    for block in raw.model.layers:
        fully_shard(block)
    fully_shard(raw)
    with pytest.raises(AttributeError, match="CB"):
        raw(**batch)

    model = int8_llama()
    with pytest.raises(FSDPSetupError, match=r"not sharded.*up_proj\.weight: Int8Params.*int8 weights cannot be.*"
                                             r"bnb_4bit_quant_storage=torch\.bfloat16.*ignored_params"):
        apply_fsdp2(model, ignore_quantized=False)
    assert len(quantized_params(model)) == 4
    apply_fsdp2(model)  # default: int8 weights stay whole on every rank, the rest is sharded
    assert torch.isfinite(model(**batch).loss)


@pytest.fixture(scope="module")
def one_rank_adapter(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_rank")
    return run([sys.executable, "launch/train_qa.py", "--model", str(tiny_model_dir), *COMMON, "--grad_accum", "2"], out)[0]


@pytest.mark.multiprocess
@pytest.mark.parametrize("shard", [False, True], ids=["replicated", "sharded"])
def test_two_rank_fsdp2_equals_one_rank(shard, tiny_model_dir, one_rank_adapter, tmp_path):
    extra = ["--fsdp_shard_sparse_values"] if shard else []
    two_rank, stdout = run(two_ranks("--model", str(tiny_model_dir), *COMMON, "--grad_accum", "1", "--fsdp", *extra),
                           tmp_path)
    assert "world size 2" in stdout and "all_gather_into_tensor" not in stdout  # table is by label
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["fsdp"] is True and metrics["after"]["num_examples"] == 4
    assert metrics["comm_bytes_per_step"]["payload"] > 0
    assert sorted(two_rank) == sorted(one_rank_adapter)
    for key in one_rank_adapter:
        torch.testing.assert_close(two_rank[key], one_rank_adapter[key], atol=1e-5, rtol=0, msg=key)
    assert any(one_rank_adapter[k].abs().sum() > 0 for k in one_rank_adapter if k.endswith("sparsegrad_values"))


@pytest.mark.multiprocess
def test_two_rank_fsdp2_bf16_equals_one_rank_bf16(tiny_model_dir, tmp_path):
    """bf16 weights under FSDP2's MixedPrecisionPolicy (bf16 all-gather and compute, fp32 reduction) against one
    process with bf16 weights: every micro-batch runs the same bf16 kernels and the replicated fp32 k-vectors
    average two fp32 gradients exactly, so the fp32 tolerance holds (measured: bit-identical here)."""
    bf16 = ("--precision", "bf16")
    one_rank = run([sys.executable, "launch/train_qa.py", "--model", str(tiny_model_dir), *COMMON, *bf16,
                    "--grad_accum", "2"], tmp_path / "one")[0]
    two_rank, _ = run(two_ranks("--model", str(tiny_model_dir), *COMMON, *bf16, "--grad_accum", "1", "--fsdp"),
                      tmp_path / "two")
    assert sorted(two_rank) == sorted(one_rank)
    values = [k for k in one_rank if k.endswith("sparsegrad_values")]
    assert all(two_rank[k].dtype == torch.float32 for k in values)
    for key in one_rank:
        torch.testing.assert_close(two_rank[key], one_rank[key], atol=1e-5, rtol=0, msg=key)
    assert any(one_rank[k].abs().sum() > 0 for k in values)


@pytest.mark.multiprocess
def test_two_rank_fsdp2_reselection_equals_one_rank(tiny_model_dir, tmp_path):
    """Replicated k-vectors (the default) keep a plain torch optimizer: swaps work as under DDP."""
    one_rank = run([sys.executable, "launch/train_qa.py", "--model", str(tiny_model_dir), *COMMON, *RESELECT_ARGS,
                    "--grad_accum", "2"], tmp_path / "one")[0]
    two_rank, _ = run(two_ranks("--model", str(tiny_model_dir), *COMMON, *RESELECT_ARGS, "--grad_accum", "1",
                                "--fsdp"), tmp_path / "two")
    assert supports_reselected(one_rank)
    assert sorted(two_rank) == sorted(one_rank)
    for key in one_rank:
        torch.testing.assert_close(two_rank[key], one_rank[key], atol=1e-5, rtol=0, msg=key)


@pytest.mark.multiprocess
@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_under_fsdp2_trains_and_stays_bit_identical(bits, tiny_model_dir, tmp_path):
    # nf4 works at hidden 32 because train_qa.py turns off bnb's CPU eval repacking (which crashed for
    # in_features < 64 and, for larger layers, rewrote the frozen weight into an inference-only layout).
    run(two_ranks("--model", str(tiny_model_dir), f"--load_in_{bits}bit", "--fsdp", "--steps", "12", "--eval_size", "8",
                  "--density", "0.5", "--max_rows", "0", "--max_cols", "0", "--lr", "3e-2", "--micro_batch_size", "2",
                  "--calibration_steps", "2"), tmp_path)
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["quantized_base_digest_before"] is not None
    assert metrics["quantized_base_digest_after"] == metrics["quantized_base_digest_before"]
    assert metrics["after"]["answer_loss"] < metrics["before"]["answer_loss"] - 0.05
    # --fsdp loads a 4-bit base packed into bf16 words, which FSDP2 shards; int8 stays whole on every rank
    sharded = metrics["quantized_base_bytes_per_rank"] / metrics["quantized_base_bytes"]
    assert sharded == (0.5 if bits == 4 else 1.0), sharded


def _quantized_peft_llama(bits: int, quant_storage=torch.uint8):
    """Tiny Llama (hidden 64) with MLP and q/v linears in bnb int8 or nf4, SparseGrad (peft) on up/down, calibrated."""
    from peft import get_peft_model

    from sg_distributed import SparseGradConfig
    from sg_distributed.quant import keep_cpu_nf4_trainable

    base = make_tiny_llama(hidden=64, intermediate=128)
    names = [n for n, _ in base.named_modules() if n.endswith(("up_proj", "down_proj", "q_proj", "v_proj"))]
    keep_cpu_nf4_trainable(quantize_linears(base, names, bits=bits, quant_storage=quant_storage))
    model = get_peft_model(base, SparseGradConfig(density=0.3, max_rows=None, max_cols=None))
    model.calibrate(lm_batches())
    return model


@pytest.mark.parametrize("bits", [8, 4], ids=["int8", "nf4-uint8"])
def test_int8_and_uint8_stored_4bit_stay_whole_on_every_rank_and_train(one_rank_group, bits):
    from sg_distributed.integrations.fsdp import FSDPSetupError, apply_fsdp2, quantized_params, sync_replicated_grads
    from sg_distributed.quant import quantized_storage_bytes, quantized_weights_digest

    model = _quantized_peft_llama(bits)
    weights = {n: p for n, p in model.named_parameters() if p in quantized_params(model) and n.endswith("weight")}
    assert len(weights) == 8
    kind = "Int8Params" if bits == 8 else "Params4bit"
    with pytest.raises(FSDPSetupError, match=rf"not sharded.*\.weight: {kind}, torch\.u?int8.*"
                                             rf"bnb_4bit_quant_storage=torch\.bfloat16.*ignored_params"):
        apply_fsdp2(model, ignore_quantized=False)
    whole, digest = quantized_storage_bytes(model), quantized_weights_digest(model)
    before = [m.sparsegrad_values.detach().clone() for m in model.converted_layers().values()]
    optimizer = torch.optim.AdamW(_trainable(model), lr=1e-2)
    apply_fsdp2(model, optimizer=optimizer)

    after_sharding = dict(model.named_parameters())
    assert all(after_sharding[n] is p and type(p).__name__ == kind for n, p in weights.items())  # untouched objects
    assert quantized_storage_bytes(model) == whole
    _train(model, optimizer, lm_batches(n=2, seed=5), sync=sync_replicated_grads)
    assert quantized_weights_digest(model) == digest
    assert all(not torch.equal(m.sparsegrad_values.detach(), b) for m, b in zip(model.converted_layers().values(), before))


def test_float_stored_4bit_is_sharded_and_never_cast(one_rank_group):
    from torch.distributed.tensor import DTensor

    from sg_distributed.integrations.fsdp import FSDPSetupError, apply_fsdp2, shardable_4bit_weights
    from sg_distributed.quant import dequantized_weight, quantized_storage_bytes, quantized_weights_digest
    from sg_distributed.sparsegrad.layer import compute_dtype_of

    model = _quantized_peft_llama(4, quant_storage=torch.bfloat16)
    up = model.base_model.model.model.layers[0].mlp.up_proj.base_layer
    # the packed bf16 words are storage, not a compute dtype: the bases and k-vectors stay fp32
    assert up.weight.dtype == torch.bfloat16 and compute_dtype_of(up) == torch.float32
    assert len(shardable_4bit_weights(model)) == 8
    weight, digest, whole = dequantized_weight(up), quantized_weights_digest(model), quantized_storage_bytes(model)
    with_scales = quantized_storage_bytes(model, scales=True)
    packed = sum(m.in_features * m.out_features for m in model.modules() if type(m).__name__ == "Linear4bit") // 2
    assert whole == packed and with_scales > whole  # nf4: half a byte per weight; then absmax and code tables

    fp32_words = _quantized_peft_llama(4, quant_storage=torch.float32)
    with pytest.raises(FSDPSetupError, match=r"layers\.0\.self_attn\.q_proj\.weight packs 4-bit codes into "
                                             r"torch\.float32 words.*param_dtype=torch\.bfloat16.*bnb_4bit_quant_storage"):
        apply_fsdp2(fp32_words, param_dtype=torch.bfloat16)

    apply_fsdp2(model, param_dtype=torch.bfloat16)  # bf16 words under a bf16 policy: nothing to cast
    assert isinstance(up.weight, DTensor) and up.quant_state is not None
    assert quantized_storage_bytes(model) == whole  # one rank holds every row
    torch.testing.assert_close(dequantized_weight(up), weight, atol=0, rtol=0)  # gathered, dequantised with the module's state
    assert quantized_weights_digest(model) == digest
    assert torch.isfinite(model(**lm_batches(n=1)[0]).loss)


@pytest.mark.multiprocess
def test_two_rank_fsdp2_shards_a_bf16_stored_nf4_base_and_equals_one_process(tmp_path):
    """FSDP-QLoRA for SparseGrad: the packed nf4 words (bf16 storage) are split over 2 gloo ranks and all-gathered
    per block; losses and k-vectors equal one process on the same global batch (fp32 compute; measured: 6e-7 on
    k-vectors of magnitude 3e-2, losses within 5e-7), each rank holds half of the packed bytes, and the bytes
    are unchanged by training."""
    import fsdp_4bit_worker as worker

    out = tmp_path / "fsdp_4bit.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(ROOT / "tests" / "fsdp_4bit_worker.py"), "--out", str(out)]
    proc = run_ranks(cmd, env={**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}, timeout=180)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())

    reference = worker.build_model()
    optimizer = torch.optim.AdamW(_trainable(reference), lr=worker.LR)
    losses = []
    for batch in worker.global_batches():
        loss = reference(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    expected = worker.k_vectors(reference)

    assert result["world"] == 2 and result["sharded_weight_types"] == ["DTensor"] * 4
    torch.testing.assert_close(torch.tensor(result["losses"]), torch.tensor(losses), atol=1e-5, rtol=0)
    for rank in result["ranks"]:
        assert sorted(rank["k_vectors"]) == sorted(expected)
        for name, values in expected.items():
            torch.testing.assert_close(torch.tensor(rank["k_vectors"][name]), torch.tensor(values), atol=1e-5, rtol=0,
                                       msg=name)
        assert rank["local_bytes"] <= 0.55 * result["whole_bytes"], (rank["local_bytes"], result["whole_bytes"])
    assert sum(rank["local_bytes"] for rank in result["ranks"]) == result["whole_bytes"]
    assert any(abs(v) > 0 for values in expected.values() for v in values)
    assert result["digest_before"] == result["digest_after"]
