"""HF Trainer integration (a peft SparseGrad model + SparseGradCallback) on the tiny Llama with real QA pairs.

One in-process Trainer run, one 2-rank Trainer + DeepSpeed ZeRO-2 run (torch.distributed.run) and one
accelerate-launched 2-rank run of launch/train_qa.py (DeepSpeed plugin, ZeRO-2 from its JSON).
"""
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import free_port, run_ranks

ROOT = Path(__file__).resolve().parents[2]
ENV = {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def run(cmd, timeout=120):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))} | ENV
    proc = run_ranks(cmd, env=env, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


class GradRecorder:
    """Names of the parameters that hold a gradient right before each optimizer step."""

    def __init__(self):
        from transformers import TrainerCallback

        recorder = self

        class _CB(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
                recorder.seen.append({n for n, p in model.named_parameters() if p.grad is not None})

        self.seen: list[set] = []
        self.callback = _CB()


def _peft_model(tiny_model_dir, **config):
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from sg_distributed import SparseGradConfig

    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    return get_peft_model(base, SparseGradConfig(calibration_steps=2, **config))


def test_single_process_trainer_trains_k_vectors_and_checkpoints_adapter(tiny_model_dir, tmp_path):
    """A plain Trainer over get_peft_model(..., SparseGradConfig) with SparseGradCallback: calibration on the
    Trainer's dataloader, gradients only on the k-vectors, the peft adapter in every checkpoint."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from sg_distributed import SparseGradCallback
    from sg_distributed.data.qa import QACollator, load_qa_pairs, split_by_group

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _peft_model(tiny_model_dir, max_rows=None, max_cols=None, density=0.5)
    train, heldout = split_by_group(load_qa_pairs(), heldout_fraction=0.2, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=2,
                             per_device_eval_batch_size=8, learning_rate=3e-2, lr_scheduler_type="constant",
                             save_strategy="steps", save_steps=6, logging_steps=4, report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=0)
    recorder = GradRecorder()
    trainer = Trainer(model=model, args=args, train_dataset=train, eval_dataset=heldout[:8],
                      data_collator=QACollator(tokenizer, max_length=64), processing_class=tokenizer,
                      callbacks=[SparseGradCallback(), recorder.callback])
    assert trainer.label_names == ["labels"] and args.ddp_broadcast_buffers is False
    with pytest.raises(RuntimeError, match="calibrate"):  # the layers refuse to run uncalibrated
        trainer.evaluate()
    trainer.train()  # the callback calibrates at on_train_begin
    assert model.base_model.calibrated
    after = trainer.evaluate()["eval_loss"]
    base_loss = None
    with model.disable_adapter():
        base_loss = trainer.evaluate()["eval_loss"]
    assert after < base_loss - 0.02, (base_loss, after)

    k_vectors = {n for n, p in model.named_parameters() if p.requires_grad}
    assert k_vectors and all(n.endswith("sparsegrad_values") for n in k_vectors)
    assert recorder.seen and all(seen == k_vectors for seen in recorder.seen)
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.parameters() if p.requires_grad}

    for step in (6, 12):
        checkpoint = tmp_path / f"checkpoint-{step}"
        assert (checkpoint / "adapter_config.json").exists() and (checkpoint / "optimizer.pt").exists()
        assert not (checkpoint / "model.safetensors").exists()  # the adapter, not the whole model
    # The last checkpoint's adapter reproduces the trained model on a fresh base.
    fresh = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                      tmp_path / "checkpoint-12")
    batch = QACollator(tokenizer, max_length=64)(heldout[:2])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_trainer_runs_support_reselection_on_its_step_count(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from sg_distributed import SparseGradCallback
    from sg_distributed.data.qa import QACollator, load_qa_pairs

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = _peft_model(tiny_model_dir, density=0.05, max_rows=0.5, max_cols=0.5, reselect_every=3)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, learning_rate=3e-2,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    callback = SparseGradCallback()
    trainer = Trainer(model=model, args=args, train_dataset=load_qa_pairs()[:40], callbacks=[callback],
                      data_collator=QACollator(tokenizer, max_length=64), processing_class=tokenizer)
    trainer.train()
    assert [r["step"] for r in callback.reselector.history] == [3, 6]
    assert all(r["swapped"] > 0 for r in callback.reselector.history)
    state = trainer.optimizer.optimizer.state  # the moments of the swapped slots were reset in the real optimizer
    assert callback.reselector.optimizer is trainer.optimizer.optimizer and state
    assert any(not layer.structure.in_order for layer in model.converted_layers().values())


def test_trainer_resume_from_a_peft_checkpoint_is_bit_identical(tiny_model_dir, tmp_path):
    """Trainer(resume_from_checkpoint=...) loads the peft adapter (supports and bases installed by
    load_adapter, so the callback does not calibrate again) and ends where an uninterrupted run ends."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from sg_distributed import SparseGradCallback
    from sg_distributed.data.qa import QACollator, load_qa_pairs

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def run(out, max_steps, resume=None):
        torch.manual_seed(0)
        model = _peft_model(tiny_model_dir, density=0.05, task_type="CAUSAL_LM")
        args = TrainingArguments(output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=2,
                                 learning_rate=3e-2, lr_scheduler_type="constant", save_strategy="steps", save_steps=4,
                                 report_to="none", use_cpu=True, disable_tqdm=True, seed=0, remove_unused_columns=False)
        Trainer(model=model, args=args, train_dataset=load_qa_pairs()[:40], processing_class=tokenizer,
                data_collator=QACollator(tokenizer, max_length=64),
                callbacks=[SparseGradCallback()]).train(resume_from_checkpoint=resume)

    run(tmp_path / "full", 8)
    run(tmp_path / "part", 4)
    run(tmp_path / "part", 8, resume=str(tmp_path / "part" / "checkpoint-4"))
    full = load_file(str(tmp_path / "full" / "checkpoint-8" / "adapter_model.safetensors"))
    resumed = load_file(str(tmp_path / "part" / "checkpoint-8" / "adapter_model.safetensors"))
    assert sorted(full) == sorted(resumed)
    for key in full:
        assert torch.equal(full[key], resumed[key]), key


def test_callback_names_a_model_without_adapter_and_a_foreign_optimizer(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from sg_distributed import SparseGradCallback

    with pytest.raises(TypeError, match="no SparseGrad adapter.*get_peft_model"):
        SparseGradCallback().on_train_begin(None, None, None, model=AutoModelForCausalLM.from_pretrained(tiny_model_dir))
    model = _peft_model(tiny_model_dir, max_rows=None, max_cols=None, density=0.5)
    foreign = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(3))])
    with pytest.raises(RuntimeError, match="does not hold the SparseGrad k-vectors"):
        SparseGradCallback().on_train_begin(None, None, None, model=model, optimizer=foreign)


@pytest.mark.multiprocess
def test_two_rank_trainer_deepspeed_zero2(tiny_model_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "launch/train_qa_trainer.py", "--model", str(tiny_model_dir),
           "--deepspeed", "ds_configs/zero2.json", "--max_steps", "8", "--save_steps", "4", "--eval_size", "8",
           "--density", "0.5", "--max_rows", "0", "--max_cols", "0", "--lr", "3e-2", "--micro_batch_size", "2",
           "--calibration_steps", "2", "--logging_steps", "1", "--output_dir", str(out)]
    proc = run(cmd)
    assert proc.stderr.count("collective-device check on") == 2  # both ranks ran under the check
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["trainable_params"] > 0
    losses = [e["loss"] for e in metrics["log_history"]]
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < sum(losses[:3]) / 3, losses
    for step in (4, 8):
        checkpoint = out / f"checkpoint-{step}"
        assert (checkpoint / "adapter_config.json").exists() and (checkpoint / f"global_step{step}").is_dir()
    values = load_file(str(out / "checkpoint-8" / "adapter_model.safetensors"))
    assert any(v.abs().sum() > 0 for k, v in values.items() if k.endswith("sparsegrad_values"))


@pytest.mark.multiprocess
def test_accelerate_launch_deepspeed_plugin_runs_train_qa(tiny_model_dir, tmp_path):
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", "launch/accelerate/cpu_deepspeed_zero2.yaml",
           "launch/train_qa.py", "--model", str(tiny_model_dir), "--steps", "4", "--calibration_steps", "2",
           "--eval_size", "4", "--no_eval_before", "--density", "0.5", "--max_rows", "0", "--max_cols", "0",
           "--lr", "1e-2", "--micro_batch_size", "2", "--output_dir", str(tmp_path)]
    proc = run(cmd)
    assert "world size 2" in proc.stdout and '"stage": 2' in proc.stdout  # the plugin's JSON, resolved by train_qa
    assert proc.stderr.count("collective-device check on") == 2  # both ranks ran under the check
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["deepspeed"] == "ds_configs/zero2.json"
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
