"""TRL's SFTTrainer with peft_config=SparseGradConfig (launch/sft_trl.py) on the tiny Llama with the real
SmolLM2 tokenizer and QA pairs: one process in-process, 2 ranks under DeepSpeed ZeRO-2 and ZeRO-3 on CPU, and
ZeRO-3 over a base that zero.Init partitioned at load."""
import json
import os
import sys
from pathlib import Path

import pytest
import torch

from conftest import free_port, load_launch_script, run_ranks

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["--max_steps", "8", "--calibration_steps", "2", "--micro_batch_size", "2", "--eval_size", "8",
          "--density", "0.05", "--lr", "3e-2", "--max_length", "64", "--logging_steps", "2"]


@pytest.fixture(scope="module")
def sft_trl():
    return load_launch_script("sft_trl")


def test_sft_trainer_calibrates_trains_k_vectors_and_saves_a_peft_adapter(sft_trl, tiny_model_dir, tmp_path,
                                                                         monkeypatch):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTTrainer

    seen, trainers = [], []

    class Recorder(TrainerCallback):
        def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
            seen.append({n for n, p in model.named_parameters() if p.grad is not None})

    real_init = SFTTrainer.__init__

    def init(self, *args, **kwargs):  # the script's own trainer, with a recorder added
        kwargs["callbacks"] = kwargs["callbacks"] + [Recorder()]
        real_init(self, *args, **kwargs)
        trainers.append(self)

    monkeypatch.setattr(SFTTrainer, "__init__", init)
    results = sft_trl.main(["--model", str(tiny_model_dir), "--output_dir", str(tmp_path), *COMMON])
    losses = [e["loss"] for e in results["log_history"]]
    assert losses[-1] < losses[0], losses
    assert results["after"]["eval_loss"] < results["before"]["eval_loss"] - 0.02, results  # held-out loss falls
    model = trainers[0].model
    k_vectors = {n for n, p in model.named_parameters() if p.requires_grad}
    assert k_vectors and all(n.endswith("sparsegrad_values") for n in k_vectors)
    assert seen and all(s == k_vectors for s in seen)  # only the k-vectors get gradients

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tmp_path)
    batch = tokenizer(["What is the capital of France?"], return_tensors="pt")
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=1e-5, rtol=0)


def test_conversations_carry_the_system_prompt_history_and_context(sft_trl):
    """--dataset rows reach TRL with everything but the answer in the prompt: system turn, earlier turns, and
    the context before the question in the user turn; the answer alone is the completion."""
    from sg_distributed.data.qa import QAPair

    pair = QAPair("How tall?", "61.6", "g", context="Jaguar I-Pace.", system="Be brief.",
                  history=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    assert sft_trl.conversations([pair]) == [{
        "prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Jaguar I-Pace.\n\nHow tall?"}],
        "completion": [{"role": "assistant", "content": "61.6"}]}]
    plain = QAPair("How tall?", "61.6", "g")  # FanOutQA: the prompt TRL saw before --dataset existed
    assert sft_trl.conversations([plain])[0]["prompt"] == [{"role": "user", "content": "How tall?"}]


@pytest.mark.multiprocess
@pytest.mark.parametrize("stage", [2, 3])
def test_sft_trainer_two_ranks_deepspeed(tiny_model_dir, tmp_path, stage):
    """2 ranks under ZeRO-2 and ZeRO-3: calibration runs through the raw module at on_train_begin (ZeRO-3
    gathers the frozen weights in its forward hooks), the saved adapter holds the gathered, trained values."""
    from safetensors.torch import load_file

    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env |= {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "launch/sft_trl.py", "--model", str(tiny_model_dir), "--output_dir", str(tmp_path),
           "--deepspeed", f"ds_configs/zero{stage}.json", *COMMON]
    proc = run_ranks(cmd, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert "world size 2" in proc.stdout
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    losses = [e["loss"] for e in metrics["log_history"]]
    assert metrics["deepspeed"] == f"ds_configs/zero{stage}.json" and losses[-1] < losses[0], losses
    saved = load_file(str(tmp_path / "adapter_model.safetensors"))
    values = [v for k, v in saved.items() if k.endswith("sparsegrad_values")]
    assert len(values) == 4 and all(v.numel() == 102 and v.abs().sum() > 0 for v in values)  # whole, trained


@pytest.mark.multiprocess
def test_sft_trainer_over_a_base_partitioned_by_zero_init(tiny_model_dir, tmp_path):
    """The model loaded after a ZeRO-3 SFTConfig (zero.Init: every weight a 0-element partition at load):
    get_peft_model injects on the partitioned linears (their shapes come from in/out_features), and the
    callback calibrates through the engine's module, whose forward gathers the weights."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ACCELERATE_", "FSDP_"))}
    env |= {"OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "tests/zero_init_worker.py", str(tiny_model_dir), str(tmp_path)]
    proc = run_ranks(cmd, env=env, cwd=ROOT, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["partitioned_at_load"] and result["calibrated"]
    losses = result["losses"]
    assert len(losses) == 6 and losses[-1] < losses[0], losses
    assert result["k_values"] == [102] * 4 and result["k_values_trained"]  # whole (gathered) and trained
