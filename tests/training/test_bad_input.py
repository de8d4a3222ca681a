"""Bad input and faults end to end through launch/train_qa.py: clear message, the documented exit code,
earlier checkpoints intact. (Exit codes: 1 bad input / configuration, 3 non-finite losses, 4 dead peer.)"""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sg_distributed.training import checkpoint as ckpt

from conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
FAST = ["--steps", "6", "--calibration_steps", "2", "--eval_size", "2", "--no_eval_before", "--density", "0.5",
        "--max_rows", "0", "--max_cols", "0", "--lr", "1e-2", "--micro_batch_size", "2"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1"}


def _qa_record(i):
    return {"id": f"q{i}", "question": f"top {i}?", "answer": "x",
            "decomposition": [{"question": f"What is item {i}?", "answer": f"answer {i}"}]}


@pytest.mark.parametrize("content,message", [
    ("", "not valid JSON"),
    ("{not json", "not valid JSON"),
    ("[]", "the list of questions is empty"),
    ('{"a": 1}', "expected a JSON list"),
    (json.dumps([{"id": "q", "question": "q?"}]), "missing field 'answer'"),
    (json.dumps([{"id": "q", "question": "q?", "answer": 1, "decomposition": [{"question": "s?"}]}]),
     r"decomposition\[0\] is missing field 'answer'"),
    (json.dumps([_qa_record(0)]), "fewer than one global batch"),
])
def test_bad_data_file_is_a_clear_error(train_qa, tiny_model_dir, tmp_path, content, message):
    data = tmp_path / "data.json"
    data.write_text(content)
    with pytest.raises(SystemExit, match=message) as err:
        train_qa.main(["--model", str(tiny_model_dir), "--data", str(data), *FAST, "--output_dir", str(tmp_path)])
    assert str(err.value).startswith("error:")


def test_missing_paths_and_bad_ds_config(train_qa, tiny_model_dir, tmp_path):
    (tmp_path / "empty_model").mkdir()
    with pytest.raises(SystemExit, match="cannot load the model from"):
        train_qa.main(["--model", str(tmp_path / "empty_model"), *FAST])
    bad = tmp_path / "ds.json"
    bad.write_text('{"train_batch_size": "auto",}')
    with pytest.raises(SystemExit, match="invalid JSON in DeepSpeed config file .* line 1"):
        train_qa.main(["--model", str(tiny_model_dir), "--ds_config", str(bad), *FAST])


BAD_ARGUMENTS = [  # (flag, value, what the message says is valid); paths: relative to tmp_path
    ("--steps", "0", "an integer >= 1"), ("--micro_batch_size", "0", "an integer >= 1"),
    ("--grad_accum", "two", "not an integer"), ("--lr", "-1", "a number > 0"), ("--lr", "nan", "a number > 0"),
    ("--max_grad_norm", "-0.5", "a number >= 0"), ("--density", "2", r"a number in \(0, 1\]"),
    ("--density", "0", r"a number in \(0, 1\]"), ("--k", "0", "an integer >= 1"),
    ("--max_rows", "-1", "a number >= 0"), ("--max_cols", "inf", "a number >= 0"),
    ("--reselect_every", "-3", "an integer >= 0"), ("--reselect_fraction", "1.5", r"a number in \(0, 1\]"),
    ("--block_stride", "0", "an integer >= 1"), ("--calibration_steps", "0", "an integer >= 1"),
    ("--drop_prob", "1", r"a number in \[0, 1\)"), ("--lora_rank", "0", "an integer >= 1"),
    ("--eval_size", "-1", "an integer >= 0"), ("--max_length", "1", "an integer >= 2"),
    ("--seed", "-1", "an integer >= 0"), ("--save_every", "-2", "an integer >= 0"),
    ("--keep_checkpoints", "-1", "an integer >= 0"), ("--max_skipped_steps", "x", "not an integer"),
    ("--collective_timeout", "0", "a number > 0"),
    ("--model", "nope", "does not exist"), ("--model", "file.txt", "is not a directory"),
    ("--data", "nope.json", "does not exist"), ("--data", ".", "is not a file"),
    ("--ds_config", "nope.json", "does not exist"), ("--init_adapter", "nope", "does not exist"),
    ("--resume", "step_9", "does not exist"),
]


@pytest.mark.parametrize("flag,value,valid", BAD_ARGUMENTS, ids=[f"{f}={v}" for f, v, _ in BAD_ARGUMENTS])
def test_every_bad_flag_value_is_named_before_any_work(train_qa, tmp_path, monkeypatch, flag, value, valid):
    """Checked by argparse as the flag is read: exit code 1, the flag and what is valid, no traceback, and
    nothing loaded or written yet."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(SystemExit, match=rf"error: argument {flag}: .*{valid}") as err:
        train_qa.parse_args([flag, value])
    assert not isinstance(err.value.code, int)  # a message, which Python prints and exits 1 with
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


@pytest.mark.parametrize("script", ["sft_trl", "train_qa_trainer"])
@pytest.mark.parametrize("flag,value,valid", [("--max_steps", "0", "an integer >= 1"), ("--lr", "-1", "a number > 0"),
                                              ("--density", "2", r"a number in \(0, 1\]"),
                                              ("--deepspeed", "nope.json", "does not exist")])
def test_the_trainer_examples_check_their_flags_too(script, flag, value, valid, tmp_path, monkeypatch):
    from conftest import load_launch_script

    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=rf"error: argument {flag}: .*{valid}"):
        load_launch_script(script).parse_args([flag, value])


def test_a_bad_flag_from_the_command_line_exits_1_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "launch/train_qa.py", "--micro_batch_size", "0"], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1, proc.stderr
    assert "argument --micro_batch_size: 0 is out of range (expected an integer >= 1)" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_long_sequences_are_truncated_and_counted(train_qa, tiny_model_dir, tmp_path):
    results = train_qa.main(["--model", str(tiny_model_dir), *FAST, "--steps", "2", "--max_length", "12",
                             "--output_dir", str(tmp_path)])
    assert results["truncated"]["prompts"] > 0


def test_adapter_for_another_base_is_refused(train_qa, tiny_model_dir, tmp_path):
    from conftest import lm_batches, make_tiny_llama

    from sg_distributed import SparseGradConfig
    from sg_distributed import get_sparsegrad_model

    other = get_sparsegrad_model(make_tiny_llama(intermediate=48), SparseGradConfig(density=0.5, max_rows=None, max_cols=None))
    other.calibrate(lm_batches(n=2))
    other.save_pretrained(tmp_path / "other_adapter")
    with pytest.raises(SystemExit, match=r"does not fit this run .* trained on a 48x32 weight"):
        train_qa.main(["--model", str(tiny_model_dir), *FAST, "--init_adapter", str(tmp_path / "other_adapter")])


def test_nonfinite_losses_are_skipped_then_stop_with_checkpoint(train_qa, tiny_model_dir, tmp_path, monkeypatch):
    args = ["--model", str(tiny_model_dir), *FAST, "--save_every", "2", "--keep_checkpoints", "0"]
    monkeypatch.setenv("SG_FAULT_INJECT", "nan_loss_at_step_3")
    results = train_qa.main([*args, "--max_skipped_steps", "1", "--output_dir", str(tmp_path / "ok")])
    assert results["skipped_steps"] == [3]

    monkeypatch.setenv("SG_FAULT_INJECT", "nan_loss_at_step_3,nan_loss_at_step_4")
    out = tmp_path / "stop"
    with pytest.raises(SystemExit, match=r"2 steps with a non-finite loss \(steps \[3, 4\]\)") as err:
        train_qa.main([*args, "--max_skipped_steps", "1", "--output_dir", str(out)])
    assert err.value.code == ckpt.EXIT_NONFINITE
    root = out / "checkpoints"
    assert ckpt.find_latest(root) == root / "step_5"  # the last good state, past the dropped batches
    ckpt.verify(root / "step_2")  # the earlier checkpoint is intact
    state = json.loads((root / "step_5" / "trainer_state.json").read_text())
    assert state["skipped_steps"] == [3, 4] and len(state["losses"]) == 3


def test_nonfinite_stop_exit_code_and_message_from_the_command_line(tiny_model_dir, tmp_path):
    proc = subprocess.run([sys.executable, "launch/train_qa.py", "--model", str(tiny_model_dir), *FAST,
                           "--output_dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env={**ENV, "SG_FAULT_INJECT": "nan_loss_at_step_1"})
    assert proc.returncode == ckpt.EXIT_NONFINITE, proc.stderr[-2000:]
    assert "error: 1 steps with a non-finite loss (steps [1]), more than --max_skipped_steps 0" in proc.stderr
    assert (tmp_path / "checkpoints" / "step_2" / "manifest.json").exists()


@pytest.mark.multiprocess
def test_survivor_stops_with_a_clear_error_when_a_rank_dies(tiny_model_dir, tmp_path):
    """Two gloo ranks started by hand (no torchrun agent to clean up): rank 1 is SIGKILLed at step 2;
    rank 0 must stop on its own, non-zero, with a message, well within the collective timeout."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        env = {**ENV, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "SG_FAULT_INJECT": "kill_rank1_at_step_2"}
        procs.append(subprocess.Popen([sys.executable, "launch/train_qa.py", "--model", str(tiny_model_dir), *FAST,
                                       "--collective_timeout", "30", "--output_dir", str(tmp_path)], cwd=ROOT,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    t0 = time.time()
    out1, _ = procs[1].communicate(timeout=120)
    died = time.time()
    out0, err0 = procs[0].communicate(timeout=90)
    assert procs[1].returncode == -9 and "rank 1 dies at step 2" in out1
    assert procs[0].returncode == ckpt.EXIT_COLLECTIVE, err0[-3000:]
    assert "rank 0: a collective failed or timed out" in err0 and "--resume auto" in err0
    assert time.time() - died < 45, f"survivor took {time.time() - died:.0f}s after the death (start {died - t0:.0f}s)"


@pytest.mark.parametrize("extra,message", [
    (["--ds_config", "ds_configs/zero2.json"], "is a DDP hook; DeepSpeed and FSDP2 reduce gradients their own way"),
    (["--fsdp"], "is a DDP hook"),
    (["--method", "graddrop", "--graddrop_exchange", "kept"], "both DDP comm hooks; use --graddrop_exchange dense"),
    ([], "this run has one process"),
])
def test_ddp_comm_hook_is_refused_where_it_cannot_apply(train_qa, tiny_model_dir, tmp_path, monkeypatch, capsys,
                                                        extra, message):
    monkeypatch.chdir(ROOT)
    with pytest.raises(SystemExit) as err:
        train_qa.main(["--model", str(tiny_model_dir), *FAST, "--ddp_comm_hook", "powersgd", *extra, "--output_dir",
                       str(tmp_path / "out")])
    assert message in str(err.value) + capsys.readouterr().err
