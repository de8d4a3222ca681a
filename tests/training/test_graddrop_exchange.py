"""launch/train_qa.py --method graddrop with the kept-only exchange (--graddrop_exchange): 2 ranks == 1 rank, the
counted bytes, and a resumed run that keeps the masks."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, run_ranks

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}
# p = 0.9, whole rows, rescaled kept gradients, a mask per epoch of the data (the QA set has ~20 global batches of
# 4 per epoch, so all 4 steps share one mask: a resumed run must redraw that same mask)
GRADDROP = ["--method", "graddrop", "--drop_prob", "0.9", "--graddrop_granularity", "row", "--graddrop_rescale",
            "--graddrop_resample", "epoch", "--steps", "4", "--eval_size", "2", "--no_eval_before",
            "--micro_batch_size", "2", "--save_every", "2", "--lr", "1e-2"]
TARGET_ENTRIES = 4 * 32 * 64  # MLP up and down weights of the tiny Llama's 2 blocks


def launch(tiny_model_dir, ranks, out, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(ranks), "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "launch/train_qa.py", "--model", str(tiny_model_dir), *GRADDROP,
           "--output_dir", str(out), *extra]
    proc = run_ranks(cmd, env=ENV)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def trained(out: Path, step: int = 4) -> tuple[dict, list]:
    state = torch.load(out / "checkpoints" / f"step_{step}" / "trainable_state.pt", weights_only=False)
    losses = json.loads((out / "checkpoints" / f"step_{step}" / "trainer_state.json").read_text())["losses"]
    return state["params"], losses


@pytest.mark.multiprocess
def test_two_ranks_kept_exchange_equals_one_rank_and_resume_keeps_the_masks(tiny_model_dir, tmp_path):
    """DDP with the comm hook: 2 ranks end bit-identical to 1 rank x 2 micro-batches (weights and losses) while
    sending about 10 % of the dense bytes; resumed from step 2 on 2 ranks, the run ends bit-identical too."""
    two = tmp_path / "two"
    stdout = launch(tiny_model_dir, 2, two)
    assert "GradDrop exchange: kept entries only" in stdout
    one = tmp_path / "one"
    launch(tiny_model_dir, 1, one, "--grad_accum", "2")
    (params2, losses2), (params1, losses1) = trained(two), trained(one)
    assert losses2 == losses1
    assert sorted(params2) == sorted(params1) and all(torch.equal(params2[k], params1[k]) for k in params1)
    sent = json.loads((two / "metrics.json").read_text())["comm_bytes_per_step"]["by_label"]
    assert set(sent) == {"backward"} and 0 < sent["backward"] <= 0.12 * 4 * TARGET_ENTRIES, sent

    resumed = tmp_path / "resumed"
    stdout = launch(tiny_model_dir, 2, resumed, "--resume", str(two / "checkpoints" / "step_2"))
    assert "resume: from" in stdout
    params_r, losses_r = trained(resumed)
    assert losses_r == losses2 and all(torch.equal(params_r[k], params2[k]) for k in params2)


@pytest.mark.multiprocess
def test_zero2_kept_exchange_matches_one_rank(tiny_model_dir, tmp_path):
    """DeepSpeed ZeRO-2 with the bucket-reduction override (reduce_scatter switched off): the same training as one
    process within fp32 1e-5 (ZeRO's flat fp32 Adam), gradient bytes about 10 % of dense."""
    one = tmp_path / "one"
    launch(tiny_model_dir, 1, one, "--grad_accum", "2", "--graddrop_granularity", "element")
    zero2 = tmp_path / "zero2"
    stdout = launch(tiny_model_dir, 2, zero2, "--ds_config", "ds_configs/zero2.json", "--graddrop_exchange", "kept",
                    "--graddrop_granularity", "element")
    assert "GradDrop exchange: kept entries only (ZeRO-2 with reduce_scatter false)" in stdout
    (params_z, losses_z), (params1, losses1) = trained(zero2), trained(one)
    torch.testing.assert_close(torch.tensor(losses_z), torch.tensor(losses1), atol=1e-5, rtol=0)
    for key in params1:
        torch.testing.assert_close(params_z[key], params1[key], atol=1e-5, rtol=0, msg=key)
    sent = json.loads((zero2 / "metrics.json").read_text())["comm_bytes_per_step"]["by_label"]
    assert 0 < sent["backward"] <= 0.12 * 4 * TARGET_ENTRIES, sent


@pytest.mark.multiprocess
def test_fsdp2_graddrop_masks_in_the_reduce_scatter_and_equals_one_rank(tiny_model_dir, tmp_path):
    """--fsdp: GradDrop (allowed now) masks inside FSDP2's reduce-scatter; kept and dense exchanges both end
    bit-identical to one process without FSDP2 (weights and losses), the kept one reduce-scattering fewer bytes."""
    one = tmp_path / "one"
    launch(tiny_model_dir, 1, one, "--grad_accum", "2")
    params1, losses1 = trained(one)
    sent = {}
    for mode in ("kept", "dense"):
        out = tmp_path / mode
        stdout = launch(tiny_model_dir, 2, out, "--fsdp", "--graddrop_exchange", mode)
        assert f"GradDrop exchange: {'kept entries only' if mode == 'kept' else 'dense'} (masked in FSDP2" in stdout
        params, losses = trained(out)
        assert losses == losses1 and all(torch.equal(params[k], params1[k]) for k in params1), mode
        sent[mode] = json.loads((out / "metrics.json").read_text())["comm_bytes_per_step"]["by_op"]
    assert sent["dense"]["reduce_scatter_tensor"] == 4 * TARGET_ENTRIES
    assert 0 < sent["kept"]["reduce_scatter_tensor"] < 0.25 * sent["dense"]["reduce_scatter_tensor"], sent


def test_fsdp2_graddrop_on_one_rank_is_refused(train_qa, tiny_model_dir, tmp_path):
    with pytest.raises(SystemExit, match="--method graddrop --fsdp needs 2 or more ranks"):
        train_qa.main(["--model", str(tiny_model_dir), *GRADDROP, "--fsdp", "--output_dir", str(tmp_path / "x")])
