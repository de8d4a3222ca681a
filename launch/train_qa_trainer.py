#!/usr/bin/env python
"""SparseGrad fine-tuning on FanOutQA pairs through the Hugging Face Trainer (peft model + SparseGradCallback).

    python launch/train_qa_trainer.py                                                    # one process
    python launch/train_qa_trainer.py --resume_from_checkpoint auto                      # resume the newest checkpoint
    torchrun --nproc_per_node 2 launch/train_qa_trainer.py --deepspeed ds_configs/zero2.json
    ACCELERATE_USE_CPU=true accelerate launch --config_file launch/accelerate/cpu_ddp.yaml \\
        launch/train_qa_trainer.py                                                       # accelerate, CPU

Defaults: the embedded SmolLM2-135M-Instruct and the FanOutQA single-hop pairs (split by top-level
question). Calibration runs on the Trainer's own train dataloader (first --calibration_steps batches of
every rank); checkpoints hold the peft adapter files (``PeftModel.from_pretrained`` loads them). Held-out answer loss is the Trainer's eval_loss
(prompt tokens are masked out of the labels).
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
from sg_distributed.data.qa import QACollator  # noqa: E402
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
    p.add_argument("--output_dir", default="outputs/train_qa_trainer")
    p.add_argument("--max_steps", type=positive_int, default=40)
    p.add_argument("--micro_batch_size", type=positive_int, default=4)
    p.add_argument("--grad_accum", type=positive_int, default=1)
    p.add_argument("--lr", type=positive_float, default=1e-3)
    p.add_argument("--max_grad_norm", type=non_negative_float, default=1.0)
    p.add_argument("--density", type=fraction, default=0.01)
    p.add_argument("--k", type=positive_int, default=None)
    p.add_argument("--max_rows", type=non_negative_float, default=DEFAULT_BUDGET, help="0 = no budget")
    p.add_argument("--max_cols", type=non_negative_float, default=0.25, help="0 = no budget")
    p.add_argument("--block_stride", type=positive_int, default=1)
    p.add_argument("--calibration_steps", type=positive_int, default=8, help="train-dataloader batches per rank")
    p.add_argument("--max_length", type=at_least(2), default=64)
    p.add_argument("--eval_size", type=non_negative_int, default=64, help="held-out pairs (0 = all)")
    p.add_argument("--save_steps", type=positive_int, default=None, help="default: max_steps (one checkpoint)")
    p.add_argument("--logging_steps", type=positive_int, default=5)
    add_reporting_arguments(p)  # the Trainer's own callbacks report (TensorBoard in <output_dir>/runs/<time>)
    p.add_argument("--precision", choices=["fp32", "bf16", "fp16"], default="fp32")
    p.add_argument("--no_eval_before", action="store_true", help="skip eval before training (always under DeepSpeed)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    add_resume_arguments(p)
    args = p.parse_args(argv)
    check_paths(p, args, files=("deepspeed",), dirs=("model",))
    check_data_arguments(p, args)
    check_resume_argument(p, args)
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments

    from sg_distributed.integrations.deepspeed import with_persistent_k_vectors
    from sg_distributed.integrations.trainer import (calibrate_from_dataloader, configure_cpu_deepspeed_state,
                                                     restore_checkpoint_adapter, tensorboard_in_output_dir)

    if args.model is None:
        from sg_distributed.data.assets import smollm2_dir

        args.model = str(smollm2_dir())  # a given --model was checked by parse_args
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Load before TrainingArguments: a ZeRO-3 config would otherwise turn on zero.Init for this from_pretrained.
    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = SparseGradConfig(density=args.density, k=args.k, max_rows=args.max_rows or None,
                              max_cols=args.max_cols or None, block_stride=args.block_stride,
                              calibration_steps=args.calibration_steps)
    model = get_peft_model(base, config)

    try:
        train_pairs, heldout = load_pairs(args)
    except (ValueError, OSError) as err:
        raise SystemExit(f"error: cannot use the training data: {err}")
    heldout = heldout[: args.eval_size] if args.eval_size else heldout
    on_cpu = not torch.cuda.is_available()
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    use_deepspeed = bool(args.deepspeed) or os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() == "true"
    accelerator_config = configure_cpu_deepspeed_state() if use_deepspeed and on_cpu else None
    training_args = TrainingArguments(
        output_dir=args.output_dir, max_steps=args.max_steps, per_device_train_batch_size=args.micro_batch_size,
        per_device_eval_batch_size=16, gradient_accumulation_steps=args.grad_accum, learning_rate=args.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=args.max_grad_norm,
        logging_steps=args.logging_steps, save_strategy="steps", save_steps=args.save_steps or args.max_steps,
        report_to=resolve_report_to(args.report_to) or "none", seed=args.seed, data_seed=args.seed,
        deepspeed=with_persistent_k_vectors(args.deepspeed, model) if args.deepspeed else None,  # ZeRO-3: k whole
        bf16=args.precision == "bf16", fp16=args.precision == "fp16", use_cpu=on_cpu and not use_deepspeed,
        ddp_backend="gloo" if on_cpu and distributed else None,  # "gloo" in one process: accelerate fails
        accelerator_config=accelerator_config, dataloader_num_workers=0, disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_pairs, eval_dataset=heldout,
                      data_collator=QACollator(tokenizer, max_length=args.max_length), processing_class=tokenizer,
                      callbacks=[SparseGradCallback(calibration_steps=args.calibration_steps)])
    tensorboard_in_output_dir(trainer)  # the evaluation before training would open ./runs otherwise
    if args.resume_from_checkpoint:  # the bases and supports its k-vectors were trained on (DeepSpeed restores none)
        restore_checkpoint_adapter(model, args.resume_from_checkpoint)
    results: dict = {"world_size": training_args.world_size, "deepspeed": args.deepspeed}
    trainable, total = model.get_nb_trainable_parameters()
    results["trainable_params"], results["total_params"] = trainable, total
    if not args.no_eval_before and not use_deepspeed and args.resume_from_checkpoint:
        with model.disable_adapter():  # the base model's loss, which a fresh run's zero k-vectors give
            results["before"] = trainer.evaluate()
    elif not args.no_eval_before and not use_deepspeed:  # HF: eval before train needs ZeRO-3 under DeepSpeed
        # eval needs the adapter calibrated: do it now, on the same batches the callback would take
        calibrate_from_dataloader(model.base_model, trainer.get_train_dataloader(), args.calibration_steps)
        results["before"] = trainer.evaluate()
    # SparseGradCallback calibrates at on_train_begin unless done above (or restored from the checkpoint)
    train_output = trainer.train(resume_from_checkpoint=args.resume_from_checkpoint)
    results["support_checksum"] = model.support_checksum()
    results["train_loss"] = train_output.training_loss
    results["log_history"] = [e for e in trainer.state.log_history if "loss" in e]
    results["after"] = trainer.evaluate()
    trainer.save_model(args.output_dir)
    if trainer.is_world_process_zero():
        (Path(args.output_dir) / "metrics.json").write_text(json.dumps(results, indent=2, default=str))
        before = results.get("before", {}).get("eval_loss")
        print(f"trainable params {trainable:,d} of {total:,d}; world size {training_args.world_size}; held-out answer "
              f"loss {'' if before is None else f'{before:.4f} -> '}{results['after']['eval_loss']:.4f}; "
              f"adapter in {args.output_dir}", flush=True)
    return results


if __name__ == "__main__":
    main()
    destroy_process_group()  # the Trainer leaves the group up; on success only, as in train_qa.py
