import copy
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
        "import torch; from torch import nn\n"
        "from sg_distributed.graddrop import GradDropConfig, apply_graddrop\n"
        "m = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16))\n"
        "c = apply_graddrop(m, GradDropConfig(drop_prob=0.5, seed=9)); c.step(); c.step()\n"
        "print(''.join('1' if v else '0' for v in c.mask_for('1.weight').flatten().tolist()))\n"
    )
    env = dict(os.environ, PYTHONHASHSEED="12345", OMP_NUM_THREADS="1")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    m = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 16))
    c = apply_graddrop(m, GradDropConfig(drop_prob=0.5, seed=9))
    c.step()
    c.step()
    here = "".join("1" if v else "0" for v in c.mask_for("1.weight").flatten().tolist())
    assert out.stdout.strip() == here
