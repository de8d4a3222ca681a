"""GradDrop (arXiv 2307.10098): stochastic masking of gradients during backward, and its variants."""
from sg_distributed.graddrop.masking import GradDropConfig, GradualUnfreezing, apply_graddrop

__all__ = ["GradDropConfig", "GradualUnfreezing", "apply_graddrop"]
