"""The fused distillation losses, one import: cosine (pooled/dense), cosine fused with the final
projection, and SAM's focal + dice mask loss. Each op lives in its own file with its plain-torch
reference beside its kernels; see the caveats at the top of each file."""

from .cosine_distill import CosineDistillFunction, cosine_distill_loss, cosine_distill_loss_reference
from .focal_dice import FocalDiceFunction, focal_dice_loss, focal_dice_loss_reference
from .linear_cosine_distill import (
    LinearCosineDistillFunction,
    linear_cosine_distill_loss,
    linear_cosine_distill_loss_reference,
)

__all__ = [
    "CosineDistillFunction",
    "FocalDiceFunction",
    "LinearCosineDistillFunction",
    "cosine_distill_loss",
    "cosine_distill_loss_reference",
    "focal_dice_loss",
    "focal_dice_loss_reference",
    "linear_cosine_distill_loss",
    "linear_cosine_distill_loss_reference",
]
