#!/usr/bin/env python
"""Fine-tune a causal LM on question/answer pairs with SparseGrad or a baseline; print held-out metrics.

    deepspeed --num_gpus 2 launch/train_qa.py --ds_config ds_configs/zero2.json      # DeepSpeed
    torchrun --nproc_per_node 2 launch/train_qa.py                                   # DDP
    accelerate launch --config_file launch/accelerate/cpu_deepspeed_zero2.yaml launch/train_qa.py  # accelerate
    python launch/train_qa.py                                                        # one process

The flags are ``sg_distributed.training.cli`` (``--help``); the run is ``sg_distributed.training.loop.
TrainingLoop``, which Python code drives the same way (``TrainingLoop(options(steps=20)).run()``).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

for key, value in {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                   "TOKENIZERS_PARALLELISM": "false"}.items():
    os.environ.setdefault(key, value)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sg_distributed.distributed.process_group import destroy_process_group  # noqa: E402
from sg_distributed.training.loop import Stop, TrainingLoop  # noqa: E402
from sg_distributed.training.cli import parse_args as _parse_args  # noqa: E402


def parse_args(argv=None):
    return _parse_args(argv, prog="train_qa.py")


def main(argv=None) -> dict:
    return TrainingLoop(parse_args(argv)).run()


if __name__ == "__main__":
    try:
        main()
        destroy_process_group()  # on success only: after an error a peer may still be inside a collective
    except Stop as stop:
        print(stop.message, file=sys.stderr, flush=True)
        sys.exit(stop.code)
