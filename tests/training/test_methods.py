"""The method switch: every method trains the same layers; LoRA's rank matches SparseGrad's budget."""
import pytest
import torch

from sg_distributed import SparseGradConfig
from sg_distributed.sparsegrad.dynamic import DynamicSparseGradLinear
from sg_distributed.training.methods import METHODS, matched_lora_rank, prepare

from conftest import lm_batches, make_tiny_llama


def test_lora_rank_matches_sparsegrad_trainable_count():
    config = SparseGradConfig(k=288, max_rows=None, max_cols=None)  # 288 / (64 + 32) = 3 per matrix
    assert matched_lora_rank(make_tiny_llama(), config) == 3
    lora = prepare("lora", make_tiny_llama(), config)
    sparse = prepare("sparsegrad", make_tiny_llama(), config, calibration_batches=lm_batches())
    assert lora.trainable_count() == sparse.trainable_count() == 4 * 288


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_only_the_target_layers(method):
    model = make_tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    prepared = prepare(method, model, SparseGradConfig(density=0.05), calibration_batches=lm_batches())
    optimizer = prepared.make_optimizer(1e-2)
    for batch in lm_batches(n=2, seed=4):
        prepared.model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        prepared.after_step()
    names = [n for n, p in prepared.model.named_parameters() if p.requires_grad]
    assert names and all("mlp" in n or "norm" in n for n in names), names
    if method in ("full", "graddrop"):
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        assert changed and all(n.endswith(("up_proj.weight", "down_proj.weight")) for n in changed)


def test_meprop_moves_the_top_k_of_the_plain_weight_gradient():
    """MeProp = per-step top-k with identity bases: the accumulated gradient is dL/dW itself and the
    entries that move are its top-k by magnitude."""
    model = make_tiny_llama()
    dense = make_tiny_llama()
    batch = lm_batches(seed=6)[0]
    dense(**batch).loss.backward()
    prepared = prepare("meprop", model, SparseGradConfig(k=20), calibration_batches=lm_batches())
    optimizer = prepared.make_optimizer(1e-3)
    prepared.model(**batch).loss.backward()
    layer = prepared.model.get_submodule("model.layers.0.mlp.up_proj")
    assert isinstance(layer, DynamicSparseGradLinear) and layer.identity
    G = dense.get_submodule("model.layers.0.mlp.up_proj").weight.grad
    torch.testing.assert_close(layer.grad_accumulator, G, atol=1e-6, rtol=1e-5)
    before = layer.rotated_weight.clone()
    optimizer.step()
    prepared.after_step()
    moved = (layer.rotated_weight != before).view(-1).nonzero().view(-1)
    assert torch.equal(moved, torch.sort(torch.topk(G.abs().view(-1), 20).indices).values)


def test_unknown_method_is_named():
    with pytest.raises(ValueError, match=r"unknown method 'adapter'.*'sparsegrad'"):
        prepare("adapter", make_tiny_llama(), SparseGradConfig())
