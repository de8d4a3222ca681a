"""Integrations of sg_distributed with distributed training engines (DeepSpeed, ...)."""
