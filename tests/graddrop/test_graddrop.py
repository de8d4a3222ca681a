import copy
import dataclasses
import hashlib
import json
import math

import pytest
import torch
from torch import nn

from sg_distributed.graddrop import (
    GradDropConfig,
    GradualUnfreezing,
    apply_graddrop,
)


class Tiny(nn.Module):
    """Two named Linear layers plus a non-Linear parameterised module."""

    def __init__(self, d=16, h=24):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, h)
        self.down = nn.Linear(h, d)

    def forward(self, x):
        return self.down(torch.relu(self.up(self.norm(x))))


def make_model(seed=0, **kw):
    torch.manual_seed(seed)
    return Tiny(**kw)


def loss_of(model, seed=1, n=8, d=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    return model(x).pow(2).mean()


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def dense_grads(model, seed=1):
    ref = copy.deepcopy(model)
    ref.zero_grad(set_to_none=True)
    loss_of(ref, seed).backward()
    return grads(ref)


def coefficients(shape, seed, dtype=torch.float32, device="cpu"):
    """Nonzero coefficients (|c| >= 0.5): the gradient of ``(w * c).sum()`` is exactly ``c``, so every
    zero in a masked gradient is a dropped entry and nothing else."""
    g = torch.Generator().manual_seed(seed)
    c = torch.rand(shape, generator=g) + 0.5
    sign = torch.randint(0, 2, shape, generator=g) * 2 - 1
    return (c * sign).to(dtype=dtype, device=device)


def probe_backward(linear, seed=5):
    """Backward of ``(w * c).sum()`` on ``linear.weight``; returns ``c`` (the dense gradient)."""
    c = coefficients(linear.weight.shape, seed, linear.weight.dtype, linear.weight.device)
    (linear.weight * c).sum().backward()
    return c


# ---------------------------------------------------------------- config


def test_config_roundtrip():
    cfg = GradDropConfig(drop_prob=0.3, granularity="row", resample="epoch", rescale=True, seed=7,
                         target_modules=["up"], include_bias=True)
    assert GradDropConfig.from_dict(cfg.to_dict()) == cfg
    assert GradDropConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"drop_prob": 1.0}, ["drop_prob", "[0, 1)"]),
        ({"drop_prob": -0.1}, ["drop_prob", "[0, 1)"]),
        ({"drop_prob": "0.5"}, ["drop_prob"]),
        ({"granularity": "block"}, ["granularity", "element", "row", "layer"]),
        ({"resample": "batch"}, ["resample", "step", "epoch"]),
        ({"rescale": 1}, ["rescale", "bool"]),
        ({"seed": -1}, ["seed"]),
        ({"target_modules": "up"}, ["target_modules", "list"]),
        ({"target_modules": []}, ["target_modules"]),
    ],
)
def test_bad_config(kw, words):
    with pytest.raises(ValueError) as e:
        GradDropConfig(**kw)
    for w in words:
        assert w in str(e.value)


def test_from_dict_unknown_key():
    with pytest.raises(ValueError, match="drop_probability"):
        GradDropConfig.from_dict({"drop_probability": 0.2})


def test_unmatched_target_lists_candidates():
    with pytest.raises(ValueError) as e:
        apply_graddrop(make_model(), GradDropConfig(target_modules=["up", "gate_proj"]))
    msg = str(e.value)
    assert "gate_proj" in msg and "up" in msg and "down" in msg


# ---------------------------------------------------------------- targets and determinism


def test_default_targets_are_linear_weights():
    ctl = apply_graddrop(make_model(), GradDropConfig())
    assert ctl.targets == ["up.weight", "down.weight"]
    ctl2 = apply_graddrop(make_model(), GradDropConfig(target_modules=["up"], include_bias=True))
    assert ctl2.targets == ["up.weight", "up.bias"]


def test_same_seed_same_masks_across_simulated_ranks():
    cfg = GradDropConfig(drop_prob=0.5, seed=3)
    rank0 = apply_graddrop(make_model(0), cfg)
    rank1 = apply_graddrop(make_model(1), GradDropConfig.from_json(cfg.to_json()))
    for _ in range(3):
        for n in rank0.targets:
            assert torch.equal(rank0.mask_for(n), rank1.mask_for(n))
        rank0.step()
        rank1.step()
    other = apply_graddrop(make_model(0), GradDropConfig(drop_prob=0.5, seed=4))
    other.load_state_dict(rank0.state_dict())
    assert not torch.equal(other.mask_for("up.weight"), rank0.mask_for("up.weight"))
    # different parameters get different masks too
    a, b = rank0.mask_for("up.weight"), rank0.mask_for("down.weight").T
    assert not torch.equal(a, b)


def test_simulated_ranks_mask_their_own_gradients_identically():
    """Two data-parallel 'ranks' (copies of one model, each its own controller with the same config)
    see different data; each rank's masked gradient is its dense gradient times the one shared mask.
    Changing the seed or the step counter changes the mask."""
    cfg = GradDropConfig(drop_prob=0.5, seed=3)
    model = make_model()
    ranks = [copy.deepcopy(model), copy.deepcopy(model)]
    ctls = [apply_graddrop(m, GradDropConfig.from_json(cfg.to_json())) for m in ranks]
    for step in range(2):
        for r, (m, ctl) in enumerate(zip(ranks, ctls)):
            dense = dense_grads(model, seed=10 * step + r)  # each rank its own batch
            m.zero_grad(set_to_none=True)
            loss_of(m, seed=10 * step + r).backward()
            for n in ctl.targets:
                assert torch.equal(ctl.mask_for(n), ctls[0].mask_for(n)), n
                assert torch.equal(m.get_parameter(n).grad, dense[n] * ctl.mask_for(n)), (step, r, n)
        masks = {n: ctls[0].mask_for(n) for n in ctls[0].targets}
        for ctl in ctls:
            ctl.step()
        assert all(not torch.equal(ctls[0].mask_for(n), masks[n]) for n in masks)  # new counter, new mask
    reseeded = apply_graddrop(make_model(), GradDropConfig(drop_prob=0.5, seed=4))
    reseeded.load_state_dict(ctls[0].state_dict())
    assert all(not torch.equal(reseeded.mask_for(n), ctls[0].mask_for(n)) for n in ctls[0].targets)


def test_hook_applies_exactly_mask_for_on_the_gradient_device():
    """The gradient of (w * c).sum() is c, nonzero everywhere: the masked gradient is c where
    mask_for(name, device=grad.device) keeps and 0 elsewhere, for every granularity."""
    for granularity in ("element", "row", "layer"):
        lin = nn.Linear(64, 48)
        ctl = apply_graddrop(lin, GradDropConfig(drop_prob=0.4, granularity=granularity, seed=2))
        for _ in range(2):
            lin.zero_grad(set_to_none=True)
            c = probe_backward(lin)
            keep = ctl.mask_for("weight", device=lin.weight.grad.device)
            assert keep.device == lin.weight.grad.device and keep.shape == lin.weight.shape
            assert torch.equal(lin.weight.grad != 0, keep), granularity
            assert torch.equal(lin.weight.grad[keep], c[keep])
            assert torch.equal(ctl.mask_for("weight", device="cpu"), ctl.mask_for("weight"))
            ctl.step()


def test_mask_for_rejects_bad_names_and_devices():
    ctl = apply_graddrop(make_model(), GradDropConfig())
    with pytest.raises(KeyError, match="norm.weight"):
        ctl.mask_for("norm.weight")
    with pytest.raises(RuntimeError, match="gpu"):
        ctl.mask_for("up.weight", device="gpu")


def test_cpu_masks_unchanged_from_the_cpu_drawn_version():
    """Golden digests of CPU masks, recorded with the previous implementation (CPU torch.rand over n
    entries, cached per parameter; commit 1ff6143): a CPU run resumed across the change keeps its masks."""
    golden = {
        "element": {"0.weight": ("0efc60d352488f54", 277), "0.bias": ("a86a604b6a67ce47", 18),
                    "1.weight": ("39be0c98b8eb21b5", 266), "1.bias": ("c8fbbcb28769ec53", 10)},
        "row": {"0.weight": ("70272e55fbd99cd5", 256), "0.bias": ("f2f07b0f0b947fab", 16),
                "1.weight": ("27ab1d00a79ae113", 192), "1.bias": ("0e9d8ce150efa528", 8)},
        "layer": {"0.weight": ("5cf4c99653bf7b21", 384), "0.bias": ("5b8b4d29020ea5b1", 24),
                  "1.weight": ("a1a4f5721c1c4610", 0), "1.bias": ("374708fff7719dd5", 0)},
    }
    for granularity, expected in golden.items():
        model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16))
        ctl = apply_graddrop(model, GradDropConfig(drop_prob=0.3, seed=9, granularity=granularity,
                                                   include_bias=True))
        ctl.step()
        ctl.step()
        for n, (digest, kept) in expected.items():
            m = ctl.mask_for(n)
            assert (hashlib.sha256(m.numpy().tobytes()).hexdigest()[:16], int(m.sum())) == (digest, kept), n


def test_masked_grad_equals_dense_times_mask():
    model = make_model()
    dense = dense_grads(model)
    ctl = apply_graddrop(model, GradDropConfig(drop_prob=0.4, seed=1))
    loss_of(model).backward()
    for n, p in model.named_parameters():
        if n in ctl.targets:
            torch.testing.assert_close(p.grad, dense[n] * ctl.mask_for(n), rtol=0, atol=0)
        else:  # untouched: norm and biases
            torch.testing.assert_close(p.grad, dense[n], rtol=0, atol=0)


def test_p0_is_full_finetuning_exactly():
    ref, model = make_model(), make_model()
    apply_graddrop(model, GradDropConfig(drop_prob=0.0, rescale=True, include_bias=True))
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ref, model)]
    for step in range(3):
        for m, opt in zip((ref, model), opts):
            opt.zero_grad()
            loss_of(m, seed=step).backward()
        for (n, a), (_, b) in zip(ref.named_parameters(), model.named_parameters()):
            assert torch.equal(a.grad, b.grad), n
        for opt in opts:
            opt.step()
    for a, b in zip(ref.parameters(), model.parameters()):
        assert torch.equal(a, b)


def test_remove_restores_dense():
    model = make_model()
    dense = dense_grads(model)
    ctl = apply_graddrop(model, GradDropConfig(drop_prob=0.9))
    ctl.remove()
    loss_of(model).backward()
    for n, g in grads(model).items():
        assert torch.equal(g, dense[n])


# ---------------------------------------------------------------- granularities


def test_element_kept_fraction_within_binomial_bounds():
    model = nn.Sequential(nn.Linear(256, 256, bias=False))
    p = 0.3
    ctl = apply_graddrop(model, GradDropConfig(drop_prob=p, seed=11))
    n = 256 * 256
    sigma = math.sqrt(p * (1 - p) / n)
    for _ in range(3):
        m = ctl.mask_for("0.weight")
        frac = m.float().mean().item()
        assert abs(frac - (1 - p)) < 5 * sigma
        assert ctl.kept_fraction() == pytest.approx(frac)
        # rows are not all-or-nothing at element granularity
        assert (m.any(1) & ~m.all(1)).any()
        ctl.step()


def test_row_granularity_keeps_whole_rows_and_couples_bias():
    model = make_model()
    dense = dense_grads(model)
    ctl = apply_graddrop(model, GradDropConfig(drop_prob=0.5, granularity="row", include_bias=True))
    w, b = ctl.mask_for("up.weight"), ctl.mask_for("up.bias")
    rows = w[:, 0]
    assert torch.equal(w.all(1), w.any(1))  # each row all-kept or all-dropped
    assert 0 < rows.sum() < w.shape[0]
    assert torch.equal(rows, b)  # a row's bias entry shares its fate
    loss_of(model).backward()
    assert torch.all(model.up.weight.grad[~rows] == 0)
    assert torch.equal(model.up.weight.grad[rows], dense["up.weight"][rows])
    assert torch.equal(model.up.bias.grad, dense["up.bias"] * b)


def test_layer_granularity_all_or_nothing():
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(40)])
    ctl = apply_graddrop(model, GradDropConfig(drop_prob=0.5, granularity="layer", include_bias=True))
    kept = []
    for i in range(40):
        w, b = ctl.mask_for(f"{i}.weight"), ctl.mask_for(f"{i}.bias")
        assert w.all() or not w.any()
        assert bool(b.all()) == bool(w.all()) and (b.all() or not b.any())
        kept.append(bool(w.all()))
    assert 0 < sum(kept) < 40
    assert ctl.kept_fraction() == pytest.approx(sum(kept) / 40)


def test_rescale():
    p = 0.25
    model = make_model()
    dense = dense_grads(model)
    ctl = apply_graddrop(model, GradDropConfig(drop_prob=p, rescale=True))
    loss_of(model).backward()
    m = ctl.mask_for("up.weight")
    g = model.up.weight.grad
    torch.testing.assert_close(g[m], dense["up.weight"][m] / (1 - p))
    assert torch.all(g[~m] == 0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rescale", [False, True])
def test_half_precision_gradients_keep_dtype_and_the_fp32_mask(dtype, rescale):
    """A bf16/fp16 weight's gradient stays in its dtype and is zero exactly where the fp32 run (same
    seed and counter) drops; kept entries are the dense half-precision gradient (times 1/(1-p))."""
    p = 0.25
    cfg = GradDropConfig(drop_prob=p, rescale=rescale, seed=6)
    torch.manual_seed(0)
    lin32 = nn.Linear(40, 32)
    lin_half = copy.deepcopy(lin32).to(dtype)
    ctl32, ctl_half = apply_graddrop(lin32, cfg), apply_graddrop(lin_half, cfg)
    ctl32.step()
    ctl_half.step()
    probe_backward(lin32)
    c = probe_backward(lin_half)
    g = lin_half.weight.grad
    assert g.dtype == dtype and c.dtype == dtype
    keep32 = lin32.weight.grad != 0  # the fp32 run's applied mask, read off its gradient
    assert 0 < keep32.sum() < keep32.numel()
    assert torch.equal(g != 0, keep32)
    expected = c * (1 / (1 - p)) if rescale else c  # half-precision product, as the hook computes it
    assert torch.equal(g[keep32], expected[keep32])


def _owned_tensors(obj, params, seen=None):
    """Tensors reachable from ``obj`` through containers and sg_distributed.graddrop objects, except the
    model's own parameters (which the controller only references)."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if torch.is_tensor(obj):
        return [] if id(obj) in params else [obj]
    if isinstance(obj, dict):
        items = list(obj.keys()) + list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif type(obj).__module__.startswith("sg_distributed.graddrop") or dataclasses.is_dataclass(obj):
        items = list(vars(obj).values())
    else:
        return []
    return [t for item in items for t in _owned_tensors(item, params, seen)]


@pytest.mark.parametrize("granularity", ["element", "row", "layer"])
def test_controller_keeps_no_mask_state(granularity):
    """Masks are drawn inside the hook and dropped: after backward passes over two counters, on
    micro-batches too, the controller holds no tensor at all (the CPU-cache version held one bool per
    target entry here)."""
    model = make_model()
    ctl = apply_graddrop(model, GradDropConfig(drop_prob=0.5, granularity=granularity, include_bias=True))
    for step in range(2):
        loss_of(model, seed=step).backward()
        loss_of(model, seed=step + 7).backward()
        ctl.kept_fraction()
        ctl.mask_for("up.weight")
        ctl.step()
    params = {id(p) for p in model.parameters()}
    assert _owned_tensors(ctl, params) == []
    # the walk does reach the parameters the controller references (it would see a cache)
    assert sum(torch.is_tensor(t) for t in _owned_tensors(ctl, set())) == len(ctl.targets)


def test_applied_drop_fraction_within_binomial_bounds():
    """Element granularity on 512 x 512 = 262,144 entries: the fraction of gradient entries the hook
    zeroes is Binomial(n, p)/n, so it lies within 5 sigma = 5 sqrt(p (1 - p) / n) (~0.0045 at p = 0.3)
    of p unless the draws are broken (a chance miss is ~6e-7 per check; the seeds are fixed anyway)."""
    p, n = 0.3, 512 * 512
    sigma = math.sqrt(p * (1 - p) / n)
    lin = nn.Linear(512, 512, bias=False)
    ctl = apply_graddrop(lin, GradDropConfig(drop_prob=p, seed=12))
    previous = None
    for _ in range(3):
        lin.zero_grad(set_to_none=True)
        probe_backward(lin)
        dropped = lin.weight.grad == 0
        assert abs(dropped.float().mean().item() - p) < 5 * sigma
        assert ctl.kept_fraction() == pytest.approx(1 - dropped.float().mean().item())
        # no row or column structure: every row and column has both kept and dropped entries
        assert (dropped.any(1) & ~dropped.all(1)).all() and (dropped.any(0) & ~dropped.all(0)).all()
        if previous is not None:  # a fresh mask each step, independent of the last: overlap ~ p^2
            assert abs((dropped & previous).float().mean().item() - p * p) < 5 * math.sqrt(p * p * (1 - p * p) / n)
        previous = dropped
        ctl.step()


def test_hook_names_a_parameter_whose_gradient_is_not_its_logical_shape():
    """ZeRO-3 parameters carry their full shape in ds_shape and DeepSpeed hands tensor hooks the full
    gradient; a gradient of any other shape (a shard) gets an error naming the parameter."""
    lin = nn.Linear(16, 24)
    lin.weight.ds_shape = (48, 16)  # as if partitioned from a 48 x 16 weight
    ctl = apply_graddrop(lin, GradDropConfig(drop_prob=0.5))
    assert ctl.mask_for("weight").shape == (48, 16)
    with pytest.raises(RuntimeError, match=r"weight.*\(24, 16\).*\(48, 16\)"):
        probe_backward(lin)


# ---------------------------------------------------------------- resampling


def test_resample_step_shared_by_micro_batches():
    model = make_model()
    ctl = apply_graddrop(model, GradDropConfig(drop_prob=0.5, resample="step"))
    m0 = ctl.mask_for("up.weight")
    ctl.set_epoch(5)  # epoch does not matter in step mode
    assert torch.equal(ctl.mask_for("up.weight"), m0)
    # two micro-batches before step(): accumulated grad is zero outside m0
    loss_of(model, seed=1).backward()
    loss_of(model, seed=2).backward()
    g = model.up.weight.grad
    assert torch.all(g[~m0] == 0) and (g[m0] != 0).any()
    ref = make_model()
    loss_of(ref, seed=1).backward()
    loss_of(ref, seed=2).backward()
    torch.testing.assert_close(g, ref.up.weight.grad * m0)
    ctl.step()
    m1 = ctl.mask_for("up.weight")
    assert not torch.equal(m0, m1)
    model.zero_grad()
    loss_of(model).backward()
    assert torch.all(model.up.weight.grad[~m1] == 0)


def test_resample_epoch():
    ctl = apply_graddrop(make_model(), GradDropConfig(drop_prob=0.5, resample="epoch"))
    ctl.set_epoch(0)
    m0 = ctl.mask_for("up.weight")
    for _ in range(3):
        ctl.step()
        assert torch.equal(ctl.mask_for("up.weight"), m0)
    ctl.set_epoch(1)
    m1 = ctl.mask_for("up.weight")
    assert not torch.equal(m0, m1)
    state = ctl.state_dict()
    assert state == {"step": 3, "epoch": 1}
    ctl2 = apply_graddrop(make_model(), GradDropConfig(drop_prob=0.5, resample="epoch"))
    ctl2.load_state_dict(state)
    assert torch.equal(ctl2.mask_for("up.weight"), m1)


# ---------------------------------------------------------------- gradual unfreezing


def test_gradual_unfreezing():
    torch.manual_seed(0)
    blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
    model = nn.Sequential(*blocks)
    gu = GradualUnfreezing(blocks, unfreeze_every=2)
    x = torch.randn(4, 8)

    def nonzero_blocks():
        model.zero_grad(set_to_none=True)
        model(x).pow(2).sum().backward()
        return [i for i, b in enumerate(blocks) if any(p.grad.abs().sum() > 0 for p in b.parameters())]

    assert nonzero_blocks() == [3] and gu.active_blocks() == [3]
    assert gu.kept_fraction() == pytest.approx(0.25)
    gu.step()
    assert nonzero_blocks() == [3]
    gu.step()
    assert nonzero_blocks() == [2, 3]
    for _ in range(10):
        gu.step()
    assert nonzero_blocks() == [0, 1, 2, 3]
    gu2 = GradualUnfreezing(nn.ModuleList([nn.Linear(2, 2) for _ in range(4)]), unfreeze_every=2)
    gu2.load_state_dict(gu.state_dict())
    assert gu2.num_active == 4
    gu.remove()
    gu._step = 0
    assert nonzero_blocks() == [0, 1, 2, 3]


def test_gradual_unfreezing_bad_args():
    with pytest.raises(ValueError, match="unfreeze_every"):
        GradualUnfreezing([nn.Linear(2, 2)], unfreeze_every=0)
    with pytest.raises(ValueError, match="blocks"):
        GradualUnfreezing([], unfreeze_every=1)


def test_masks_identical_in_another_process():
    """A 'rank' in a fresh interpreter with a different PYTHONHASHSEED draws the same mask."""
    import os
    import subprocess
    import sys

    code = (
        "import hashlib, torch; from torch import nn\n"
        "from sg_distributed.graddrop import GradDropConfig, apply_graddrop\n"
        "m = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16), nn.Linear(16, 40000, bias=False))\n"
        "c = apply_graddrop(m, GradDropConfig(drop_prob=0.5, seed=9)); c.step(); c.step()\n"
        "print(''.join('1' if v else '0' for v in c.mask_for('1.weight').flatten().tolist()))\n"
        "print(hashlib.sha256(c.mask_for('2.weight').numpy().tobytes()).hexdigest())\n"
    )
    # another hash seed, and two threads against this process's one: the 640,000-entry draw spans
    # several CPU work chunks, so a thread-dependent generator would show here
    env = dict(os.environ, PYTHONHASHSEED="12345", OMP_NUM_THREADS="2")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    m = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16), nn.Linear(16, 40000, bias=False))
    c = apply_graddrop(m, GradDropConfig(drop_prob=0.5, seed=9))
    c.step()
    c.step()
    here = "".join("1" if v else "0" for v in c.mask_for("1.weight").flatten().tolist())
    big = hashlib.sha256(c.mask_for("2.weight").numpy().tobytes()).hexdigest()
    assert out.stdout.split() == [here, big]


# ---------------------------------------------------------------- DeepSpeed ZeRO-3 (2 ranks)

ZERO3_WORKER = """
import copy, json, sys
sys.path[:0] = [sys.argv[2], sys.argv[2] + "/tests"]
import torch, torch.distributed as dist
from deepspeed.utils import safe_get_full_grad
from comm_worker import ds_config
from conftest import lm_batches, make_tiny_llama
from sg_distributed.sparsegrad.config import SparseGradConfig
from sg_distributed.graddrop import GradDropConfig
from sg_distributed.integrations.deepspeed import init_distributed, initialize_engine
from sg_distributed.training.methods import prepare

init_distributed()
rank, world = dist.get_rank(), dist.get_world_size()
model = make_tiny_llama(layers=2, hidden=64, intermediate=256)
ref = copy.deepcopy(model)
batches = lm_batches(n=world, batch=2, seq=12, seed=11)
prepared = prepare("graddrop", model, SparseGradConfig(density=0.05), graddrop=GradDropConfig(drop_prob=0.5, seed=3))
ctl = prepared.info["controller"]
hook_shapes = {}


def record_shape(name):
    def hook(grad):
        hook_shapes[name] = tuple(grad.shape)  # returns None: the gradient is left as GradDrop made it
    return hook


for name in ctl.targets:
    model.get_parameter(name).register_hook(record_shape(name))
engine = initialize_engine(prepared.model, prepared.make_optimizer(1e-3), ds_config(3, 2, world))
engine.backward(engine(**batches[rank]).loss)
for b in batches:  # dense reference on one process: the mean over the ranks' batches, as DeepSpeed reduces
    (ref(**b).loss / world).backward()
params = dict(engine.module.named_parameters())
out = {}
for name in ctl.targets:
    full, keep, dense = safe_get_full_grad(params[name]), ctl.mask_for(name), ref.get_parameter(name).grad
    out[name] = {"local": list(params[name].shape), "ds_shape": list(params[name].ds_shape),
                 "hook": list(hook_shapes[name]), "kept": keep.float().mean().item(),
                 "nonzero_where_dropped": int((full[~keep] != 0).sum()),
                 "max_err": (full - dense * keep).abs().max().item(), "dense_max": dense.abs().max().item()}
if rank == 0:
    json.dump(out, open(sys.argv[1], "w"))
dist.destroy_process_group()
"""


@pytest.mark.multiprocess
def test_zero3_hooks_see_the_full_gradient_and_the_reduced_gradient_is_masked(tmp_path):
    """2 ranks under DeepSpeed ZeRO-3 (CPU, gloo), each on its own batch: the local parameters are
    empty shards, yet every GradDrop hook receives the full logical-shape gradient (ds_shape), and the
    reduced full gradient equals the mean of the ranks' dense gradients (computed on one process)
    times the shared mask, exactly zero where it drops."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from conftest import free_port, run_ranks

    root = Path(__file__).resolve().parents[2]
    worker, out = tmp_path / "zero3_worker.py", tmp_path / "zero3.json"
    worker.write_text(ZERO3_WORKER)
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(worker), str(out), str(root)]
    proc = run_ranks(cmd, cwd=root, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result) == 4  # up_proj and down_proj weights of 2 blocks
    for name, r in result.items():
        assert r["local"] == [0] and r["hook"] == r["ds_shape"] and len(r["ds_shape"]) == 2, (name, r)
        assert abs(r["kept"] - 0.5) < 0.05, (name, r)
        assert r["nonzero_where_dropped"] == 0, (name, r)
        assert r["max_err"] <= 1e-6 * max(1.0, r["dense_max"]), (name, r)


# ---------------------------------------------------------------- CUDA (skipped without a GPU)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_hook_draws_on_device_without_host_sync(dtype):
    """On CUDA the hook draws with Philox on the gradient's device: its mask equals
    mask_for(name, device="cuda") and a second 'rank' draws the same; the backward pass makes no
    host-device sync (sync debug mode "error" raises on one). 1024 x 640 = 655,360 entries exceed an
    H100/H200's uncapped grid (270,336), so the grid-capped path is the one tested; the dropped fraction
    is within 5 sigma of p."""
    p, n = 0.3, 1024 * 640
    cfg = GradDropConfig(drop_prob=p, seed=21, rescale=True)
    torch.manual_seed(0)
    base = nn.Linear(640, 1024).to(device="cuda", dtype=dtype)
    ranks = [copy.deepcopy(base), copy.deepcopy(base)]
    ctls = [apply_graddrop(m, cfg) for m in ranks]
    for m in ranks:
        c = coefficients(m.weight.shape, 5, dtype, "cuda")
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            (m.weight * c).sum().backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert m.weight.grad.dtype == dtype and m.weight.grad.device.type == "cuda"
    keep = ctls[0].mask_for("weight", device="cuda")
    assert keep.device.type == "cuda"
    assert torch.equal(ranks[0].weight.grad != 0, keep)
    assert torch.equal(ranks[0].weight.grad, ranks[1].weight.grad)
    assert torch.equal(ranks[0].weight.grad[keep], (c * (1 / (1 - p)))[keep])
    assert abs((~keep).float().mean().item() - p) < 5 * math.sqrt(p * (1 - p) / n)
    assert ctls[0].kept_fraction(device="cuda") == pytest.approx(keep.float().mean().item())
    assert _owned_tensors(ctls[0], {id(q) for q in ranks[0].parameters()}) == []
