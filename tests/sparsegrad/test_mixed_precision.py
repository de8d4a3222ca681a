"""Mixed precision: bf16 weights, autocast over fp32, fp32 trained values, bases that follow the compute dtype."""
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from sg_distributed import SparseGradConfig
from sg_distributed.training.checkpoint import structure_checksum
from sg_distributed.sparsegrad.layer import SharedBasis, SparseGradLinear, _BlockDelta
from sg_distributed.training.methods import prepare
from sg_distributed.sparsegrad.convert import load_adapter
from sg_distributed.sparsegrad.selection import Support

from conftest import calibrated, lm_batches, make_tiny_llama, orthogonal

BUDGET = dict(density=0.05, max_rows=0.5, max_cols=0.5)  # dense-block kernel
NO_BUDGET = dict(density=0.3, max_rows=None, max_cols=None)  # no row/column budget: supports spread, the CSR kernel


def relative_error(actual, expected):
    return float((actual.double() - expected.double()).norm() / expected.double().norm())


def train(prepared, batches, lr=1e-2):
    optimizer = prepared.make_optimizer(lr)
    losses = []
    for batch in batches:
        loss = prepared.model(**batch).loss
        loss.backward()
        optimizer.step()
        prepared.after_step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


SPARSEGRAD_CASES = {"sparsegrad-csr": ("sparsegrad", NO_BUDGET), "sparsegrad-budget": ("sparsegrad", BUDGET),
                    "reference": ("sparsegrad_reference", {"k": 20}), "dynamic": ("sparsegrad_dynamic", {"k": 20}),
                    "meprop": ("meprop", {"k": 20})}


@pytest.mark.parametrize("case", list(SPARSEGRAD_CASES))
def test_sparsegrad_methods_train_save_reload_and_merge_in_bf16(case, tmp_path):
    method, config = SPARSEGRAD_CASES[case]
    model = make_tiny_llama().to(torch.bfloat16)
    prepared = prepare(method, model, SparseGradConfig(**config), calibration_batches=lm_batches())
    wrapper = prepared.model
    layers = wrapper.converted_layers()
    if case == "sparsegrad-csr":  # no budget really exercises the CSR kernel in bf16
        assert any(not layer.structure.dense_block for layer in layers.values())
    trained = [p for p in wrapper.trainable_parameters()]
    # the converted layers' trained state (k-vectors; W~ and biases in reference/dynamic mode) is fp32 in a bf16
    # model; the norms that reference mode also trains are the model's own bf16 weights
    own = [t for layer in layers.values() for n, t in list(layer.named_parameters()) + list(layer.named_buffers())
           if n in ("sparsegrad_values", "rotated_weight", "bias")]
    assert own and all(t.dtype == torch.float32 for t in own)
    before = [p.detach().clone() for p in trained]
    losses = train(prepared, lm_batches(n=3, seed=5))
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(b, p) for b, p in zip(before, trained))
    checksum = wrapper.support_checksum()
    assert len(checksum) == 64
    structure = structure_checksum(wrapper)

    wrapper.save_pretrained(tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {t.dtype for k, t in saved.items() if "bases." in k or k.endswith(("values", "rotated_weight"))} \
        == {torch.float32}  # full precision on disk: not silently lossy onto an fp32 base
    ids = lm_batches(seed=9)[0]["input_ids"]
    with torch.no_grad():
        logits = wrapper(input_ids=ids).logits
        reloaded = load_adapter(make_tiny_llama().to(torch.bfloat16), tmp_path / "adapter")
        assert structure_checksum(reloaded) == structure
        torch.testing.assert_close(reloaded(input_ids=ids).logits, logits, atol=0, rtol=0)
        # the adapter kept fp32 bases and values: onto an fp32 base it is the fp32 model, within bf16 rounding
        on_fp32 = load_adapter(make_tiny_llama(), tmp_path / "adapter")
        assert relative_error(on_fp32(input_ids=ids).logits, logits) < 2e-2
        merged = wrapper.merge_and_unload()
        assert not any(isinstance(m, SparseGradLinear) for m in merged.modules())
        assert merged.get_submodule(next(iter(layers))).weight.dtype == torch.bfloat16
        assert relative_error(merged(input_ids=ids).logits, logits) < 2e-2


@pytest.mark.parametrize("method", ["lora", "graddrop", "full"])
def test_baselines_train_in_bf16(method):
    model = make_tiny_llama().to(torch.bfloat16)
    prepared = prepare(method, model, SparseGradConfig(**BUDGET))
    trained = prepared.trainable_parameters()
    before = [p.detach().clone() for p in trained]
    losses = train(prepared, lm_batches(n=3, seed=5), lr=1e-2)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert any(not torch.equal(b, p) for b, p in zip(before, trained))
    if method == "lora":  # peft keeps adapter weights in fp32 over a bf16 base (autocast_adapter_dtype)
        assert all(p.dtype == torch.float32 for p in trained)


def test_small_updates_survive_in_a_bf16_model():
    """DESIGN §7: 40 AdamW steps at lr 1e-5 on values of 0.05 must move them (~4e-4); bf16 values cannot."""
    model = calibrated(make_tiny_llama(), SparseGradConfig(**BUDGET), lm_batches())
    model.to(torch.bfloat16)  # a cast after calibration keeps the k-vectors in fp32 as well
    values = [layer.sparsegrad_values for layer in model.converted_layers().values()]
    assert all(v.dtype == torch.float32 for v in values)
    with torch.no_grad():
        for v in values:
            v.fill_(0.05)
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-5)
    batch = lm_batches(n=1, seed=5)[0]
    for _ in range(40):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    moved = torch.cat([(v.detach() - 0.05).abs() for v in values])
    assert moved.median() >= 1e-4, float(moved.median())
    # the failure this guards against: the same AdamW on bf16 values of 0.05 moves them by exactly 0
    control = nn.Parameter(torch.full((8,), 0.05, dtype=torch.bfloat16))
    control_optimizer = torch.optim.AdamW([control], lr=1e-5, weight_decay=0.0)
    for _ in range(40):
        control.grad = torch.ones_like(control)
        control_optimizer.step()
    assert torch.equal(control.detach(), torch.full((8,), 0.05, dtype=torch.bfloat16))


def make_layer(dense_block: bool, m=40, n=48, k=120, seed=0):
    torch.manual_seed(seed)
    base = nn.Linear(n, m)
    g = torch.Generator().manual_seed(seed)
    if dense_block:  # k entries inside a 12 x 16 block: r*c <= 0.25 m n
        rows = torch.randperm(m, generator=g)[:12].sort().values
        cols = torch.randperm(n, generator=g)[:16].sort().values
        flat = torch.randperm(12 * 16, generator=g)[:k]
        support = Support.from_flat(rows[flat // 16] * n + cols[flat % 16], (m, n))
    else:
        support = Support.from_flat(torch.randperm(m * n, generator=g)[:k], (m, n))
    values = torch.randn(k, generator=g) * 0.1
    layer = SparseGradLinear(base, orthogonal(m, seed + 1), orthogonal(n, seed + 2), support, values=values)
    assert layer.structure.dense_block == dense_block
    return layer


def dense_reference(layer, x, upstream):
    """dL/dv and dL/dx of L = sum(upstream * y) in float64 dense math: W = W0 + P S R^T."""
    P, R = layer.basis.P.double(), layer.basis.R.double()
    values = layer.sparsegrad_values.detach().double().requires_grad_(True)
    xd = x.detach().double().requires_grad_(True)
    S = torch.zeros(layer.out_features * layer.in_features, dtype=torch.float64)
    S = S.index_put((layer.support_flat,), values).view(layer.out_features, layer.in_features)
    W = layer.base_layer.weight.double() + P @ S @ R.T
    y = xd @ W.T + layer.base_layer.bias.double()
    (y * upstream.double()).sum().backward()
    return values.grad, xd.grad


@pytest.mark.parametrize("dense_block", [True, False], ids=["dense-block", "csr"])
def test_autocast_bf16_over_fp32_gradients_match_float64(dense_block):
    """k-value gradient and dX under torch.autocast(bf16) within 5e-2 relative of exact float64 dense math
    (bf16 has an 8-bit mantissa: ~4e-3 per rounding, accumulated over the products); fp32 within 1e-5."""
    layer = make_layer(dense_block)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 9, layer.in_features, generator=g)
    upstream = torch.randn(2, 9, layer.out_features, generator=g)
    want_values, want_x = dense_reference(layer, x, upstream)
    for autocast, tolerance in ((False, 1e-5), (True, 5e-2)):
        layer.sparsegrad_values.grad = None
        xg = x.clone().requires_grad_(True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = layer(xg)
        assert y.dtype == (torch.bfloat16 if autocast else torch.float32)
        (y.float() * upstream).sum().backward()
        assert layer.sparsegrad_values.grad.dtype == torch.float32 and xg.grad.dtype == torch.float32
        assert relative_error(layer.sparsegrad_values.grad, want_values) < tolerance
        assert relative_error(xg.grad, want_x) < tolerance


def test_autocast_model_k_gradients_within_5e2_of_fp32():
    model = calibrated(make_tiny_llama(), SparseGradConfig(**NO_BUDGET), lm_batches())
    batch = lm_batches(n=1, seed=5)[0]
    grads = {}
    for autocast in (False, True):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            loss = model(**batch).loss
        loss.backward()
        grads[autocast] = torch.cat([p.grad for p in model.trainable_parameters()])
    assert relative_error(grads[True], grads[False]) < 5e-2


def test_bases_follow_an_engine_cast_that_bypasses_module_apply(monkeypatch):
    """DeepSpeed casts with ``p.data = p.data.to(bf16)`` and FSDP2 casts in its hooks: no ``_apply`` reaches the
    shared basis. The delta must still run in bf16 (from the input), with the fp32 master untouched."""
    model = calibrated(make_tiny_llama(), SparseGradConfig(**BUDGET), lm_batches())
    for p in model.parameters():
        if p.dtype.is_floating_point:
            p.data = p.data.to(torch.bfloat16)
    seen = []
    original = _BlockDelta.forward

    def spy(ctx, base2d, x2d, values, Pt, Rt, *rest):
        seen.append({base2d.dtype, x2d.dtype, values.dtype, Pt.dtype, Rt.dtype})
        return original(ctx, base2d, x2d, values, Pt, Rt, *rest)

    monkeypatch.setattr(_BlockDelta, "forward", staticmethod(spy))
    model(**lm_batches(n=1)[0]).loss.backward()
    assert seen and all(dtypes == {torch.bfloat16} for dtypes in seen)
    for basis in model.shared_bases.values():
        assert basis.dtype == torch.float32  # the master; one bf16 compute copy per device beside it
        assert {t.dtype for t in basis.tensors()} == {torch.float32, torch.bfloat16}


def test_shared_basis_master_stays_full_precision_through_casts():
    P, R = orthogonal(6, 1), orthogonal(4, 2)
    basis = SharedBasis(P, R, torch.bfloat16)
    assert basis.dtype == torch.float32 and basis.Pt.device.type == "cpu"
    Pt, _ = basis.for_compute(torch.bfloat16, torch.device("cpu"))
    assert Pt.dtype == torch.bfloat16 and basis.for_compute(torch.bfloat16, "cpu")[0] is Pt  # cached
    assert basis.for_compute(torch.float32, "cpu")[0] is basis.Pt  # the master itself, no copy
    basis.apply(lambda t: t.to(torch.float64))
    assert basis.dtype == torch.float64 and basis._compute == {}
    basis.apply(lambda t: t.to(torch.bfloat16))
    assert basis.dtype == torch.float32
    torch.testing.assert_close(basis.P.double(), P.float().double(), atol=0, rtol=0)


@pytest.mark.parametrize("reentrant", [True, False], ids=["reentrant", "non-reentrant"])
def test_activation_checkpointing_gives_the_same_k_gradients(reentrant):
    """HF activation checkpointing recomputes each block in backward; SparseGrad's k-value gradients must not change."""
    batch = lm_batches(n=1, seed=5)[0]
    grads, calls = {}, {}
    for checkpointing in (False, True):
        hf = make_tiny_llama()
        model = calibrated(hf, SparseGradConfig(**NO_BUDGET), lm_batches())
        if checkpointing:
            hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        hf.train()
        layer = next(iter(model.converted_layers().values()))
        count = []
        layer.register_forward_hook(lambda *_: count.append(1))
        model(**batch).loss.backward()
        grads[checkpointing] = torch.cat([p.grad for p in model.trainable_parameters()])
        calls[checkpointing] = len(count)
    assert calls == {False: 1, True: 2}  # the block really was recomputed
    torch.testing.assert_close(grads[True], grads[False], atol=1e-7, rtol=1e-6)
