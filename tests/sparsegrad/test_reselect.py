"""Drop-and-grow re-selection: the swap plan, slot-order supports, growth scores and the optimizer reset,
each against an independent computation (brute force / dense float64 autograd)."""
import pytest
import torch
from peft import PeftModel

from sg_distributed import SparseGradConfig
from sg_distributed.sparsegrad.layer import SparseGradLinear
from sg_distributed.sparsegrad.reselect import SupportReselector, plan_swap
from sg_distributed.sparsegrad.selection import Support
from conftest import calibrated, lm_batches, make_layer, make_tiny_llama


def brute_force_plan(values, score, support_block, count):
    """The plan restated with Python sorting: smallest |v| slots, largest unused positive scores."""
    used = set(support_block.tolist())
    free = [(-float(s), i) for i, s in enumerate(score.tolist()) if i not in used and s > 0]
    count = min(count, len(free), len(values))
    grown = [i for _, i in sorted(free)[:count]]
    slots = [i for _, i in sorted((abs(float(v)), i) for i, v in enumerate(values.tolist()))[:count]]
    return slots, grown


@pytest.mark.parametrize("seed", range(4))
def test_plan_swap_matches_brute_force(seed):
    g = torch.Generator().manual_seed(seed)
    values = torch.randint(-3, 4, (12,), generator=g).double()  # many ties in |v|
    score = torch.randint(0, 5, (40,), generator=g).float()  # zeros are never grown, ties break by index
    support_block = torch.randperm(40, generator=g)[:12]
    slots, grown = plan_swap(values, score, support_block, count=5)
    ref_slots, ref_grown = brute_force_plan(values, score, support_block, 5)
    assert slots.tolist() == ref_slots and grown.tolist() == ref_grown
    assert not set(grown.tolist()) & set(support_block.tolist())


def test_plan_swap_grows_no_more_than_the_positive_scores():
    values = torch.tensor([0.5, -0.1, 0.3])
    score = torch.tensor([0.0, 2.0, 0.0, 0.0, 1.0])
    slots, grown = plan_swap(values, score, torch.tensor([0, 2, 4]), count=3)
    assert slots.tolist() == [1] and grown.tolist() == [1]


@pytest.mark.parametrize("budget", [None, (6, 9)])
def test_slot_order_support_matches_dense_float64(budget):
    """A support whose slots are not row-major (after re-selection) computes what its dense S computes."""
    m, n, k = 20, 32, 25
    base, P, R, support, _ = make_layer(m, n, k, budget)
    perm = torch.randperm(k, generator=torch.Generator().manual_seed(3))
    shuffled = Support(support.rows[perm], support.cols[perm], support.shape)
    values = torch.randn(k, dtype=torch.float64)
    layer = SparseGradLinear(base, P, R, shuffled, values=values, dtype=torch.float64)
    assert not layer.structure.in_order
    x = torch.randn(4, n, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(4, m, dtype=torch.float64)
    (layer(x) * upstream).sum().backward()

    S = torch.zeros(m, n, dtype=torch.float64)
    S[shuffled.rows, shuffled.cols] = values
    y_ref = x.detach() @ (base.weight.detach() + P @ S @ R.T).T + base.bias.detach()
    rotated = P.T @ (upstream.T @ x.detach()) @ R
    torch.testing.assert_close(layer(x.detach()), y_ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(layer.sparsegrad_values.grad, rotated[shuffled.rows, shuffled.cols], rtol=0, atol=1e-10)
    assert layer.support.rows.tolist() == shuffled.rows.tolist()  # slot order survives


@pytest.mark.parametrize("square", [False, True])
def test_growth_scores_sum_the_rotated_block_gradient(square):
    m, n, k = 24, 40, 30
    base, P, R, support, layer = make_layer(m, n, k, budget=(6, 10))
    score = layer.start_scoring(square)
    expected = torch.zeros(layer.structure.r, layer.structure.c, dtype=torch.float64)
    for step in range(3):
        x = torch.randn(5, n, dtype=torch.float64)
        upstream = torch.randn(5, m, dtype=torch.float64)
        (layer(x) * upstream).sum().backward()
        block = (P.T @ (upstream.T @ x) @ R)[layer.rows_used][:, layer.cols_used]  # independent: dense G~
        expected += block.square() if square else block.abs()
    torch.testing.assert_close(score.double().view_as(expected), expected, rtol=1e-5, atol=1e-6)


def test_scoring_without_a_budget_is_a_clear_error():
    *_, layer = make_layer(24, 40, 30, budget=None)
    with pytest.raises(ValueError, match="dense-block kernel.*max_rows/max_cols"):
        layer.start_scoring()


def test_reselection_swaps_entries_and_resets_their_adam_state():
    m, n, k = 24, 40, 30
    base, P, R, support, layer = make_layer(m, n, k, budget=(8, 12))
    optimizer = torch.optim.AdamW([layer.sparsegrad_values], lr=1e-2, weight_decay=0.0)
    reselector = SupportReselector({"layer": layer}, every=2, fraction=0.3, optimizer=optimizer)
    x, target = torch.randn(16, n, dtype=torch.float64), torch.randn(16, m, dtype=torch.float64)
    for step in range(2):
        optimizer.zero_grad()
        ((layer(x) - target) ** 2).mean().backward()
        optimizer.step()
        if step == 0:
            assert reselector.step() is None
    before_flat = layer.support_flat.clone()
    before_values = layer.sparsegrad_values.detach().clone()
    before_state = {key: optimizer.state[layer.sparsegrad_values][key].clone() for key in ("exp_avg", "exp_avg_sq")}
    score = layer.structure.score.clone()
    slots, grown = plan_swap(before_values, score, layer.structure.flat, round(0.3 * k))

    record = reselector.step()

    assert record == {"step": 2, "swapped": 9, "entries": k} and slots.numel() == 9
    kept = torch.ones(k, dtype=torch.bool)
    kept[slots] = False
    assert torch.equal(layer.support_flat[kept], before_flat[kept])
    c = layer.cols_used.numel()
    expected_new = layer.rows_used[grown // c] * n + layer.cols_used[grown % c]
    assert torch.equal(layer.support_flat[slots], expected_new)
    assert torch.equal(layer.sparsegrad_values.detach()[kept], before_values[kept])
    assert not layer.sparsegrad_values.detach()[slots].any()
    for key, old in before_state.items():
        new = optimizer.state[layer.sparsegrad_values][key]
        assert torch.equal(new[kept], old[kept]) and not new[slots].any()
    assert not layer.structure.score.any()  # scores restart after each re-selection

    # Independent: the layer computes W0 + P S R^T with the new support (dense float64)
    S = torch.zeros(m * n, dtype=torch.float64)
    S[layer.support_flat] = layer.sparsegrad_values.detach()
    y_ref = x @ (base.weight.detach() + P @ S.view(m, n) @ R.T).T + base.bias.detach()
    torch.testing.assert_close(layer(x).detach(), y_ref, rtol=0, atol=1e-12)
    # training goes on: the grown slots receive gradients at their new entries
    optimizer.zero_grad()
    ((layer(x) - target) ** 2).mean().backward()
    rotated = P.T @ (2 * (layer(x) - target).detach().T @ x / (16 * m)) @ R
    torch.testing.assert_close(layer.sparsegrad_values.grad, rotated.reshape(-1)[layer.support_flat], rtol=0, atol=1e-10)


def test_reselected_adapter_round_trips_in_slot_order(tmp_path):
    config = SparseGradConfig(density=0.05, max_rows=0.5, max_cols=0.5, reselect_every=1, reselect_fraction=0.5)
    wrapped = calibrated(make_tiny_llama(), config)
    optimizer = torch.optim.AdamW(wrapped.trainable_parameters(), lr=5e-2)
    reselector = wrapped.make_reselector(optimizer)
    for batch in lm_batches(seed=7)[:2]:
        optimizer.zero_grad()
        wrapped(**batch).loss.backward()
        optimizer.step()
        reselector.step()
    assert [r["step"] for r in reselector.history] == [1, 2] and all(r["swapped"] > 0 for r in reselector.history)
    layers = wrapped.converted_layers()
    assert any(not layer.structure.in_order for layer in layers.values())  # swaps left slots out of row order
    ids = lm_batches(seed=9)[0]["input_ids"]
    with torch.no_grad():
        expected = wrapped(input_ids=ids).logits
    wrapped.save_pretrained(tmp_path / "adapter")

    restored = PeftModel.from_pretrained(make_tiny_llama(), tmp_path / "adapter", is_trainable=True)
    for name, layer in restored.converted_layers().items():
        assert torch.equal(layer.support_flat, layers[name].support_flat)
        assert torch.equal(layer.rows_used, layers[name].rows_used) and torch.equal(layer.cols_used, layers[name].cols_used)
    assert restored.active_peft_config.reselect_every == 1  # training resumed from the adapter keeps re-selecting
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, expected, rtol=0, atol=0)


@pytest.mark.parametrize("bad,match", [
    (dict(reselect_every=5, max_rows=None, max_cols=None), "needs a row/column budget"),
    (dict(reselect_every=5, max_rows=0.25, support_mode="dynamic"), "re-selects a fixed support"),
    (dict(reselect_fraction=0.0), "reselect_fraction must be in"),
])
def test_bad_reselect_config_is_named(bad, match):
    with pytest.raises(ValueError, match=match):
        SparseGradConfig(**bad)
