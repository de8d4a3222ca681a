"""SparseGradConfig validation and JSON round trip."""
import pytest

from sg_distributed import SparseGradConfig


def test_json_round_trip(tmp_path):
    config = SparseGradConfig(target_modules=["up_proj"], k=100, max_rows=0.5, basis_sharing="layer",
                              input_convention="reference", block_stride=3)
    path = tmp_path / "c.json"
    config.to_json(path)
    assert SparseGradConfig.from_json(path) == config
    assert SparseGradConfig.from_json(config.to_json()) == config


def test_k_wins_over_density_and_budgets_resolve():
    config = SparseGradConfig(k=7, density=0.5, max_rows=0.25, max_cols=10)
    assert config.entries_for(8, 8) == 7
    assert SparseGradConfig(density=0.01).entries_for(768, 3072) == 23593
    assert config.block_budget(64, 64) == (16, 10) and config.block_budget(64, 4) == (16, 4)
    assert SparseGradConfig(max_rows=None, max_cols=None).block_budget(6, 5) == (6, 5)
    # balanced: fractions of the other side, so T*m*r == T*n*c (counts stay counts, clipped to the side)
    wide = SparseGradConfig(budget_axes="balanced")
    assert wide.block_budget(1536, 576) == (144, 384) and wide.block_budget(576, 1536) == (384, 144)
    assert SparseGradConfig(budget_axes="balanced", max_rows=0.5, max_cols=10).block_budget(8, 100) == (8, 10)


@pytest.mark.parametrize("kwargs,message", [
    (dict(k=0), r"k must be a positive integer, got 0"),
    (dict(density=0.0), r"density must be in \(0, 1\], got 0.0"),
    (dict(density=1.5), r"density must be in \(0, 1\]"),
    (dict(basis="svd"), r"basis='svd' is not valid; choose one of \['hosvd', 'identity'\]"),
    (dict(budget_axes="cost"), r"budget_axes='cost' is not valid; choose one of \['own', 'balanced'\]"),
    (dict(support_mode="adaptive"), r"support_mode='adaptive'.*\['fixed', 'reference', 'dynamic'\]"),
    (dict(exchange="gossip"), r"exchange='gossip'.*\['exact', 'sparse'\]"),
    (dict(max_rows=-1), r"max_rows must be > 0"),
])
def test_bad_values_are_named(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SparseGradConfig(**kwargs)


def test_unknown_keys_and_bad_json_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"unknown keys \['densty'\]"):
        SparseGradConfig.from_dict({"densty": 0.1})
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="bad.json is not valid JSON"):
        SparseGradConfig.from_json(bad)
