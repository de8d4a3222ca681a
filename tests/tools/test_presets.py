"""LLaMA-2-7B/13B presets: real module trees on the meta device, DESIGN §2's numbers, the command's output."""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sg_distributed.distributed.comm import design_cost_check, fmt_bytes
from sg_distributed.tools.presets import (
    K_7B, K_13B, PAPER_DENSITY, PRESETS, cost_report, format_report, get_preset, parse_markdown_tables)
from sg_distributed.sparsegrad.targets import find_target_linears

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def meta_models():
    t0 = time.perf_counter()
    models = {name: preset.build_meta_model() for name, preset in PRESETS.items()}
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"building both presets on meta took {elapsed:.1f}s"
    return models


def test_meta_models_have_the_real_shapes_and_no_storage(meta_models):
    m7, m13 = meta_models["llama-2-7b"], meta_models["llama-2-13b"]
    assert all(p.device.type == "meta" for p in m7.parameters())
    assert sum(p.numel() for p in m7.parameters()) == 6_738_415_616  # the published 6.74 B
    assert sum(p.numel() for p in m13.parameters()) == 13_015_864_320  # the published 13.0 B
    up = m7.get_submodule("model.layers.0.mlp.up_proj")
    assert (up.out_features, up.in_features) == (11008, 4096)
    down = m13.get_submodule("model.layers.39.mlp.down_proj")
    assert (down.out_features, down.in_features) == (5120, 13824)


@pytest.mark.parametrize("name,matrices,blocks", [("llama-2-7b", 22, 11), ("llama-2-13b", 28, 14)])
def test_targets_every_third_block(meta_models, name, matrices, blocks):
    preset = get_preset(name)
    cfg = preset.sparsegrad_config()
    targets = find_target_linears(meta_models[name], cfg.target_modules, cfg.blocks, cfg.block_stride)
    assert len(targets) == matrices
    assert {n.rsplit(".", 1)[-1] for n in targets} == {"up_proj", "down_proj"}
    assert sorted({int(n.split(".")[2]) for n in targets}) == list(range(0, 3 * blocks, 3))


def test_budget_is_the_papers_fraction():
    assert K_7B == 100_000
    assert K_13B == 156_977
    assert abs(K_13B / (13824 * 5120) - PAPER_DENSITY) < 1e-8
    assert f"{100 * PAPER_DENSITY:.2f}" == "0.22"


def test_7b_bf16_8_ranks_matches_design(meta_models):
    r = cost_report("llama-2-7b", ranks=(8, 64), dtype="bf16", model=meta_models["llama-2-7b"])
    assert r["matrices"] == 22 and r["k_total"] == 22 * 100_000
    w8 = r["wire"][0]
    assert w8["p"] == 8
    # DESIGN §2: dense 3.47 GB, sparse all-gather 92 MB (38x), k-vector 7.7 MB (451x)
    assert fmt_bytes(w8["dense_allreduce"]) == "3.47 GB"
    assert round(w8["sparse_allgather"] / 1e6) == 92
    assert fmt_bytes(w8["kvector_allreduce"]) == "7.7 MB"
    assert round(w8["sparse_ratio"]) == 38 and round(w8["kvector_ratio"]) == 451
    check = design_cost_check()  # the same formulas, the hard-coded shapes of comm.py
    for key in ("dense_allreduce", "sparse_allgather", "kvector_allreduce"):
        assert w8[key] == pytest.approx(check[key], rel=1e-12)
    # optimizer state: 12 B/entry (fp32 moments + master) for both; the ratio is the density
    assert r["optimizer_state_sparsegrad"] == 12 * 2_200_000
    assert r["optimizer_state_sparsegrad"] / r["optimizer_state_dense"] == pytest.approx(r["density"])
    assert r["lora_rank"] == 7  # 2.2 M / (22 * (11008 + 4096)) = 6.6


def test_fp32_drops_the_master_copy(meta_models):
    r = cost_report("llama-2-7b", ranks=(2,), dtype="fp32", model=meta_models["llama-2-7b"])
    assert r["optimizer_state_per_entry"] == 8
    assert r["wire"][0]["dense_allreduce"] == r["N"] * 4  # 2(p-1)/p = 1 at p = 2


def test_unknown_preset_is_a_clear_error():
    with pytest.raises(ValueError, match="llama-2-7b"):
        get_preset("llama-3-8b")


def test_command_output_parses():
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "sg_distributed.tools.presets", "--model", "llama-2-7b", "--ranks", "8", "64",
                           "--dtype", "bf16"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    summary, wire = parse_markdown_tables(proc.stdout)
    values = {row[0]: row[1] for row in summary[1:]}
    assert values["converted matrices"] == "22"
    assert values["trainable parameters (sum of k)"] == "2,200,000"
    assert values["LoRA matched rank"] == "7"
    header, *rows = wire
    assert header[0] == "ranks" and [row[0] for row in rows] == ["8", "64"]
    dense, sparse, kvec = (int(rows[0][i].split(" ")[0].replace(",", "")) for i in (1, 2, 4))
    assert (fmt_bytes(dense), round(sparse / 1e6), fmt_bytes(kvec)) == ("3.47 GB", 92, "7.7 MB")


def test_format_report_round_trips_13b(meta_models):
    r = cost_report("llama-2-13b", ranks=(8, 64), model=meta_models["llama-2-13b"])
    summary, wire = parse_markdown_tables(format_report(r))
    values = {row[0]: row[1] for row in summary[1:]}
    assert values["converted matrices"] == "28" and values["k per matrix"] == "156,977"
    assert len(wire) == 3  # header + 2 rank counts
