"""2 ranks under DeepSpeed ZeRO-2 / ZeRO-3 end where 1 rank ends on the same global batches (fp32)."""
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["--steps", "4", "--calibration_steps", "2", "--eval_size", "4", "--no_eval_before", "--density", "0.5",
          "--max_rows", "0", "--max_cols", "0", "--lr", "1e-2", "--micro_batch_size", "2"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(cmd, out: Path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd + ["--output_dir", str(out)], env=env, cwd=ROOT, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return load_file(str(out / "adapter" / "adapter_model.safetensors")), proc.stdout


@pytest.fixture(scope="module")
def one_rank(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_rank")
    cmd = [sys.executable, "launch/train_qa.py", "--model", str(tiny_model_dir), *COMMON, "--grad_accum", "2"]
    return run(cmd, out)[0]


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
def test_two_rank_zero_equals_one_rank(stage, tiny_model_dir, one_rank, tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "launch/train_qa.py", "--model", str(tiny_model_dir), *COMMON,
           "--grad_accum", "1", "--ds_config", f"ds_configs/zero{stage}.json"]
    two_rank, stdout = run(cmd, tmp_path)
    assert f'"stage": {stage}' in stdout and "world size 2" in stdout
    values = sorted(k for k in one_rank if k.endswith("sparse_values"))
    assert values and sorted(k for k in two_rank if k.endswith("sparse_values")) == values
    for key in one_rank:  # supports and bases identical, values equal within fp32 tolerance
        assert one_rank[key].shape == two_rank[key].shape, key
        torch.testing.assert_close(two_rank[key], one_rank[key], atol=1e-5, rtol=0, msg=key)
    assert any(one_rank[k].abs().sum() > 0 for k in values)  # training moved the values
