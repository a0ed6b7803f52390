"""What trains in each stage, with which learning rate, on which schedule.

- Stage 1 and 3: the CLIP head only; stage 2: the CLIP head at ``stage2_lr`` and the backbone and
  mask decoder at ``stage2_lr * stage2_lr_scale`` (paper: 4e-5 and 4e-6). The prompt encoder and
  the text tower never train.
- Weight decay on weight matrices only (none on norms, biases, position tables); linear warm-up
  over ``warmup_fraction`` of a stage, then cosine to ``min_lr_ratio`` (paper: not stated).
"""

from __future__ import annotations

import math
from typing import List, Tuple

import torch

from fastsamclip.modeling import SAMCLIP
from fastsamclip.train.config import TrainConfig


def _no_decay(name: str, p: torch.Tensor) -> bool:
    return p.dim() < 2 or "pos" in name or "norm" in name


def stage_trainable(stage: int) -> Tuple[str, ...]:
    """Which of SAMCLIP.trainable_parameters()'s groups train in a stage."""
    return ("clip_head",) if stage in (1, 3) else ("clip_head", "backbone", "sam_head")


def set_trainable(student: SAMCLIP, stage: int) -> None:
    """Freeze everything, then unfreeze the stage's groups (prompt encoder and text never train)."""
    for p in student.parameters():
        p.requires_grad_(False)
    groups = student.trainable_parameters()
    for g in stage_trainable(stage):
        for p in groups[g]:
            p.requires_grad_(True)


def param_groups(student: SAMCLIP, stage: int, cfg: TrainConfig) -> List[dict]:
    """AdamW groups named ``{part}`` / ``{part}_no_decay`` with the stage's learning rates."""
    lr_head = {1: cfg.stage1_lr, 2: cfg.stage2_lr, 3: cfg.stage3_lr}[stage]
    lrs = {"clip_head": lr_head, "backbone": cfg.stage2_lr * cfg.stage2_lr_scale,
           "sam_head": cfg.stage2_lr * cfg.stage2_lr_scale}
    modules = {"clip_head": student.clip_head, "backbone": student.image_encoder, "sam_head": student.mask_decoder}
    groups = []
    for part in stage_trainable(stage):
        named = list(modules[part].named_parameters())
        decay = [p for n, p in named if not _no_decay(n, p)]
        no_decay = [p for n, p in named if _no_decay(n, p)]
        groups.append({"name": part, "params": decay, "lr": lrs[part], "weight_decay": cfg.weight_decay})
        groups.append({"name": f"{part}_no_decay", "params": no_decay, "lr": lrs[part], "weight_decay": 0.0})
    return [g for g in groups if g["params"]]


def lr_lambda(total: int, warmup_fraction: float, min_ratio: float):
    warm = int(round(total * warmup_fraction))

    def f(step: int) -> float:
        if warm > 0 and step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, total - warm)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return f

