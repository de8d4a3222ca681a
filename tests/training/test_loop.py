"""The training loop object driven from Python, in this process (no launcher, no subprocess)."""
import json

import pytest

from sg_distributed.training import TrainingLoop, options
from sg_distributed.training.faults import Faults

FAST = dict(calibration_steps=2, eval_size=2, no_eval_before=True, density=0.5, max_rows=0, max_cols=0, lr=1e-2,
            micro_batch_size=2)


def test_step_by_step_is_the_same_run_as_run_and_resumes(tiny_model_dir, tmp_path):
    """setup -> train_step x3 -> save -> (new loop) resume -> train_step x2 gives the losses of one run() of
    5 steps, bit for bit: the loop's parts are the run, not a second implementation of it."""
    whole = TrainingLoop(options(model=str(tiny_model_dir), steps=5, output_dir=str(tmp_path / "whole"), **FAST))
    results = whole.run()
    assert len(whole.losses) == 5 and results["train_loss_first_last"][0] == whole.losses[0]
    assert (tmp_path / "whole" / "adapter" / "adapter_config.json").exists()
    assert json.loads((tmp_path / "whole" / "metrics.json").read_text())["after"] == results["after"]

    part = tmp_path / "part"
    first = TrainingLoop(options(model=str(tiny_model_dir), steps=5, output_dir=str(part), **FAST)).setup()
    assert first.resume() == 0  # nothing to resume from
    losses = [first.train_step(step) for step in range(3)]
    first.save(3)
    assert losses == whole.losses[:3]
    held_out = first.evaluate("after")
    assert set(held_out) >= {"answer_loss", "answer_token_accuracy", "exact_match", "f1"}

    second = TrainingLoop(options(model=str(tiny_model_dir), steps=5, output_dir=str(part), resume="auto", **FAST))
    assert second.resume() == 3 and second.losses == whole.losses[:3]
    assert [second.train_step(step) for step in (3, 4)] == whole.losses[3:]


def test_fault_hook_skips_a_step(tiny_model_dir, tmp_path):
    """The fault-injection hook is a constructor argument: a NaN loss at step 1 skips that step only."""
    loop = TrainingLoop(options(model=str(tiny_model_dir), steps=3, max_skipped_steps=1, output_dir=str(tmp_path),
                                **FAST), faults=Faults("nan_loss_at_step_1"))
    results = loop.run()
    assert results["skipped_steps"] == [1] and len(loop.losses) == 2


def test_options_are_the_command_lines():
    args = options(steps=7, method="lora", fsdp=True, no_eval_before=False)
    assert (args.steps, args.method, args.fsdp, args.no_eval_before) == (7, "lora", True, False)
    with pytest.raises(ValueError, match=r"--micro_batch_size: 0 is out of range \(expected an integer >= 1\)"):
        options(micro_batch_size=0)
    with pytest.raises(TypeError, match="unknown option.*stepz.*known: .*steps"):
        options(stepz=3)


def test_report_to_tensorboard_mirrors_metrics_jsonl(tiny_model_dir, tmp_path):
    """--report_to tensorboard: each metrics.jsonl line is a train/ scalar in <output_dir>/runs, the held-out
    evaluations before and after are eval/ scalars at steps 0 and --steps."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    fast = {**FAST, "no_eval_before": False}
    results = TrainingLoop(options(model=str(tiny_model_dir), steps=3, output_dir=str(tmp_path),
                                   report_to=["tensorboard"], **fast)).run()
    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train = [(r["step"], r["loss"]) for r in lines if r.get("split") != "eval"]
    events = EventAccumulator(str(tmp_path / "runs"))
    events.Reload()
    logged = events.Scalars("train/loss")  # float32 in the event file
    assert [e.step for e in logged] == [s for s, _ in train] == [1, 2, 3]
    assert [e.value for e in logged] == pytest.approx([loss for _, loss in train], rel=1e-6)
    answer_loss = events.Scalars("eval/answer_loss")
    assert [e.step for e in answer_loss] == [0, 3]
    assert [e.value for e in answer_loss] == pytest.approx(
        [results["before"]["answer_loss"], results["after"]["answer_loss"]], rel=1e-6)
