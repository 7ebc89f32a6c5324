"""AdamW parameter groups and the warm-up + cosine schedule (METHOD.md section 7)."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on weight matrices only: not on norms, biases, LayerScale, position
    embedding, CLS or mask token."""
    decay, no_decay = [], []
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        if parameter.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES:
            no_decay.append(parameter)
        else:
            decay.append(parameter)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def warmup_cosine(optimizer: torch.optim.Optimizer, base_lr: float, warmup_steps: int, total_steps: int,
                  warmup_lr: float, min_lr: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear from ``warmup_lr`` to ``base_lr`` over ``warmup_steps``, then cosine to ``min_lr``;
    stepped once per optimizer step. Groups keep their own lr ratios (layer-wise decay)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            lr = warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
        else:
            progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
            lr = min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
        return lr / base_lr

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
