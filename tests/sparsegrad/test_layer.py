"""SparseGradLinear against dense float64 autograd: forward, dL/dv, dX, and no m x n tensor in backward."""
import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from sg_distributed.sparsegrad.layer import SparseGradLinear, fold_into_input_side, fold_into_output_side
from sg_distributed.sparsegrad.selection import Support, leading_block, select_support, top_k_in_block


from conftest import make_layer, orthogonal


@pytest.mark.parametrize("convention", ["textbook", "reference"])
@pytest.mark.parametrize("budget", [None, (5, 7)])
def test_gradients_match_dense_rotated_gradient(convention, budget):
    m, n, k = 24, 40, 30
    base, P, R, support, layer = make_layer(m, n, k, budget, convention=convention)
    assert layer.structure.dense_block == (budget is not None)
    check_against_dense_float64(base, P, R, support, layer, tokens=(3, 5))


# (m, n, block, tokens) -> (S folded into P_I^T in forward, S folded into R_C^T for dX): every product order
@pytest.mark.parametrize("m, n, block, tokens, folds", [
    (48, 16, (24, 4), 64, (True, False)),   # up_proj-like: r > c
    (16, 48, (4, 24), 64, (False, True)),   # down_proj-like: c > r
    (48, 16, (24, 4), 1, (False, False)),   # one token: folding never pays
])
def test_every_product_order_matches_dense_float64(m, n, block, tokens, folds):
    r, c = block
    assert (fold_into_output_side(tokens, r, c, m), fold_into_input_side(tokens, r, c, n)) == folds
    base, P, R, support, layer = make_layer(m, n, r * c, block)  # the whole block: touched == budget
    assert layer.structure.dense_block and (layer.structure.r, layer.structure.c) == block
    check_against_dense_float64(base, P, R, support, layer, tokens=(tokens,))


class OpLog(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append((str(func), tuple(args[0].shape) if args and isinstance(args[0], torch.Tensor) else None))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("m, n, block", [(48, 16, (24, 4)), (16, 48, (4, 24))])
def test_leading_block_reads_bases_as_views_and_matches_dense_float64(m, n, block):
    """budget_block='leading': rows/cols 0..r-1 of P^T / R^T are contiguous slices, never gathered."""
    r, c = block
    torch.manual_seed(0)
    base = nn.Linear(n, m, dtype=torch.float64)
    P, R = orthogonal(m, 1), orthogonal(n, 2)
    support = top_k_in_block(torch.rand(r, c, dtype=torch.float64), r * c // 3, *leading_block(r, c), (m, n))
    layer = SparseGradLinear(base, P, R, support, values=torch.randn(support.k, dtype=torch.float64),
                             dtype=torch.float64, block=support.block)
    assert (layer._slice_index(0), layer._slice_index(1)) == (r, c)
    x = torch.randn(5, n, dtype=torch.float64, requires_grad=True)
    with OpLog() as log:
        layer(x).sum().backward()
    gathers = [(op, shape) for op, shape in log.ops if "index_select" in op]
    assert gathers == [("aten.index_select.default", (r * c,))], gathers  # only the k values from dL/dS
    layer.sparsegrad_values.grad = None
    check_against_dense_float64(base, P, R, support, layer, tokens=(2, 3))


def check_against_dense_float64(base, P, R, support, layer, tokens):
    m, n = layer.out_features, layer.in_features
    x = torch.randn(*tokens, n, dtype=torch.float64, requires_grad=True)
    upstream = torch.randn(*tokens, m, dtype=torch.float64)

    (layer(x) * upstream).sum().backward()

    # Independent computation: dense S as a float64 leaf, W_eff = W0 + P S R^T, plain autograd.
    S = torch.zeros(m, n, dtype=torch.float64)
    S[support.rows, support.cols] = layer.sparsegrad_values.detach()
    S.requires_grad_(True)
    x_ref = x.detach().clone().requires_grad_(True)
    W_eff = base.weight.detach() + P @ S @ R.T
    y_ref = x_ref @ W_eff.T + base.bias.detach()
    (y_ref * upstream).sum().backward()

    torch.testing.assert_close(layer(x.detach()), y_ref.detach(), rtol=0, atol=1e-12)
    G = upstream.reshape(-1, m).T @ x.detach().reshape(-1, n)
    rotated = P.T @ G @ R  # the rotated gradient G~ = P^T G R
    torch.testing.assert_close(S.grad, rotated, rtol=0, atol=1e-10)
    torch.testing.assert_close(layer.sparsegrad_values.grad, rotated[support.rows, support.cols], rtol=0, atol=1e-10)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=0, atol=1e-10)
    assert base.weight.grad is None


class LargestTensor(TorchDispatchMode):
    """Records the largest newly allocated tensor any op produces (views of inputs do not count)."""

    def __init__(self):
        super().__init__()
        self.largest = 0
        self.op = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)]
        known = {a.untyped_storage().data_ptr() for a in inputs if a.layout == torch.strided}
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
                continue
            if t.untyped_storage().data_ptr() not in known and t.numel() > self.largest:
                self.largest, self.op = t.numel(), str(func)
        return out


@pytest.mark.parametrize("budget", [None, (64, 128)])
def test_backward_never_builds_an_m_by_n_tensor(budget):
    m, n, T = 1024, 2048, 16
    base = nn.Linear(n, m, bias=False)
    P, R = torch.eye(m), torch.eye(n)  # structure matters here, not values
    g = torch.Generator().manual_seed(0)
    flat = torch.randperm(m * n, generator=g)[: m * n // 100] if budget is None else \
        (torch.randint(0, 64, (2000,), generator=g) * n + torch.randint(0, 128, (2000,), generator=g)).unique()
    layer = SparseGradLinear(base, P, R, Support.from_flat(flat, (m, n)))
    x = torch.randn(T, n, requires_grad=True)
    y = layer(x)
    with LargestTensor() as probe:
        y.sum().backward()
    assert layer.sparsegrad_values.grad is not None and x.grad is not None
    assert probe.largest < m * n // 4, f"{probe.op} produced {probe.largest} elements (m*n={m * n})"


def test_shape_mismatch_is_named():
    base = nn.Linear(8, 4)
    support = Support.from_flat(torch.tensor([0, 1]), (4, 9))
    with pytest.raises(ValueError, match="base is 4x8 but support is \\(4, 9\\)"):
        SparseGradLinear(base, torch.eye(4), torch.eye(8), support)


def test_layers_share_one_basis_through_dtype_moves_and_deepcopy():
    """Two layers built on one SharedBasis keep sharing it after ``.to(dtype)`` (converted once, not once
    per layer) and after deepcopy / pickling; outputs follow the converted basis exactly."""
    import copy
    import pickle

    from sg_distributed.sparsegrad.layer import SharedBasis

    m, n, k = 12, 20, 15
    P, R = orthogonal(m, 1), orthogonal(n, 2)
    basis = SharedBasis(P, R, torch.float32)
    layers = nn.Sequential(*[
        SparseGradLinear(nn.Linear(n, m), None, None, select_support(torch.rand(m, n), k, 6, 8),
                         values=torch.randn(k), basis=basis)
        for _ in range(2)])
    assert all(not any("P" in name or "R_" in name for name, _ in layer.named_buffers()) for layer in layers)
    layers.to(torch.float64)
    assert layers[0].basis is layers[1].basis and layers[0].basis.Pt.dtype == torch.float64
    torch.testing.assert_close(layers[0].basis.P, P, atol=1e-7, rtol=0)  # float32 round trip, shared once
    x = torch.randn(4, n, dtype=torch.float64)
    for layer in layers:  # independent dense computation with the (converted) shared basis
        S = torch.zeros(m, n, dtype=torch.float64)
        S[layer.support.rows, layer.support.cols] = layer.sparsegrad_values.detach()
        dense = layer.base_layer.weight + layer.basis.P @ S @ layer.basis.R.T
        torch.testing.assert_close(layer(x), x @ dense.T + layer.base_layer.bias, atol=1e-12, rtol=0)
    for clone in (copy.deepcopy(layers), pickle.loads(pickle.dumps(layers))):
        assert clone[0].basis is clone[1].basis and clone[0].basis is not basis
        for copied, layer in zip(clone, layers):
            torch.testing.assert_close(copied(x), layer(x), atol=0, rtol=0)
