"""--report_to (training/reporting.py) and MetricsLog's sinks: TensorBoard events read back with TensorBoard's own
reader, wandb offline when installed, the errors a user sees, and launch/train_qa_trainer.py run as typed."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sg_distributed.training.arguments import ArgumentParser, add_reporting_arguments
from sg_distributed.training.metrics_log import MetricsLog
from sg_distributed.training.reporting import open_sinks, resolve_report_to

ROOT = Path(__file__).resolve().parents[2]


def events(log_dir):
    """TensorBoard's reader over a run directory (every events file in it, purges applied)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(log_dir))
    accumulator.Reload()
    return accumulator


def scalars(accumulator, tag) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in accumulator.Scalars(tag)]


def jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def test_tensorboard_sink_writes_scalars_and_the_run_config_once(tmp_path):
    config = {"method": "sparsegrad", "lr": 1e-3, "steps": 60, "k": None}
    (sink,) = open_sinks(["tensorboard"], tmp_path, config)
    sink.log(1, {"train/loss": 2.5, "train/lr": 0.5})
    sink.log(3, {"train/loss": 1.25, "train/lr": 0.5})
    sink.close()
    run = events(tmp_path / "runs")  # the default directory, as in the HF Trainer
    assert scalars(run, "train/loss") == [(1, 2.5), (3, 1.25)]  # values exact in float32
    assert scalars(run, "train/lr") == [(1, 0.5), (3, 0.5)]
    (text,) = run.Tensors("run_config/text_summary")
    assert json.loads(text.tensor_proto.string_val[0].decode().strip("`\n")) == config
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    start = HParamsPluginData.FromString(run.PluginTagToContent("hparams")["_hparams_/session_start_info"])
    hparams = {name: value.WhichOneof("kind") and getattr(value, value.WhichOneof("kind"))
               for name, value in start.session_start_info.hparams.items()}
    assert hparams == {"method": "sparsegrad", "lr": 1e-3, "steps": 60, "k": "None"}
    assert len(list((tmp_path / "runs").iterdir())) == 1  # one events file: the hparams are in the same run


def test_metrics_log_mirrors_each_jsonl_record_to_tensorboard(tmp_path):
    with MetricsLog(tmp_path / "metrics.jsonl", 2, report_to=["tensorboard"], run_config={"lr": 0.5}) as log:
        for step, loss in enumerate([4.0, 3.0, 2.5, 2.0, 1.5, 1.0], start=1):
            log.log(step, loss, 0.5, skipped_steps=0)
        log.log_eval(6, {"answer_loss": 1.75, "answer_token_accuracy": 0.25, "num_examples": 8,
                         "predictions": ["not a number"]})
    records = jsonl(tmp_path / "metrics.jsonl")
    train = [r for r in records if "split" not in r]
    assert [r["step"] for r in train] == [2, 4, 6] and [r["loss_interval"] for r in train] == [3.5, 2.25, 1.25]
    assert records[-1] == {"step": 6, "split": "eval", "answer_loss": 1.75, "answer_token_accuracy": 0.25,
                           "num_examples": 8}
    run = events(tmp_path / "runs")
    for key in ("loss", "loss_interval", "lr", "elapsed_s", "skipped_steps"):
        steps, values = zip(*scalars(run, f"train/{key}"))
        assert steps == (2, 4, 6) and values == pytest.approx([r[key] for r in train], rel=1e-6), key
    assert scalars(run, "eval/answer_loss") == [(6, 1.75)]
    assert scalars(run, "eval/answer_token_accuracy") == [(6, 0.25)]
    assert "eval/predictions" not in run.Tags()["scalars"]
    assert log.sinks == []  # closed by the with block


def test_resume_keeps_train_and_eval_lines_up_to_the_checkpoint_and_hides_later_events(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path, 1, report_to=["tensorboard"]) as first:  # killed after step 4; checkpoint at step 2
        first.log_eval(0, {"answer_loss": 5.0})
        for step in range(1, 5):
            first.log(step, 10.0 + step, 0.5, 0)
            if step % 2 == 0:
                first.log_eval(step, {"answer_loss": 5.0 - step})
    with MetricsLog(path, 1, start_step=2, report_to=["tensorboard"]) as resumed:
        for step in (3, 4):
            resumed.log(step, 20.0 + step, 0.5, 0)
        resumed.log_eval(4, {"answer_loss": 0.5})
    records = jsonl(path)
    assert [(r["step"], r.get("split", "train")) for r in records] == [
        (0, "eval"), (1, "train"), (2, "train"), (2, "eval"), (3, "train"), (4, "train"), (4, "eval")]
    assert [r["loss"] for r in records if "loss" in r] == [11.0, 12.0, 23.0, 24.0]
    run = events(tmp_path / "runs")  # both runs' events files; the first one's steps 3 and 4 are purged
    assert scalars(run, "train/loss") == [(1, 11.0), (2, 12.0), (3, 23.0), (4, 24.0)]
    assert scalars(run, "eval/answer_loss") == [(0, 5.0), (2, 3.0), (4, 0.5)]


def test_none_and_other_ranks_create_nothing_but_metrics_jsonl(tmp_path):
    with MetricsLog(tmp_path / "a" / "metrics.jsonl", 1, report_to=["none"]) as log:
        log.log(1, 1.0, 0.5, 0)
        log.log_eval(1, {"answer_loss": 1.0})
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["metrics.jsonl"]
    assert len(jsonl(tmp_path / "a" / "metrics.jsonl")) == 2
    with MetricsLog(tmp_path / "b" / "metrics.jsonl", 1, enabled=False, report_to=["tensorboard"]) as rank1:
        rank1.log(1, 1.0, 0.5, 0)
        rank1.log_eval(1, {"answer_loss": 1.0})
    assert not (tmp_path / "b").exists()
    MetricsLog(tmp_path / "c" / "metrics.jsonl", 2).log(2, 1.0, 0.5, 0)  # the positional form of before
    assert jsonl(tmp_path / "c" / "metrics.jsonl")[0]["step"] == 2 and not (tmp_path / "c" / "runs").exists()


def test_names_resolve_like_the_trainer(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed, whether or not it is here
    assert resolve_report_to(["none"]) == [] and resolve_report_to(None) == [] and resolve_report_to("none") == []
    assert resolve_report_to(["tensorboard", "tensorboard"]) == ["tensorboard"]
    assert resolve_report_to(["all"]) == ["tensorboard"]  # the installed ones only


@pytest.mark.parametrize("names,error,message", [
    (["tensorbord"], ValueError,
     "unknown reporting integration 'tensorbord' (expected one or more of: none, tensorboard, wandb, all)"),
    (["none", "tensorboard"], ValueError,
     "'none' cannot be combined with other names, got: none tensorboard (expected 'none', 'all', or one or more of: "
     "tensorboard, wandb)"),
    (["wandb"], ModuleNotFoundError, "reporting to wandb needs the wandb package, which is not installed: "
     "pip install wandb"),
    (["tensorboard"], ModuleNotFoundError, "reporting to tensorboard needs the tensorboard package, which is not "
     "installed: pip install tensorboard (requirements.lock pins it; `make venv` installs it)"),
])
def test_bad_names_and_missing_packages_say_what_to_do(monkeypatch, tmp_path, names, error, message):
    monkeypatch.setitem(sys.modules, "wandb", None)
    if names == ["tensorboard"]:
        monkeypatch.setitem(sys.modules, "tensorboard", None)
    with pytest.raises(error) as raised:
        resolve_report_to(names)
    assert str(raised.value) == message
    with pytest.raises(error):  # every rank refuses, not only the one that would open the sinks
        MetricsLog(tmp_path / "metrics.jsonl", 1, enabled=False, report_to=names)
    parser = ArgumentParser(prog="train")
    add_reporting_arguments(parser)
    with pytest.raises(SystemExit) as stop:
        parser.parse_args(["--report_to", *names])
    assert stop.value.code == f"train: error: argument --report_to: {message}"  # a str: printed, exit code 1
    assert parser.parse_args([]).report_to == ["none"]


def test_wandb_offline_gets_the_config_and_each_record(tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb", reason="wandb is not installed (not pinned; pip install wandb to run this)")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_PROJECT", "sg_distributed_test")
    monkeypatch.setenv("WANDB_SILENT", "true")
    log = MetricsLog(tmp_path / "metrics.jsonl", 1, report_to=["wandb"], run_config={"lr": 0.5, "method": "lora"})
    run = log.sinks[0].run
    assert run.project == "sg_distributed_test" and dict(run.config) == {"lr": 0.5, "method": "lora"}
    log.log(1, 2.0, 0.5, 0)
    log.log_eval(1, {"answer_loss": 1.5})  # the same step: the same wandb row
    log.log(2, 1.0, 0.5, 0)  # wandb commits a row when the step moves on
    summary = dict(run.summary)
    assert (summary["_step"], summary["train/loss"], summary["eval/answer_loss"]) == (1, 2.0, 1.5)
    log.close()
    assert wandb.run is None  # finished
    assert list((tmp_path / "wandb").glob("offline-run-*/run-*.wandb"))  # written to <output_dir>, no network


def test_sft_trl_report_to_tensorboard_writes_the_sft_trainers_losses(tiny_model_dir, tmp_path, monkeypatch):
    from conftest import load_launch_script

    monkeypatch.chdir(tmp_path)  # where the evaluation before training would otherwise open ./runs
    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    sft_trl = load_launch_script("sft_trl")
    assert sft_trl.parse_args([]).report_to == ["none"]
    out = tmp_path / "run"
    results = sft_trl.main(["--model", str(tiny_model_dir), "--output_dir", str(out), "--report_to", "tensorboard",
                            "--max_steps", "2", "--logging_steps", "1", "--eval_size", "2", "--calibration_steps", "1",
                            "--micro_batch_size", "2", "--max_length", "64"])
    assert not (tmp_path / "runs").exists()
    (run_dir,) = (out / "runs").iterdir()
    steps, losses = zip(*scalars(events(run_dir), "train/loss"))
    assert steps == (1, 2) and losses == pytest.approx([e["loss"] for e in results["log_history"]], rel=1e-6)


def test_train_qa_trainer_report_to_tensorboard_end_to_end(tiny_model_dir, tmp_path):
    """The command a user types, with its default held-out eval before training: every event, the train losses
    included, in <output_dir>/runs/<time>_<host>, none in ./runs of the working directory."""
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_", "WORLD_SIZE",
                                                                      "TENSORBOARD_LOGGING_DIR"))}
    env |= {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, str(ROOT / "launch" / "train_qa_trainer.py"), "--model", str(tiny_model_dir),
           "--report_to", "tensorboard", "--max_steps", "3", "--logging_steps", "1", "--eval_size", "2",
           "--calibration_steps", "1", "--micro_batch_size", "2", "--max_length", "32", "--output_dir", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert not (tmp_path / "runs").exists()  # the working directory
    (run_dir,) = (out / "runs").iterdir()
    metrics = json.loads((out / "metrics.json").read_text())
    logged = [(e["step"], e["loss"]) for e in metrics["log_history"]]
    assert len(logged) == 3
    run = events(run_dir)
    steps, losses = zip(*scalars(run, "train/loss"))
    assert list(steps) == [step for step, _ in logged] and losses == pytest.approx([loss for _, loss in logged], rel=1e-6)
    (before, after) = scalars(run, "eval/loss")  # the evaluations before and after training
    assert before == (0, pytest.approx(metrics["before"]["eval_loss"], rel=1e-6))
    assert after == (3, pytest.approx(metrics["after"]["eval_loss"], rel=1e-6))


def test_a_torn_last_line_does_not_stop_a_resume(tmp_path):
    """A kill mid-write leaves half a JSON line: the resume drops it (and every line after its checkpoint) and the
    log reads as one run again."""
    path = tmp_path / "metrics.jsonl"
    with MetricsLog(path, 1) as first:
        for step in range(1, 5):
            first.log(step, loss=float(step), lr=0.1, skipped_steps=0)
    with path.open("a") as handle:
        handle.write('{"step": 5, "loss": 5.')  # killed here
    with MetricsLog(path, 1, start_step=3) as resumed:
        resumed.log(4, loss=40.0, lr=0.1, skipped_steps=0)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in records] == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]
