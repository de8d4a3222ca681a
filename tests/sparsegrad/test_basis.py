"""Streamed Gram bases equal the HOSVD factors of the explicitly stacked gradients."""
import pytest
import torch

from sg_distributed.sparsegrad.basis import GramAccumulator, eigenbasis
from sg_distributed.sparsegrad.gradient_tap import gradient_tap, gradients_flowing, run_backward_passes
from sg_distributed.sparsegrad.targets import find_target_linears, layer_type

from conftest import lm_batches, make_tiny_llama


def hosvd_factors(stack):
    """Mode-1 and mode-2 left singular vectors of an S x m x n stack (the textbook HOSVD)."""
    S, m, n = stack.shape
    U1 = torch.linalg.svd(stack.permute(1, 0, 2).reshape(m, S * n), full_matrices=False).U
    U2 = torch.linalg.svd(stack.permute(2, 0, 1).reshape(n, S * m), full_matrices=False).U
    return U1, U2


def assert_same_up_to_sign(A, B, cols):
    """Leading ``cols`` columns agree up to a sign per column."""
    dots = (A[:, :cols] * B[:, :cols]).sum(0)
    torch.testing.assert_close(dots.abs(), torch.ones(cols, dtype=A.dtype), atol=1e-8, rtol=0)


def test_streamed_grams_equal_stacked_hosvd():
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(12, 20, generator=g, dtype=torch.float64) for _ in range(6)]
    acc = GramAccumulator(dtype=torch.float64)
    for G in grads:
        acc.add("up", G)
    bases = acc.bases("textbook")["up"]
    U1, U2 = hosvd_factors(torch.stack(grads))
    assert_same_up_to_sign(bases.P, U1, 12)
    assert_same_up_to_sign(bases.R, U2, 20)
    torch.testing.assert_close(bases.P.T @ bases.P, torch.eye(12, dtype=torch.float64), atol=1e-10, rtol=0)
    reference = acc.bases("reference")["up"]
    torch.testing.assert_close(reference.R, bases.R.T)


def test_factor_route_equals_dense_route():
    """add_factors (token-space Grams, T < min(m, n)) equals add(dY^T X); rotate_factors equals rotate."""
    g = torch.Generator().manual_seed(2)
    dense, factored = GramAccumulator(torch.float64), GramAccumulator(torch.float64)
    for _ in range(3):
        dy = torch.randn(5, 12, generator=g, dtype=torch.float64)
        x = torch.randn(5, 20, generator=g, dtype=torch.float64)
        dense.add("t", dy.T @ x)
        factored.add_factors("t", dy, x)
    torch.testing.assert_close(factored.out_gram["t"].full(), dense.out_gram["t"].full())
    torch.testing.assert_close(factored.in_gram["t"].full(), dense.in_gram["t"].full())
    bases = dense.bases()["t"]
    torch.testing.assert_close(bases.rotate_factors(dy, x), bases.rotate(dy.T @ x))


def test_eigenbasis_sign_is_canonical():
    g = torch.Generator().manual_seed(1)
    A = torch.randn(8, 8, generator=g, dtype=torch.float64)
    V = eigenbasis(A @ A.T)
    flipped = eigenbasis((A @ A.T).flip(0).flip(1)).flip(0)  # same matrix, permuted coordinates
    torch.testing.assert_close(V, flipped, atol=1e-8, rtol=0)
    assert (V[V.abs().argmax(0), torch.arange(8)] > 0).all()


def test_calibration_tap_streams_the_true_weight_gradients():
    """G from the hooks equals weight.grad from plain autograd, summed per layer type."""
    batches = lm_batches(n=3)
    model = make_tiny_llama()
    targets = find_target_linears(model, ["up_proj", "down_proj"])

    # Independent computation: weight grads from dense autograd, stacked explicitly.
    dense = make_tiny_llama()
    stacks = {}
    for batch in batches:
        dense.zero_grad()
        dense(**batch).loss.backward()
        for name in targets:
            stacks.setdefault(layer_type(name), []).append(dense.get_submodule(name).weight.grad.double().clone())

    for p in model.parameters():
        p.requires_grad_(False)
    acc = GramAccumulator(dtype=torch.float64)
    with gradients_flowing(model, targets), gradient_tap(targets, lambda n, dy, x: acc.add_factors(layer_type(n), dy, x)):
        run_backward_passes(model, batches, steps=3)
    assert acc.count == {key: len(stack) for key, stack in stacks.items()}
    for key, stack in stacks.items():
        stacked = torch.stack(stack)
        torch.testing.assert_close(acc.out_gram[key].full(), torch.einsum("smn,skn->mk", stacked, stacked), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(acc.in_gram[key].full(), torch.einsum("smn,smk->nk", stacked, stacked), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("m", [1, 5, 1023, 1025, 2049])  # around the in-place transpose's tile size
def test_host_solver_in_place_equals_torch_eigh(m, monkeypatch):
    """The host path (LAPACK dsyevr through scipy, then the sign fix, the descending order and the transpose in
    the solver's own output) gives torch.linalg.eigh's basis (syevd, the CUDA path) to float64 rounding."""
    from sg_distributed.sparsegrad import basis as basis_module

    g = torch.randn(m, m + 7, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
    gram = g @ g.T
    host = basis_module.eigenbasis(gram.clone(), overwrite=True)
    monkeypatch.setattr(basis_module, "_scipy_eigh", lambda: None)
    reference = basis_module.eigenbasis(gram.clone(), overwrite=True)
    assert host.is_contiguous() and host.dtype == torch.float64
    torch.testing.assert_close(host, reference, atol=1e-9, rtol=0)
    torch.testing.assert_close(host.T @ host, torch.eye(m, dtype=torch.float64), atol=1e-10, rtol=0)


@pytest.mark.parametrize("m", [1, 5, 1025, 2049])  # around the row-block size
def test_upper_gram_keeps_the_upper_triangle_and_solves_like_the_full_matrix(m, monkeypatch):
    """An UpperGram accumulates only its upper row blocks; ``full()`` is the symmetric product (float64
    reference), and its host solve (dsyevr on the upper triangle only) is bit-identical to eigenbasis() of
    ``full()`` and within float64 rounding of torch's syevd path (the CUDA one)."""
    from sg_distributed.sparsegrad import basis as basis_module
    from sg_distributed.sparsegrad.basis import UpperGram

    g = torch.randn(m, m + 3, dtype=torch.float64, generator=torch.Generator().manual_seed(m))
    gram = UpperGram(m, torch.float64, torch.device("cpu"))
    gram.add_product_(g, g.T)
    gram.add_product_(g[:, :2], g[:, :2].T)
    assert sum(b.numel() for b in gram.blocks) <= m * (m + 1) // 2 + 1024 * m // 2
    full = gram.full()
    assert torch.equal(full, full.T)
    torch.testing.assert_close(full, g @ g.T + g[:, :2] @ g[:, :2].T, rtol=1e-12, atol=1e-10)
    host = gram.eigenbasis()
    assert torch.equal(host, eigenbasis(full.clone(), overwrite=True))
    assert torch.equal(gram.eigenbasis(torch.float32), eigenbasis(full.clone(), overwrite=True, dtype=torch.float32))
    monkeypatch.setattr(basis_module, "_scipy_eigh", lambda: None)
    torch.testing.assert_close(host, gram.eigenbasis(), atol=1e-9, rtol=0)


def test_releasing_bases_frees_the_grams_and_keeps_the_bits():
    """bases(release=True) (each Gram's blocks freed as its solve's matrix is filled) equals bases()."""
    g = torch.Generator().manual_seed(3)
    kept, released = GramAccumulator(torch.float64), GramAccumulator(torch.float64)
    for _ in range(3):
        for key, (m, n) in {"up": (40, 24), "down": (24, 40)}.items():
            dy = torch.randn(6, m, generator=g)
            x = torch.randn(6, n, generator=g)
            kept.add_factors(key, dy, x)
            released.add_factors(key, dy, x)
    reference = kept.bases(dtype=torch.float32)
    result = released.bases(dtype=torch.float32, release=True)
    assert not released.out_gram and not released.in_gram
    for key in reference:
        assert torch.equal(result[key].P, reference[key].P) and torch.equal(result[key].R, reference[key].R)


def test_accumulating_a_gram_never_holds_the_whole_product():
    """add_factors adds its m x m product CHUNK rows at a time: neither the float32 product nor the float64 copy
    that a mixed-dtype add_ makes on the CPU is ever whole (at 7B: 0.48 + 0.97 GB). Peak RSS of a second add at
    m = 6000: the whole product and its copy would be 0.43 GB; blocks of 1024 rows need at most 0.07 GB."""
    import re
    from pathlib import Path

    def rss(field):
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    m, n, T = 6000, 8, 4
    g = torch.Generator().manual_seed(0)
    dy, x = torch.randn(T, m, generator=g), torch.randn(T, n, generator=g)
    acc = GramAccumulator(torch.float64)
    acc.add_factors("t", dy, x)  # the Gram exists and is resident
    Path("/proc/self/clear_refs").write_text("5")  # resets the peak to the current RSS
    before = rss("VmRSS")
    acc.add_factors("t", dy, x)
    assert rss("VmHWM") - before < 0.15e9
    G = dy.double().T @ x.double()  # independent: the dense float64 gradient
    for gram, reference in ((acc.out_gram["t"].full(), 2 * (G @ G.T)), (acc.in_gram["t"].full(), 2 * (G.T @ G))):
        assert (gram - reference).abs().max() <= 1e-6 * reference.abs().max()  # float32 products, float64 sums
