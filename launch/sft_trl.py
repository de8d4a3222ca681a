#!/usr/bin/env python
"""SparseGrad through TRL's SFTTrainer, the peft way: ``SFTTrainer(model, peft_config=SparseGradConfig(...))``.

    python launch/sft_trl.py                                                             # one process
    torchrun --nproc_per_node 2 launch/sft_trl.py --deepspeed ds_configs/zero2.json      # 2 ranks, ZeRO-2
    python launch/sft_trl.py --save_steps 10 --resume_from_checkpoint auto               # resume the newest checkpoint

Defaults: the embedded SmolLM2-135M-Instruct and the FanOutQA single-hop pairs (split by top-level question)
as conversational prompt/completion rows, so TRL applies the chat template and trains on the answer tokens
only. ``SparseGradCallback`` calibrates the adapter on the first ``--calibration_steps`` batches of the
trainer's own dataloader when training starts (the k-vectors exist from ``get_peft_model``, so the optimizer
that TRL builds already holds them). The adapter is saved with peft (``PeftModel.from_pretrained`` loads it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sg_distributed import SparseGradCallback, SparseGradConfig  # noqa: E402
from sg_distributed.sparsegrad.config import DEFAULT_BUDGET  # noqa: E402
from sg_distributed.data.qa import prompt_messages  # noqa: E402
from sg_distributed.data.sources import load_pairs  # noqa: E402
from sg_distributed.distributed.process_group import destroy_process_group  # noqa: E402
from sg_distributed.training.arguments import (  # noqa: E402
    ArgumentParser, add_data_arguments, add_reporting_arguments, add_resume_arguments, at_least,
    check_data_arguments, check_paths, check_resume_argument, fraction, non_negative_float, non_negative_int,
    positive_float, positive_int)
from sg_distributed.training.reporting import resolve_report_to  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="HF model directory (default: embedded SmolLM2-135M-Instruct)")
    add_data_arguments(p)
    p.add_argument("--deepspeed", help="DeepSpeed JSON (\"auto\" values are filled by the Trainer)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=int(os.environ.get("LOCAL_RANK", -1)))
    p.add_argument("--output_dir", default="outputs/sft_trl")
    p.add_argument("--max_steps", type=positive_int, default=40)
    p.add_argument("--micro_batch_size", type=positive_int, default=4)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--density", type=fraction, default=0.01)
    p.add_argument("--max_rows", type=non_negative_float, default=DEFAULT_BUDGET, help="0 = no budget")
    p.add_argument("--max_cols", type=non_negative_float, default=DEFAULT_BUDGET, help="0 = no budget")
    p.add_argument("--calibration_steps", type=positive_int, default=8, help="train-dataloader batches per rank")
    p.add_argument("--max_length", type=at_least(2), default=128)
    p.add_argument("--eval_size", type=non_negative_int, default=64, help="held-out pairs (0 = all)")
    p.add_argument("--save_steps", type=positive_int, default=None, help="default: max_steps (one checkpoint)")
    p.add_argument("--logging_steps", type=positive_int, default=5)
    add_reporting_arguments(p)  # the Trainer's own callbacks report (TensorBoard in <output_dir>/runs/<time>)
    p.add_argument("--seed", type=non_negative_int, default=0)
    add_resume_arguments(p)
    args = p.parse_args(argv)
    check_paths(p, args, files=("deepspeed",), dirs=("model",))
    check_data_arguments(p, args)
    check_resume_argument(p, args)
    return args


def conversations(pairs) -> list[dict]:
    """TRL's conversational prompt/completion rows: the prompt is the pair's system turn, history and user turn
    (context + question), the chat template is applied and only the completion is supervised."""
    return [{"prompt": prompt_messages(p), "completion": [{"role": "assistant", "content": p.answer}]} for p in pairs]


def main(argv=None) -> dict:
    args = parse_args(argv)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    from sg_distributed.integrations.deepspeed import with_persistent_k_vectors
    from sg_distributed.integrations.trainer import (configure_cpu_deepspeed_state, restore_checkpoint_adapter,
                                                     tensorboard_in_output_dir)

    if args.model is None:
        from sg_distributed.data.assets import smollm2_dir

        args.model = str(smollm2_dir())  # a given --model was checked by parse_args
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)  # before the DeepSpeed config
    try:
        train_pairs, heldout = load_pairs(args)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: cannot use the training data: {err}")
    heldout = heldout[: args.eval_size] if args.eval_size else heldout

    on_cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    peft_config = SparseGradConfig(density=args.density, max_rows=args.max_rows or None,
                                   max_cols=args.max_cols or None, calibration_steps=args.calibration_steps,
                                   task_type="CAUSAL_LM")
    use_deepspeed = bool(args.deepspeed)
    # ZeRO-3: the k-vectors stay whole on every rank (the Trainer's "auto" threshold would be 10 x hidden)
    deepspeed = with_persistent_k_vectors(args.deepspeed, model, peft_config) if use_deepspeed else None
    sft_args = SFTConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.micro_batch_size,
        per_device_eval_batch_size=16, learning_rate=args.lr, lr_scheduler_type="constant", warmup_steps=0,
        logging_steps=args.logging_steps, save_strategy="steps", save_steps=args.save_steps or args.max_steps,
        report_to=resolve_report_to(args.report_to) or "none", seed=args.seed, data_seed=args.seed,
        deepspeed=deepspeed, max_length=args.max_length,
        use_cpu=on_cpu and not use_deepspeed, ddp_backend="gloo" if on_cpu and distributed else None,
        accelerator_config=configure_cpu_deepspeed_state() if use_deepspeed and on_cpu else None,
        dataloader_num_workers=0, disable_tqdm=True, bf16=False,
    )
    trainer = SFTTrainer(model=model, args=sft_args, train_dataset=Dataset.from_list(conversations(train_pairs)),
                         eval_dataset=Dataset.from_list(conversations(heldout)), processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[SparseGradCallback()])
    tensorboard_in_output_dir(trainer)  # the evaluation before training would open ./runs otherwise
    if args.resume_from_checkpoint:  # the bases and supports its k-vectors were trained on (DeepSpeed restores none)
        restore_checkpoint_adapter(trainer.model, args.resume_from_checkpoint)
    results: dict = {"world_size": sft_args.world_size, "deepspeed": args.deepspeed}
    if not use_deepspeed:  # before calibration the adapter is off: the base model's loss (the k-vectors start at 0)
        with trainer.model.disable_adapter():
            results["before"] = trainer.evaluate()
    train_output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    results["train_loss"] = train_output.training_loss
    results["log_history"] = [e for e in trainer.state.log_history if "loss" in e]
    results["after"] = trainer.evaluate()
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    results["trainable_params"] = trainable
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        (Path(args.output_dir) / "metrics.json").write_text(json.dumps(results, indent=2, default=str))
        before = results.get("before", {}).get("eval_loss")
        print(f"trainable params {trainable:,d}; world size {sft_args.world_size}; held-out answer loss "
              f"{'' if before is None else f'{before:.4f} -> '}{results['after']['eval_loss']:.4f}; "
              f"adapter in {args.output_dir}", flush=True)
    return results


if __name__ == "__main__":
    main()
    destroy_process_group()  # the Trainer leaves the group up; on success only, as in train_qa.py
