"""get_sparsegrad_model end to end on tiny models: conversion, calibration's choices against dense float64,
optimizer state, quantized bases, and the research wrapper's reference mode (its math and persistence)."""
import copy
import json

import pytest
import torch
from torch import nn

from sg_distributed import SparseGradConfig, SparseGradModel, get_sparsegrad_model
from sg_distributed.sparsegrad.layer import ReferenceSparseGradLinear, SparseGradLinear
from sg_distributed.sparsegrad.optim import clear_masks

from conftest import calibrated, cls_batches, lm_batches, make_tiny_bert, make_tiny_llama, quantize_linears


def train_steps(model, optimizer, batches, steps):
    losses = []
    for batch in batches[:steps]:
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("factory,batches,config", [
    (make_tiny_llama, lm_batches(), SparseGradConfig(density=0.05)),
    (make_tiny_bert, cls_batches(), SparseGradConfig(density=0.05, max_rows=0.5, max_cols=0.5)),
])
def test_conversion_leaves_outputs_unchanged(factory, batches, config):
    reference = factory()
    model = calibrated(factory(), config, batches)
    converted = model.converted_layers()
    assert len(converted) == 4 and all(isinstance(m, SparseGradLinear) for m in converted.values())
    with torch.no_grad():
        expected = reference(input_ids=batches[0]["input_ids"]).logits
        got = model(input_ids=batches[0]["input_ids"]).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_bert_defaults_pick_mlp_layers_not_attention_output(tiny_bert):
    names = list(get_sparsegrad_model(tiny_bert).converted_layers())
    assert names and all("attention" not in n for n in names)
    assert sorted({n.split(".")[-2] for n in names}) == ["intermediate", "output"]


def test_block_stride_selects_every_third_block():
    model = get_sparsegrad_model(make_tiny_llama(layers=7), SparseGradConfig(block_stride=3))
    assert sorted({int(n.split(".")[2]) for n in model.converted_layers()}) == [0, 3, 6]


def test_adam_state_is_two_k_values_per_matrix():
    model = calibrated(make_tiny_llama(), SparseGradConfig(k=37), lm_batches())
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-2)
    train_steps(model, optimizer, lm_batches(seed=5), 2)
    layers = model.converted_layers()
    assert [p.numel() for p in model.trainable_parameters()] == [37] * len(layers)
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t) and t.numel() > 1]
    assert sum(t.numel() for t in state) == 2 * 37 * len(layers)
    assert all(layer.sparsegrad_values.abs().sum() > 0 for layer in layers.values())


def test_training_before_calibration_is_refused(tiny_llama):
    for config in (SparseGradConfig(), SparseGradConfig(support_mode="reference")):
        model = get_sparsegrad_model(copy.deepcopy(tiny_llama), config)
        with pytest.raises(RuntimeError, match="calibrate"):
            model(**lm_batches()[0])
    with pytest.raises(RuntimeError, match="calibrate"):
        model.make_optimizer(lr=1e-3)


@pytest.mark.parametrize("bits", [8, 4])
def test_quantized_base_stays_bit_identical_and_loss_falls(bits):
    base = make_tiny_llama()
    names = [n for n, _ in base.named_modules() if n.endswith(("up_proj", "down_proj"))]
    quantize_linears(base, names, bits=bits)
    before = {n: base.get_submodule(n).weight.detach().clone() for n in names}
    assert all(w.dtype == (torch.int8 if bits == 8 else torch.uint8) for w in before.values())
    model = calibrated(base, SparseGradConfig(density=0.2, max_rows=None, max_cols=None), lm_batches())
    batch = lm_batches(seed=3)[:1] * 20  # overfit one batch: the loss must fall
    losses = train_steps(model, torch.optim.AdamW(model.trainable_parameters(), lr=3e-2), batch, 20)
    assert losses[-1] < losses[0] - 0.05
    for n in names:
        assert torch.equal(model.get_base_model().get_submodule(n).base_layer.weight, before[n])


def test_reference_mode_equals_sparse_adam_restatement():
    """Reference mode for 3 steps vs an independent float64 restatement using torch.optim.SparseAdam."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 6), nn.LayerNorm(6)).double()
    original = copy.deepcopy(net)
    g = torch.Generator().manual_seed(3)
    data = [(torch.randn(5, 6, generator=g, dtype=torch.float64), torch.randn(5, 6, generator=g, dtype=torch.float64))
            for _ in range(4)]
    loss_fn = lambda model, batch: ((model(batch[0]) - batch[1]) ** 2).mean()
    k = 7
    config = SparseGradConfig(target_modules=["0", "2"], k=k, support_mode="reference")
    model = calibrated(net, config, data, loss_fn=loss_fn)
    assert all(isinstance(m, ReferenceSparseGradLinear) for m in model.converted_layers().values())
    optimizer = model.make_optimizer(lr=0.05)
    for batch in data[:3]:
        loss_fn(model, batch).backward()
        optimizer.step()
        optimizer.zero_grad()
        clear_masks(model.trainable_parameters())

    # Restatement: W~ = P^T W R dense leaves, top-k of |dL/dW~| per backward, SparseAdam everywhere.
    assert model.basis_keys == {"0": "*@10x6", "2": "*@6x10"}  # same type name, different shapes
    P = {i: model.bases[model.basis_key(str(i))].P for i in (0, 2)}
    R = {i: model.bases[model.basis_key(str(i))].R for i in (0, 2)}
    Wt = {i: (P[i].T @ original[i].weight.detach() @ R[i]).clone().requires_grad_(True) for i in (0, 2)}
    b = {i: original[i].bias.detach().clone().requires_grad_(True) for i in (0, 2)}
    ln = original[3]
    leaves = [Wt[0], Wt[2], b[0], b[2], ln.weight, ln.bias]
    sparse_adam = torch.optim.SparseAdam(leaves, lr=0.05)

    def forward(x):
        h = x @ R[0] @ Wt[0].T @ P[0].T + b[0]
        h = torch.nn.functional.gelu(h)
        h = h @ R[2] @ Wt[2].T @ P[2].T + b[2]
        return ln(h)

    for x, y in data[:3]:
        ((forward(x) - y) ** 2).mean().backward()
        for leaf in leaves:
            grad = leaf.grad
            if leaf is Wt[0] or leaf is Wt[2]:
                keep = torch.zeros(grad.numel(), dtype=torch.bool)
                keep[torch.topk(grad.abs().reshape(-1), k).indices] = True
                idx = keep.view_as(grad).nonzero().T
            else:
                idx = torch.ones_like(grad, dtype=torch.bool).nonzero().T
            leaf.grad = torch.sparse_coo_tensor(idx, grad[tuple(idx)], grad.shape)
        sparse_adam.step()
        sparse_adam.zero_grad()

    layers = model.converted_layers()
    for i in (0, 2):
        torch.testing.assert_close(layers[str(i)].rotated_weight.detach(), Wt[i].detach(), atol=1e-10, rtol=0)
        torch.testing.assert_close(layers[str(i)].bias.detach(), b[i].detach(), atol=1e-10, rtol=0)
    torch.testing.assert_close(model.get_submodule("3").weight.detach(), ln.weight.detach(), atol=1e-10, rtol=0)
    moved = (layers["0"].rotated_weight.detach() != (P[0].T @ original[0].weight.detach() @ R[0])).sum().item()
    assert k <= moved <= 3 * k  # only selected entries moved


def test_nonfinite_gradients_raise_or_skip(tiny_llama):
    model = calibrated(tiny_llama, SparseGradConfig(k=5, support_mode="reference"), lm_batches())
    layer = next(iter(model.converted_layers().values()))
    layer.rotated_weight.grad = torch.full_like(layer.rotated_weight, float("nan"))
    with pytest.raises(FloatingPointError, match="model.layers.0.mlp.up_proj.rotated_weight"):
        model.grads_are_finite("raise")
    assert model.grads_are_finite("skip") is False and model.skipped_steps == 1
    assert layer.rotated_weight.grad is None
    # one bad gradient among finite ones is found and named (the check reads every flag at once)
    layers = list(model.converted_layers().items())
    for _, other in layers:
        other.rotated_weight.grad = torch.zeros_like(other.rotated_weight)
    assert len(layers) > 1 and model.grads_are_finite("raise") is True
    name, last = layers[-1]
    last.rotated_weight.grad[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match=f"{name}.rotated_weight"):
        model.grads_are_finite("raise")


@pytest.mark.parametrize("kwargs,message", [
    (dict(target_modules=["up_prj"]), r"'up_prj' matches no nn.Linear.*up_proj"),
    (dict(k=10**9), r"k=1000000000 exceeds the 64x32=2048 entries of layer 'model.layers.0.mlp.up_proj'"),
    (dict(blocks=[5]), r"blocks \[5\] do not exist"),
])
def test_bad_targets_are_named(tiny_llama, kwargs, message):
    with pytest.raises(ValueError, match=message):
        get_sparsegrad_model(tiny_llama, SparseGradConfig(**kwargs))


def test_reference_quirks_rotated_bias_grad_and_frozen_layernorm():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 10), nn.GELU(), nn.Linear(10, 6), nn.LayerNorm(6)).double()
    data = [(torch.randn(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)) for _ in range(2)]
    loss_fn = lambda model, batch: ((model(batch[0]) - batch[1]) ** 2).mean()
    config = SparseGradConfig(target_modules=["2"], k=7, support_mode="reference",
                              reference_rotated_bias_grad=True, reference_freeze_layernorm=True)
    model = calibrated(net, config, data, loss_fn=loss_fn)
    layer = model.get_submodule("2")
    assert not model.get_submodule("3").weight.requires_grad  # LayerNorm left untrained
    upstream = torch.randn(5, 6, dtype=torch.float64)
    x = torch.randn(5, 10, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()
    torch.testing.assert_close(layer.bias.grad, upstream.sum(0) @ layer.P)  # the authors' rotated bias gradient
    assert not torch.allclose(layer.bias.grad, upstream.sum(0))


def test_wrapper_config_is_the_hf_config_and_peft_config_is_ours(tiny_llama):
    model = get_sparsegrad_model(tiny_llama, SparseGradConfig(k=5, support_mode="reference"))
    assert model.config.model_type == "llama"
    assert isinstance(model.peft_config, SparseGradConfig) and model.peft_config.k == 5


def test_reference_mode_adapter_carries_the_trained_norms(tmp_path):
    batches = lm_batches()
    model = calibrated(make_tiny_llama(), SparseGradConfig(k=20, support_mode="reference"), batches)
    optimizer = model.make_optimizer(lr=1e-2)
    train_steps(model, optimizer, lm_batches(seed=8), 2)
    norm = model.get_submodule("model.norm").weight
    assert norm.requires_grad and not torch.equal(norm, torch.ones_like(norm))
    model.save_pretrained(tmp_path)
    loaded = SparseGradModel.from_pretrained(make_tiny_llama(), tmp_path)
    ids = lm_batches(seed=9)[0]["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, atol=0, rtol=0)


def test_layers_of_one_type_share_the_basis_and_no_float64_copy_stays():
    """Fixed mode keeps one P, R per layer type, an fp32 master (the layers read their slices at each use):
    no per-layer slices, no float64 calibration copy."""
    model = calibrated(make_tiny_llama(), SparseGradConfig(density=0.05, max_rows=0.5, max_cols=0.5))
    layers = model.converted_layers()
    by_key = {}
    for name, layer in layers.items():
        by_key.setdefault(model.basis_keys[name], set()).add(id(layer.basis))
    assert sorted(len(ids) for ids in by_key.values()) == [1, 1] and len(layers) == 4
    assert {t.dtype for basis in model.shared_bases.values() for t in basis.tensors()} == {torch.float32}
    for shared in model.shared_bases.values():
        assert shared.P.data_ptr() == shared.Pt.data_ptr()  # P is a view of the one stored copy
        torch.testing.assert_close(shared.P.T @ shared.P, torch.eye(shared.P.shape[0]), atol=1e-5, rtol=0)


def test_a_budget_gives_every_layer_of_a_type_one_block_shape():
    """Under a row/column budget each layer computes with exactly the budget's rows x cols (the block its
    support was chosen in), not just the rows and cols the support touches: one GEMM shape per layer type
    (bounded kernel caches, compiled graphs), and re-selection can grow anywhere in that block."""
    config = SparseGradConfig(density=0.02, max_rows=0.5, max_cols=0.25)
    model = calibrated(make_tiny_llama(), config, lm_batches())
    shapes = {}
    for name, layer in model.converted_layers().items():
        m, n = layer.out_features, layer.in_features
        block = (layer.structure.r, layer.structure.c)
        assert block == config.block_budget(m, n), name
        support = layer.support
        assert torch.isin(support.rows, layer.rows_used).all() and torch.isin(support.cols, layer.cols_used).all()
        shapes.setdefault(model.basis_keys[name], set()).add(block)
    assert all(len(s) == 1 for s in shapes.values())
    # the support alone would touch fewer rows than the budget: the test would fail on touched rows
    assert any(torch.unique(l.support.rows).numel() < l.structure.r for l in model.converted_layers().values())


@pytest.mark.parametrize("score", ["abs", "square"])
@pytest.mark.parametrize("budget", [dict(max_rows=0.5, max_cols=0.25, budget_block="scored"),
                                    dict(max_rows=None, max_cols=None),
                                    dict(max_rows=0.5, max_cols=0.25, budget_block="leading")])
def test_supports_equal_top_k_of_the_dense_float64_score(score, budget, monkeypatch):
    """Calibration scores a budget's rows/columns first and then only the chosen block (no m x n score per
    layer); a leading block skips the row/column pass. Independent computation: the dense weight gradient of
    every batch by autograd, rotated as P^T G R in float64, |.| or ^2 summed, then ``select_support`` on the
    whole matrix (or its top k in the leading r x c corner)."""
    import sg_distributed.sparsegrad.calibration as calibration_module
    from sg_distributed.sparsegrad.selection import leading_block, select_support, top_k_in_block

    passes = []
    real_passes = calibration_module.run_backward_passes
    monkeypatch.setattr(calibration_module, "run_backward_passes", lambda *a, **k: passes.append(a[3]) or real_passes(*a, **k))
    base, batches = make_tiny_llama(seed=3).double(), lm_batches(n=3, seed=4)
    config = SparseGradConfig(density=0.05, score=score, **budget)
    model = calibrated(copy.deepcopy(base), config, batches)
    scored_block = budget["max_rows"] is not None and budget.get("budget_block") != "leading"
    assert len(passes) == (3 if scored_block else 2), passes  # Grams, [row/column sums,] block or full scores
    layers = model.converted_layers()
    totals = {name: 0 for name in layers}
    for p in base.parameters():
        p.requires_grad_(False)
    weights = {name: base.get_submodule(name).weight.requires_grad_(True) for name in layers}
    for batch in batches:
        base(**batch).loss.backward()
        for name, layer in layers.items():
            rotated = layer.basis.P.T @ weights[name].grad @ layer.basis.R
            totals[name] = totals[name] + (rotated.square() if score == "square" else rotated.abs())
            weights[name].grad = None
    for name, layer in layers.items():
        m, n = layer.out_features, layer.in_features
        if budget.get("budget_block") == "leading":
            r, c = config.block_budget(m, n)
            expected = top_k_in_block(totals[name][:r, :c], layer.k, *leading_block(r, c), (m, n))
        else:
            expected = select_support(totals[name], layer.k, *config.block_budget(m, n))
        assert torch.equal(layer.support_flat, expected.flat()), name
        if budget["max_rows"] is None:
            assert expected.block is None
        else:
            assert torch.equal(layer.rows_used, expected.block[0]) and torch.equal(layer.cols_used, expected.block[1])
