"""AdamW parameter groups, the warm-up + cosine schedule (METHOD.md section 7) and clipping by the
global gradient norm."""

from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("pos_embed", "cls_token", "mask_token")


def vit_layer(name: str, depth: int) -> int:
    """Layer of a timm ViT parameter for layer-wise lr decay: embeddings 0, block i i + 1, the
    rest (final norms, head) depth + 1."""
    if name.startswith(("cls_token", "pos_embed", "patch_embed", "mask_token", "reg_token")):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return depth + 1


def parameter_groups(model: nn.Module, weight_decay: float, lr: float, layer_decay: float | None = None,
                     depth: int = 0) -> list[dict]:
    """AdamW groups. Weight decay on weight matrices only: not on norms, biases, LayerScale,
    position embedding, CLS or mask token. With ``layer_decay``, layer l of a ``depth``-block
    ViT gets lr x layer_decay ** (depth + 1 - l)."""
    groups: dict[tuple[int, bool], dict] = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        no_decay = parameter.ndim <= 1 or name.endswith(".bias") or name.split(".")[-1] in NO_DECAY_NAMES
        layer = vit_layer(name, depth) if layer_decay else 0
        scale = layer_decay ** (depth + 1 - layer) if layer_decay else 1.0
        group = groups.setdefault((layer, no_decay), {"params": [], "weight_decay": 0.0 if no_decay else weight_decay,
                                                      "lr": lr * scale})
        group["params"].append(parameter)
    return list(groups.values())


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


def clip_by_global_norm(parameters: list[nn.Parameter], max_norm: float) -> None:
    """Scales every gradient by min(1, max_norm / (their global L2 norm + 1e-6)), as torch's and
    DeepSpeed's clipping do, in five operators whatever the number of tensors (torch's
    ``clip_grad_norm_`` adds a move of each tensor's norm to one device; DeepSpeed's takes the
    norms one by one). Returns None, as an optimizer's step pre-hook must."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if grads:
        total = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        torch._foreach_mul_(grads, (max_norm / (total + 1e-6)).clamp(max=1.0))
