"""Sparse-gradient fine-tuning (SparseGrad, GradDrop) for distributed engines."""
from .sparsegrad.config import SparseGradConfig
from .graddrop import GradDropConfig, GradualUnfreezing, apply_graddrop
from sg_distributed.sparsegrad.wrapper import SparseGradModel, get_sparsegrad_model
from .sparsegrad.model import SparseGradTuner  # registers SparseGrad with peft
from .integrations.trainer import SparseGradCallback

__all__ = [
    "SparseGradConfig",
    "SparseGradModel",
    "SparseGradTuner",
    "SparseGradCallback",
    "get_sparsegrad_model",
    "GradDropConfig",
    "apply_graddrop",
    "GradualUnfreezing",
]
