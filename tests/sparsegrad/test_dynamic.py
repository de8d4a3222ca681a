"""Dynamic-support SparseGrad: buffer W~ + gradient accumulator, sparse exchange, sparse-state Adam."""
import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from sg_distributed.sparsegrad.dynamic import (
    DynamicSparseGradLinear, SparseExchange, SparseStateAdam, convert_to_dynamic, dense_parameters, make_dynamic,
    topk_indices)
from sg_distributed.sparsegrad.layer import ReferenceSparseGradLinear
from sg_distributed.sparsegrad.optim import LazyAdam, clear_masks

from conftest import free_port, orthogonal, run_ranks

REPO = Path(__file__).resolve().parents[2]


def reference_net(k, identity=False, rotated_bias_grad=False, sizes=(6, 10, 6)):
    torch.manual_seed(0)
    a, h, b = sizes
    net = nn.Sequential(nn.Linear(a, h), nn.GELU(), nn.Linear(h, b), nn.LayerNorm(b)).double()
    for i, (m, n) in ((0, (h, a)), (2, (b, h))):
        P, R = (None, None) if identity else (orthogonal(m, 10 + i), orthogonal(n, 20 + i))
        net[i] = ReferenceSparseGradLinear(net[i], P, R, k, rotated_bias_grad=rotated_bias_grad)
    return net


def batches(n=4, rows=5, sizes=(6, 10, 6), seed=3, extra_dims=()):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(*extra_dims, rows, sizes[0], generator=g, dtype=torch.float64),
             torch.randn(*extra_dims, rows, sizes[2], generator=g, dtype=torch.float64)) for _ in range(n)]


def loss_of(net, batch):
    return ((net(batch[0]) - batch[1]) ** 2).mean()


@pytest.mark.parametrize("identity,rotated_bias_grad,extra_dims", [
    (False, False, ()), (True, False, ()), (False, True, (2,))])
def test_dynamic_equals_reference_mode(identity, rotated_bias_grad, extra_dims):
    k = 7
    reference = reference_net(k, identity, rotated_bias_grad)
    dynamic = copy.deepcopy(reference)
    layers = convert_to_dynamic(dynamic)
    assert set(layers) == {"0", "2"} and all(isinstance(dynamic[i], DynamicSparseGradLinear) for i in (0, 2))
    # No m x n parameter is left for an engine to reduce or partition.
    assert {n for n, _ in dynamic.named_parameters()} == {"0.bias", "2.bias", "3.weight", "3.bias"}
    assert "0.rotated_weight" in dynamic.state_dict()

    ref_opt = LazyAdam(reference.parameters(), lr=0.05)
    dense_opt = LazyAdam(list(dense_parameters(layers.values())) + list(dynamic[3].parameters()), lr=0.05)
    sparse_opt = SparseStateAdam(dynamic, lr=0.05, mode="exact")
    data = batches(extra_dims=extra_dims)
    for batch in data[:3]:
        ref_loss = loss_of(reference, batch)
        ref_loss.backward()
        ref_opt.step()
        ref_opt.zero_grad()
        clear_masks(reference.parameters())
        dyn_loss = loss_of(dynamic, batch)
        dyn_loss.backward()
        dense_opt.step()
        dense_opt.zero_grad()
        sparse_opt.step()
        torch.testing.assert_close(dyn_loss, ref_loss, atol=1e-10, rtol=0)
    for i in (0, 2):
        torch.testing.assert_close(dynamic[i].rotated_weight, reference[i].rotated_weight.detach(), atol=1e-10, rtol=0)
        torch.testing.assert_close(dynamic[i].bias.detach(), reference[i].bias.detach(), atol=1e-10, rtol=0)
        torch.testing.assert_close(dynamic[i].merged_linear().weight, reference[i].merged_linear().weight,
                                   atol=1e-10, rtol=0)
    torch.testing.assert_close(dynamic[3].weight.detach(), reference[3].weight.detach(), atol=1e-10, rtol=0)


def test_accumulator_sums_micro_batches_and_first_layer_gets_a_gradient():
    layer = make_dynamic(reference_net(5)[0])
    x1, x2 = torch.randn(3, 6, dtype=torch.float64), torch.randn(4, 6, dtype=torch.float64)  # no requires_grad
    layer(x1).sum().backward()
    layer(x2).square().sum().backward()
    assert layer.backward_count == 2
    W = layer.rotated_weight.clone().requires_grad_(True)  # independent: autograd on a dense leaf
    f = lambda x: x @ layer.R @ W.T @ layer.P.T + layer.bias
    (f(x1).sum() + f(x2).square().sum()).backward()
    torch.testing.assert_close(layer.grad_accumulator, W.grad, atol=1e-12, rtol=0)
    with torch.no_grad():  # inference builds no graph and accumulates nothing
        torch.testing.assert_close(layer(x1), f(x1).detach(), atol=1e-12, rtol=0)
    assert layer.backward_count == 2


def test_state_holds_only_the_union_of_selected_entries():
    sizes, k = (40, 50, 30), 6
    net = reference_net(k, sizes=sizes)
    layers = convert_to_dynamic(net)
    opt = SparseStateAdam(layers, lr=0.01, mode="sparse")
    union = {n: set() for n in layers}
    for batch in batches(n=6, rows=8, sizes=sizes):
        loss_of(net, batch).backward()
        opt.step()
        for n, idx in opt.last_selected.items():
            assert idx.numel() == k and torch.equal(idx, idx.sort().values)
            union[n] |= set(idx.tolist())
    for n, layer in layers.items():
        state = opt.state[n]
        assert state["step"] == 6 and layer.grad_accumulator is None
        assert state["indices"].tolist() == sorted(union[n])
        assert state["exp_avg"].numel() == state["exp_avg_sq"].numel() == len(union[n])
        assert len(union[n]) <= 6 * k < layer.rotated_weight.numel() // 20
    assert opt.state_size() == sum(len(u) for u in union.values())
    tensors = [t for s in opt.state.values() for t in s.values() if torch.is_tensor(t)]
    assert max(t.numel() for t in tensors) <= 6 * k


def test_state_dict_roundtrip_continues_identically():
    net = reference_net(5)
    layers = convert_to_dynamic(net)
    opt = SparseStateAdam(layers, lr=0.02)
    data = batches()
    for batch in data[:2]:
        loss_of(net, batch).backward()
        opt.step()
    twin = copy.deepcopy(net)
    twin_opt = SparseStateAdam(twin, lr=1.0)
    twin_opt.load_state_dict(opt.state_dict())
    for model, o in ((net, opt), (twin, twin_opt)):
        loss_of(model, data[2]).backward()
        o.step()
    for i in (0, 2):
        assert torch.equal(net[i].rotated_weight, twin[i].rotated_weight)
    assert twin_opt.state["0"]["step"] == 3 and twin_opt.lr == 0.02


def test_exchange_without_process_group_is_a_local_top_k_with_ties_to_lower_index():
    grad = torch.tensor([[0.5, -3.0, 1.0], [3.0, -1.0, 0.1]])
    for mode in ("sparse", "exact"):
        idx, values = SparseExchange(3, mode)(grad)
        assert idx.tolist() == [1, 2, 3] and values.tolist() == [-3.0, 1.0, 3.0]
    assert topk_indices(torch.tensor([1.0, 2.0, 1.0, 1.0]), 2).tolist() == [0, 1]
    g = torch.Generator().manual_seed(0)
    for n, k in ((50, 1), (50, 17), (200, 100), (7, 6)):  # many ties: values from 5 levels
        scores = torch.randint(0, 5, (n,), generator=g).double()
        reference = torch.sort(torch.sort(-scores, stable=True).indices[:k]).values  # ties: lower index first
        assert torch.equal(topk_indices(scores, k), reference), (n, k)
    with pytest.raises(ValueError, match="mode"):
        SparseExchange(3, "dense")


@pytest.mark.multiprocess
def test_two_ranks_exact_equals_single_process_and_sparse_agrees(tmp_path):
    out = tmp_path / "dynamic.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "tests" / "dynamic_worker.py"), "--out", str(out)]
    proc = run_ranks(cmd, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    single, ranks = result["single"], result["ranks"]
    assert result["world"] == 2 and [r["rank"] for r in ranks] == [0, 1]
    for r in ranks:
        assert r["exact"]["parameters"] == ["module.0.bias", "module.2.bias"]  # W~ never reaches DDP
        for name, values in single.items():
            torch.testing.assert_close(torch.tensor(r["exact"]["weights"][name]), torch.tensor(values),
                                       atol=1e-6, rtol=0)
        assert all(r["sparse"]["grads_seen"]) and r["sparse_values_exact"]
    for mode in ("exact", "sparse"):
        assert ranks[0][mode]["selected"] == ranks[1][mode]["selected"]  # same Omega on both ranks
        assert ranks[0][mode]["weights"] == ranks[1][mode]["weights"]  # replicas stay identical
    sparse = ranks[0]["sparse"]
    k, numel = 20, {"0": 32 * 12, "2": 24 * 32}  # the worker's k and layer shapes; float64 values, p = 2
    for name, by_op in sparse["bytes"].items():
        assert by_op == {"all_gather": k * (8 + 8), "all_reduce": k * 8}
        assert sparse["dense_bytes"][name] == numel[name] * 8 > sum(by_op.values())
        assert ranks[0]["exact"]["bytes"][name] == {"all_reduce": sparse["dense_bytes"][name]}
    print("bytes per rank per step:", json.dumps({"sparse": sparse["bytes"], "dense": sparse["dense_bytes"]}))
