"""Tests for sg_distributed.integrations.deepspeed (config handling + one real 2-rank ZeRO-2 run)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from sg_distributed.integrations.deepspeed import (
    DeepSpeedConfigError,
    load_ds_config,
    resolve_auto,
    skip_shm_comm_build,
    validate_ds_config,
)

from conftest import free_port, run_ranks

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "ds_configs"
HF_ARGS = dict(world_size=2, micro_batch_size=4, gradient_accumulation_steps=2, max_grad_norm=1.0,
               hidden_size=576, precision="fp32")


def _auto_paths(node, prefix=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _auto_paths(v, f"{prefix}.{k}" if prefix else k)
    elif node == "auto":
        yield prefix


# ------------------------------------------------------------------ shipped configs


@pytest.mark.parametrize("name,stage", [("zero2", 2), ("zero3", 3), ("zero3_offload", 3)])
def test_shipped_configs_are_hf_style(name, stage):
    cfg = load_ds_config(CONFIGS / f"{name}.json")
    validate_ds_config(cfg)
    assert cfg["zero_optimization"]["stage"] == stage
    assert cfg["zero_allow_untested_optimizer"] is True
    assert "optimizer" not in cfg and "scheduler" not in cfg
    autos = set(_auto_paths(cfg))
    assert {"train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
            "gradient_clipping", "bf16.enabled", "fp16.enabled", "zero_optimization.reduce_bucket_size"} <= autos
    if name == "zero3_offload":
        assert cfg["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert cfg["zero_force_ds_cpu_optimizer"] is False  # else a client optimizer is refused


# ------------------------------------------------------------------ auto resolution


def test_resolve_auto_matches_hf_rules_zero3():
    cfg = load_ds_config(CONFIGS / "zero3.json")
    before = json.dumps(cfg, sort_keys=True)
    out = resolve_auto(cfg, **HF_ARGS)
    assert json.dumps(cfg, sort_keys=True) == before  # input untouched
    assert out["train_micro_batch_size_per_gpu"] == 4
    assert out["gradient_accumulation_steps"] == 2
    assert out["train_batch_size"] == 4 * 2 * 2
    assert out["gradient_clipping"] == 1.0
    z = out["zero_optimization"]
    assert z["reduce_bucket_size"] == 576 * 576 == 331776
    assert z["stage3_prefetch_bucket_size"] == int(0.9 * 576 * 576) == 298598
    assert z["stage3_param_persistence_threshold"] == 10 * 576
    assert out["bf16"]["enabled"] is False and out["fp16"]["enabled"] is False
    assert list(_auto_paths(out)) == []


def _converted_tiny(hidden=8, inter=16, ks=(100, 90)):
    """Two SparseGradLinear layers (identity bases) whose k-vectors exceed 10 * hidden."""
    import torch
    from torch import nn

    from sg_distributed.sparsegrad.layer import SparseGradLinear
    from sg_distributed.sparsegrad.selection import Support

    def layer(m, n, k):
        return SparseGradLinear(nn.Linear(n, m), torch.eye(m), torch.eye(n),
                                Support.from_flat(torch.arange(k), (m, n)))

    return nn.Sequential(layer(inter, hidden, ks[0]), layer(hidden, inter, ks[1]))


def test_resolve_auto_persists_sparsegrad_k_vectors():
    """ZeRO-3 "auto" threshold covers the largest k (DeepSpeed persists numel <= threshold); explicit kept."""
    from sg_distributed.integrations.deepspeed import largest_sparse_k

    model = _converted_tiny()
    assert 10 * 8 < largest_sparse_k(model) == 100
    args = {**HF_ARGS, "hidden_size": 8}
    cfg = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": "auto"}}
    z = resolve_auto(cfg, **args, model=model)["zero_optimization"]
    assert z["stage3_param_persistence_threshold"] == 100
    assert all(p.numel() <= z["stage3_param_persistence_threshold"]
               for p in model.parameters() if p.requires_grad)
    assert resolve_auto(cfg, **args)["zero_optimization"]["stage3_param_persistence_threshold"] == 80  # no model
    assert resolve_auto(cfg, **{**args, "hidden_size": 64}, model=model)["zero_optimization"][
        "stage3_param_persistence_threshold"] == 640  # 10 * hidden already covers k
    model[0].sparsegrad_values.requires_grad_(False)  # frozen k-vectors do not count
    assert largest_sparse_k(model) == 90 and largest_sparse_k(None) == 0
    explicit = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    assert resolve_auto(explicit, **args, model=model)["zero_optimization"][
        "stage3_param_persistence_threshold"] == 0


def test_trainer_configs_keep_k_vectors_persistent(tmp_path):
    """For the HF Trainer / TRL: only the ZeRO-3 "auto" persistence threshold is filled, with the largest k
    of the converted model or of the base model + the SparseGradConfig TRL will apply; the rest stays "auto"."""
    from peft import get_peft_model

    from conftest import make_tiny_llama
    from sg_distributed import SparseGradConfig
    from sg_distributed.integrations.deepspeed import with_persistent_k_vectors

    config = SparseGradConfig(density=0.5, max_rows=None, max_cols=None)  # k = 1024 > 10 x hidden (320)
    base = make_tiny_llama()
    path = tmp_path / "zero3.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {
        "stage": 3, "stage3_param_persistence_threshold": "auto", "reduce_bucket_size": "auto"}}))
    from_base = with_persistent_k_vectors(path, base, config)
    assert from_base["zero_optimization"] == {"stage": 3, "stage3_param_persistence_threshold": 1024,
                                              "reduce_bucket_size": "auto"}
    assert from_base["train_batch_size"] == "auto"
    peft_model = get_peft_model(base, config)
    assert with_persistent_k_vectors(path, peft_model) == from_base
    small = SparseGradConfig(density=0.01)
    assert with_persistent_k_vectors(path, make_tiny_llama(), small)["zero_optimization"][
        "stage3_param_persistence_threshold"] == 320  # 10 x hidden already covers k
    explicit = {"zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 7}}
    assert with_persistent_k_vectors(explicit, peft_model) == explicit


def test_resolve_auto_matches_transformers_hf_trainer_config():
    """Same numbers as transformers' HfTrainerDeepSpeedConfig for the batch/clip/precision keys."""
    hf_ds = pytest.importorskip("transformers.integrations.deepspeed")
    from types import SimpleNamespace

    cfg = load_ds_config(CONFIGS / "zero2.json")
    hf = hf_ds.HfTrainerDeepSpeedConfig(json.loads(json.dumps(cfg)))
    args = SimpleNamespace(world_size=2, per_device_train_batch_size=4, gradient_accumulation_steps=2,
                           max_grad_norm=1.0, learning_rate=1e-3, adam_beta1=0.9, adam_beta2=0.999,
                           adam_epsilon=1e-8, weight_decay=0.0, save_on_each_node=False, fp16=False,
                           fp16_full_eval=False, bf16=True, bf16_full_eval=False)
    hf.trainer_config_process(args)
    hf.fill_only("zero_optimization.reduce_bucket_size", 576 * 576)  # trainer_config_finalize's rule
    ours = resolve_auto(cfg, **{**HF_ARGS, "precision": "bf16"})
    # beyond HF's rules: fp32 gradient reduction and accumulation in bf16/fp16 (see test_resolve_auto_precision)
    assert ours.pop("communication_data_type") == "fp32" and ours.pop("data_types") == {"grad_accum_dtype": "fp32"}
    assert ours == hf.config


def test_resolve_auto_precision():
    cfg = load_ds_config(CONFIGS / "zero2.json")
    bf16 = resolve_auto(cfg, **{**HF_ARGS, "precision": "bf16"})
    assert bf16["bf16"]["enabled"] is True and bf16["fp16"]["enabled"] is False
    fp16 = resolve_auto(cfg, **{**HF_ARGS, "precision": "fp16"})
    assert fp16["bf16"]["enabled"] is False and fp16["fp16"]["enabled"] is True
    # no precision blocks at all: the requested one is added
    assert resolve_auto({}, **{**HF_ARGS, "precision": "bf16"})["bf16"] == {"enabled": True}
    with pytest.raises(DeepSpeedConfigError, match=r"fp16\.enabled=True.*precision='bf16'"):
        resolve_auto({"fp16": {"enabled": True}}, **{**HF_ARGS, "precision": "bf16"})
    with pytest.raises(DeepSpeedConfigError, match=r"bf16\.enabled=False"):
        resolve_auto({"bf16": {"enabled": False}}, **{**HF_ARGS, "precision": "bf16"})
    with pytest.raises(DeepSpeedConfigError, match="precision"):
        resolve_auto({}, **{**HF_ARGS, "precision": "fp8"})
    # low precision reduces and accumulates gradients in fp32 unless the config says otherwise; fp32 adds nothing
    for low in (bf16, fp16):
        assert low["communication_data_type"] == "fp32" and low["data_types"]["grad_accum_dtype"] == "fp32"
    fp32 = resolve_auto(cfg, **HF_ARGS)
    assert "communication_data_type" not in fp32 and "data_types" not in fp32
    explicit = {"communication_data_type": "bf16", "data_types": {"grad_accum_dtype": "bf16"}}
    kept = resolve_auto(explicit, **{**HF_ARGS, "precision": "bf16"})
    assert kept["communication_data_type"] == "bf16" and kept["data_types"] == {"grad_accum_dtype": "bf16"}


def test_batch_sizes_that_do_not_multiply_out():
    with pytest.raises(DeepSpeedConfigError) as exc:
        resolve_auto({"train_batch_size": 32, "train_micro_batch_size_per_gpu": "auto"}, **HF_ARGS)
    msg = str(exc.value)
    assert "train_batch_size=32" in msg and "(4)" in msg and "(2)" in msg and "world_size (2)" in msg
    assert "16" in msg
    # explicit values that agree are kept
    out = resolve_auto({"train_batch_size": 16, "train_micro_batch_size_per_gpu": 4}, **HF_ARGS)
    assert out["train_batch_size"] == 16
    with pytest.raises(DeepSpeedConfigError, match="train_micro_batch_size_per_gpu=8"):
        resolve_auto({"train_micro_batch_size_per_gpu": 8}, **HF_ARGS)


def test_leftover_auto_names_its_path():
    cfg = {"zero_optimization": {"stage": 2, "foo": "auto"}, "optimizer": {"type": "AdamW",
           "params": {"lr": "auto", "torch_adam": True}}}
    with pytest.raises(DeepSpeedConfigError) as exc:
        resolve_auto(cfg, **HF_ARGS)
    assert "zero_optimization.foo" in str(exc.value) and "optimizer.params.lr" in str(exc.value)


def test_hidden_size_needed_for_bucket_autos():
    with pytest.raises(DeepSpeedConfigError, match="zero_optimization.reduce_bucket_size"):
        resolve_auto({"zero_optimization": {"stage": 2, "reduce_bucket_size": "auto"}},
                     **{**HF_ARGS, "hidden_size": None})


# ------------------------------------------------------------------ validation


@pytest.mark.parametrize("stage", [4, -1, "3", True, "auto"])
def test_unknown_stage(stage):
    with pytest.raises(DeepSpeedConfigError, match="zero_optimization.stage"):
        validate_ds_config({"zero_optimization": {"stage": stage}})


def test_removed_sparse_gradients():
    with pytest.raises(DeepSpeedConfigError, match="sparse_gradients.*remove the key"):
        validate_ds_config({"sparse_gradients": True})


@pytest.mark.parametrize("opt", ["OneBitAdam", "ZeroOneAdam", "OneBitLamb", "onebitadam"])
def test_removed_onebit_optimizers(opt):
    with pytest.raises(DeepSpeedConfigError, match="removed in DeepSpeed 0.19.8.*AdamW"):
        validate_ds_config({"optimizer": {"type": opt, "params": {"lr": 1e-3}}})


def test_other_removed_keys_rejected():
    with pytest.raises(DeepSpeedConfigError, match="compression_training"):
        validate_ds_config({"compression_training": {}})
    with pytest.raises(DeepSpeedConfigError, match="mics_shard_size"):
        validate_ds_config({"zero_optimization": {"stage": 3, "mics_shard_size": 2}})


def test_adam_block_without_torch_adam_warns():
    with pytest.warns(UserWarning, match="FusedAdam.*torch_adam"):
        validate_ds_config({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    with pytest.warns(UserWarning, match="cpu_adam"):
        validate_ds_config({"optimizer": {"type": "Adam"},
                            "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"}}})
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        validate_ds_config({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}}})


# ------------------------------------------------------------------ loading


def test_missing_file(tmp_path):
    missing = tmp_path / "nope.json"
    with pytest.raises(DeepSpeedConfigError, match="not found.*nope.json"):
        load_ds_config(missing)


def test_invalid_json_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "train_batch_size": 8,\n  "zero_optimization": {"stage": 2,}\n}\n')
    with pytest.raises(DeepSpeedConfigError) as exc:
        load_ds_config(bad)
    assert "bad.json" in str(exc.value) and "line 3" in str(exc.value) and "column" in str(exc.value)


def test_top_level_not_an_object(tmp_path):
    f = tmp_path / "list.json"
    f.write_text("[1, 2]")
    with pytest.raises(DeepSpeedConfigError, match="JSON object.*list"):
        load_ds_config(f)


def test_skip_shm_comm_build_is_idempotent():
    import deepspeed.ops

    skip_shm_comm_build()
    skip_shm_comm_build()
    assert deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] is False


# ------------------------------------------------------------------ real 2-rank run


@pytest.mark.multiprocess
def test_zero2_two_ranks_torchrun(tmp_path):
    out = tmp_path / "result.json"
    env = {**os.environ, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "tests" / "ds_smoke_worker.py"),
           "--config", str(CONFIGS / "zero2.json"), "--out", str(out)]
    proc = run_ranks(cmd, cwd=REPO, env=env, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ranks = json.loads(out.read_text())["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1]
    assert all(r["stage"] == 2 for r in ranks)
    for r in ranks:
        assert r["final_loss"] < 0.5 * r["initial_loss"], r
        assert all(r["p_grad_is_none_after_backward"].values())  # ZeRO keeps grads to itself
        assert r["new_torch_extensions"] == []  # no JIT build (shm comm skipped, client AdamW)
    assert ranks[0]["final_loss"] == pytest.approx(ranks[1]["final_loss"], rel=1e-6, abs=1e-7)
