"""HF Trainer integration (SparseGradTrainer / SparseGradCallback) on the tiny Llama with real QA pairs.

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

ROOT = Path(__file__).resolve().parents[1]
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


def test_single_process_trainer_trains_k_vectors_and_checkpoints_adapter(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from sg_distributed import SparseGradConfig, SparseGradModel, get_sparsegrad_model
    from sg_distributed.data.qa import QACollator, load_qa_pairs, split_by_group
    from sg_distributed.integrations.trainer import SparseGradTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model = get_sparsegrad_model(base, SparseGradConfig(max_rows=None, max_cols=None, density=0.5, calibration_steps=2))
    train, heldout = split_by_group(load_qa_pairs(), heldout_fraction=0.2, seed=0)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=2,
                             per_device_eval_batch_size=8, learning_rate=3e-2, lr_scheduler_type="constant",
                             save_strategy="steps", save_steps=6, logging_steps=4, report_to="none", use_cpu=True,
                             disable_tqdm=True, seed=0)
    recorder = GradRecorder()
    trainer = SparseGradTrainer(model=model, args=args, train_dataset=train, eval_dataset=heldout[:8],
                                data_collator=QACollator(tokenizer, max_length=64), processing_class=tokenizer,
                                callbacks=[recorder.callback])
    assert trainer.label_names == ["labels"]  # not visible through SparseGradModel.forward(*args, **kwargs)
    trainer.calibrate()
    before = trainer.evaluate()["eval_loss"]
    trainer.train()
    after = trainer.evaluate()["eval_loss"]
    assert after < before - 0.02, (before, after)

    k_vectors = {n for n, p in model.named_parameters() if p.requires_grad}
    assert k_vectors and all(n.endswith("sparsegrad_values") for n in k_vectors)
    assert recorder.seen and all(seen == k_vectors for seen in recorder.seen)
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert held == {id(p) for p in model.trainable_parameters()}

    for step in (6, 12):
        checkpoint = tmp_path / f"checkpoint-{step}"
        assert (checkpoint / "adapter_config.json").exists() and (checkpoint / "optimizer.pt").exists()
        assert not (checkpoint / "model.safetensors").exists()  # the adapter, not the whole model
    # The last checkpoint's adapter reproduces the trained model on a fresh base.
    fresh = SparseGradModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32),
                                            tmp_path / "checkpoint-12")
    batch = QACollator(tokenizer, max_length=64)(heldout[:2])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_trainer_runs_support_reselection_on_its_step_count(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from sg_distributed import SparseGradConfig, get_sparsegrad_model
    from sg_distributed.data.qa import QACollator, load_qa_pairs
    from sg_distributed.integrations.trainer import SparseGradCallback, SparseGradTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    config = SparseGradConfig(density=0.05, max_rows=0.5, max_cols=0.5, calibration_steps=2, reselect_every=3)
    model = get_sparsegrad_model(base, config)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=6, per_device_train_batch_size=2, learning_rate=3e-2,
                             save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0)
    trainer = SparseGradTrainer(model=model, args=args, train_dataset=load_qa_pairs()[:40],
                                data_collator=QACollator(tokenizer, max_length=64), processing_class=tokenizer)
    trainer.train()
    callback = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, SparseGradCallback))
    assert [r["step"] for r in callback.reselector.history] == [3, 6]
    assert all(r["swapped"] > 0 for r in callback.reselector.history)
    state = trainer.optimizer.optimizer.state  # the moments of the swapped slots were reset in the real optimizer
    assert callback.reselector.optimizer is trainer.optimizer.optimizer and state
    assert any(not layer.structure.in_order for layer in model.converted_layers().values())


def test_plain_trainer_callback_refuses_uncalibrated_model(tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from sg_distributed import SparseGradConfig, get_sparsegrad_model
    from sg_distributed.integrations.trainer import SparseGradCallback, SparseGradTrainer

    model = get_sparsegrad_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), SparseGradConfig(max_rows=None, max_cols=None, density=0.5))
    with pytest.raises(RuntimeError, match="not calibrated"):
        SparseGradCallback().on_train_begin(None, None, None, model=model)
    with pytest.raises(TypeError, match="SparseGradModel"):
        SparseGradTrainer(model=model.base_model)


def _fake_trainer(base, **flags):
    """The attributes calibration_device reads, as Trainer sets them, with args.device = cuda:1."""
    from types import SimpleNamespace

    fields = dict(place_model_on_device=False, is_deepspeed_enabled=False, is_fsdp_enabled=False,
                  is_distributed_loading_by_transformers=False,
                  accelerator=SimpleNamespace(state=SimpleNamespace(fsdp_plugin=flags.pop("fsdp_plugin", None))))
    args = SimpleNamespace(device=torch.device("cuda", 1), fp16_full_eval=False, bf16_full_eval=False)
    return SimpleNamespace(model=SimpleNamespace(base_model=base), args=args, **{**fields, **flags})


def test_calibration_device_is_where_the_engine_will_train():
    from types import SimpleNamespace

    from torch import nn
    from torch.distributed.fsdp import CPUOffloadPolicy, OffloadPolicy

    from sg_distributed.integrations.trainer import calibration_device

    cuda, cpu = torch.device("cuda", 1), torch.device("cpu")
    plain = nn.Linear(2, 2)  # loaded on the CPU
    assert calibration_device(_fake_trainer(plain, is_deepspeed_enabled=True)) == cuda  # engine moves it later
    assert calibration_device(_fake_trainer(plain, place_model_on_device=True)) == cuda
    assert calibration_device(_fake_trainer(plain, is_fsdp_enabled=True,
                                            fsdp_plugin=SimpleNamespace(cpu_offload=OffloadPolicy()))) == cuda
    assert calibration_device(_fake_trainer(plain, is_fsdp_enabled=True,
                                            fsdp_plugin=SimpleNamespace(cpu_offload=CPUOffloadPolicy()))) == cpu
    assert calibration_device(_fake_trainer(plain)) == cpu  # nobody will move it (e.g. SageMaker MP)

    bnb = nn.Linear(2, 2)
    bnb.quantization_method = "bitsandbytes"  # placed at load; .to() is refused
    dispatched = nn.Linear(2, 2)
    dispatched.hf_device_map = {"": "cpu"}
    partitioned = nn.Linear(2, 2)
    partitioned.weight.ds_id = 0  # ZeRO-3 partitioned (calibrate refuses it with its own error)
    for base in (bnb, dispatched, partitioned):
        assert calibration_device(_fake_trainer(base, is_deepspeed_enabled=True)) == cpu


def test_calibrate_moves_the_model_to_the_calibration_device(tiny_model_dir, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainingArguments

    from sg_distributed import SparseGradConfig, get_sparsegrad_model
    from sg_distributed.data.qa import QACollator, load_qa_pairs
    from sg_distributed.integrations import trainer as trainer_module

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_sparsegrad_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                 SparseGradConfig(max_rows=None, max_cols=None, density=0.5, calibration_steps=1))
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to="none", use_cpu=True)
    trainer = trainer_module.SparseGradTrainer(model=model, args=args, train_dataset=load_qa_pairs()[:4],
                                               data_collator=QACollator(tokenizer, max_length=32))
    moves = []
    monkeypatch.setattr(trainer_module, "calibration_device", lambda t: torch.device("meta"))  # "not where it is"
    monkeypatch.setattr(model, "to", lambda device: moves.append(device) or model, raising=False)
    trainer.calibrate()
    assert moves == [torch.device("meta")] and model.calibrated


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
    assert any(v.abs().sum() > 0 for k, v in values.items() if k.endswith("sparse_values"))


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
