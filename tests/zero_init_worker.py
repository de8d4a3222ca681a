"""Worker for tests/integrations/test_integrations_trl.py: SFTTrainer(peft_config=SparseGradConfig) over a base that ZeRO-3's
``zero.Init`` partitioned at load (``SFTConfig`` with a ZeRO-3 config created *before* ``from_pretrained``).

    DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 \\
        tests/zero_init_worker.py <tiny model dir> <output dir>

Rank 0 writes ``<output dir>/result.json``: whether the base was partitioned at load, the training losses,
whether the adapter was calibrated and the k-vector sizes of the saved adapter.
"""
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "launch")]

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402
from trl import SFTConfig, SFTTrainer  # noqa: E402

from sft_trl import conversations  # noqa: E402
from sg_distributed import SparseGradCallback, SparseGradConfig  # noqa: E402
from sg_distributed.data.qa import load_qa_pairs  # noqa: E402
from sg_distributed.integrations.trainer import configure_cpu_deepspeed_state  # noqa: E402
from sg_distributed.distributed.process_group import destroy_process_group  # noqa: E402


def main(model_dir: str, out: str) -> None:
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = SFTConfig(output_dir=out, max_steps=6, per_device_train_batch_size=2, learning_rate=3e-2,
                     lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none",
                     deepspeed=str(ROOT / "ds_configs" / "zero3.json"), max_length=64, dataloader_num_workers=0,
                     accelerator_config=configure_cpu_deepspeed_state(), disable_tqdm=True, bf16=False, seed=0)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)  # zero.Init is on: partitioned
    partitioned = all(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters())
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(conversations(load_qa_pairs()[:40])),
                         processing_class=tokenizer, callbacks=[SparseGradCallback()],
                         peft_config=SparseGradConfig(density=0.05, calibration_steps=2, task_type="CAUSAL_LM"))
    trainer.train()
    trainer.save_model(out)
    if trainer.is_world_process_zero():
        saved = load_file(str(Path(out) / "adapter_model.safetensors"))
        result = {"partitioned_at_load": partitioned, "calibrated": trainer.model.base_model.calibrated,
                  "losses": [e["loss"] for e in trainer.state.log_history if "loss" in e],
                  "k_values": [v.numel() for k, v in saved.items() if k.endswith("sparsegrad_values")],
                  "k_values_trained": all(v.abs().sum() > 0 for k, v in saved.items() if k.endswith("sparsegrad_values"))}
        (Path(out) / "result.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main(*sys.argv[1:3])
    destroy_process_group()
