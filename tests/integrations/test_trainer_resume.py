"""--resume_from_checkpoint of the Trainer / TRL examples (launch/train_qa_trainer.py, launch/sft_trl.py) on the
tiny Llama: a run stopped at step 4 (max_steps 4, checkpoint-4) and resumed by a new run to step 8 ends with the
very adapter (k-vectors, supports, bases: torch.equal, fp32) of an uninterrupted 8-step run. In one process for
the HF Trainer and TRL's SFTTrainer, and on 2 ranks under DeepSpeed ZeRO-2, where the Trainer restores only the
engine checkpoint and the script installs the checkpoint's bases and supports (restore_checkpoint_adapter).
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, load_launch_script, run_ranks

ROOT = Path(__file__).resolve().parents[2]
TRAINER_ARGS = ["--save_steps", "4", "--eval_size", "8", "--density", "0.05", "--lr", "3e-2", "--micro_batch_size",
                "2", "--calibration_steps", "2", "--logging_steps", "1"]
TRL_ARGS = ["--save_steps", "4", "--eval_size", "8", "--density", "0.05", "--lr", "3e-2", "--micro_batch_size", "2",
            "--calibration_steps", "2", "--logging_steps", "1", "--max_length", "64"]


def assert_same_adapter(full: Path, resumed: Path) -> None:
    a, b = (load_file(str(d / "adapter_model.safetensors")) for d in (full, resumed))
    assert sorted(a) == sorted(b)
    assert any(k.endswith("support_flat") for k in a) and any(".sparsegrad_bases." in k for k in a)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key
    values = [v for k, v in a.items() if k.endswith("sparsegrad_values")]
    assert values and all(v.dtype == torch.float32 and v.abs().sum() > 0 for v in values)  # trained, in fp32


def losses(directory: Path) -> list[float]:
    return [e["loss"] for e in json.loads((directory / "metrics.json").read_text())["log_history"]]


@pytest.mark.parametrize("script,extra", [("train_qa_trainer", TRAINER_ARGS), ("sft_trl", TRL_ARGS)])
def test_resumed_run_ends_bit_identical_in_one_process(script, extra, tiny_model_dir, tmp_path):
    main = load_launch_script(script).main
    common = ["--model", str(tiny_model_dir), *extra]
    main([*common, "--max_steps", "8", "--output_dir", str(tmp_path / "full")])
    main([*common, "--max_steps", "4", "--output_dir", str(tmp_path / "part")])
    assert not (tmp_path / "part" / "checkpoint-8").exists()
    main([*common, "--max_steps", "8", "--output_dir", str(tmp_path / "part"), "--resume_from_checkpoint", "auto"])
    assert_same_adapter(tmp_path / "full" / "checkpoint-4", tmp_path / "part" / "checkpoint-4")
    assert_same_adapter(tmp_path / "full", tmp_path / "part")  # the final adapter, saved after step 8
    assert losses(tmp_path / "part") == losses(tmp_path / "full") and len(losses(tmp_path / "full")) == 8


@pytest.mark.multiprocess
def test_resumed_deepspeed_zero2_run_ends_bit_identical(tiny_model_dir, tmp_path):
    """2 ranks, ZeRO-2: the Trainer restores the k-vectors from the engine checkpoint (through ZeRO's fp32
    partitions, exact in fp32) and the script the bases and supports from the checkpoint's adapter. The resumed
    run is given another --calibration_steps: a calibration on resume would choose other supports and bases."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env |= {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def launch(out, steps, *more):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
               "--master_port", str(free_port()), "launch/train_qa_trainer.py", "--model", str(tiny_model_dir),
               "--deepspeed", "ds_configs/zero2.json", *TRAINER_ARGS, "--max_steps", str(steps),
               "--output_dir", str(out), *more]
        proc = run_ranks(cmd, env=env, cwd=ROOT, timeout=240)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
        return proc

    launch(tmp_path / "full", 8)
    launch(tmp_path / "part", 4)
    launch(tmp_path / "part", 8, "--resume_from_checkpoint", str(tmp_path / "part" / "checkpoint-4"),
           "--calibration_steps", "3")
    assert (tmp_path / "part" / "checkpoint-4" / "global_step4").is_dir()  # an engine checkpoint was resumed
    assert_same_adapter(tmp_path / "full", tmp_path / "part")
    assert_same_adapter(tmp_path / "full" / "checkpoint-8", tmp_path / "part" / "checkpoint-8")
    assert losses(tmp_path / "part") == losses(tmp_path / "full")


def test_callback_refuses_to_calibrate_a_resumed_run(tiny_model_dir):
    """Under DeepSpeed the Trainer resumes with the adapter uncalibrated unless restore_checkpoint_adapter ran:
    the callback must not pair the restored k-vectors with a new calibration."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, TrainerState

    from sg_distributed import SparseGradCallback, SparseGradConfig

    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), SparseGradConfig(density=0.05))
    with pytest.raises(RuntimeError, match="resuming at step 4 .* restore_checkpoint_adapter"):
        SparseGradCallback().on_train_begin(None, TrainerState(global_step=4), None, model=model)


def test_resume_auto_without_a_checkpoint_starts_fresh_and_a_bad_directory_is_named(tiny_model_dir, tmp_path, capsys):
    parse_args = load_launch_script("train_qa_trainer").parse_args
    args = parse_args(["--output_dir", str(tmp_path / "new"), "--resume_from_checkpoint", "auto"])
    assert args.resume_from_checkpoint is None and "starting fresh" in capsys.readouterr().out
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(SystemExit, match="--resume_from_checkpoint: .*checkpoint-2 has no trainer_state.json"):
        parse_args(["--output_dir", str(tmp_path), "--resume_from_checkpoint", "auto"])
    with pytest.raises(SystemExit, match="--resume_from_checkpoint: .*nope does not exist"):
        parse_args(["--resume_from_checkpoint", str(tmp_path / "nope")])
