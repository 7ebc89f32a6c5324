"""`mapet finetune`: a timm ViT classifier from the pre-trained backbone (or from scratch, the
baseline), with the recipe of METHOD.md section 7 on DeepSpeed: global average pooling + fc_norm
+ new head, layer-wise lr decay, warm-up + cosine, mixup/cutmix with label smoothing,
RandAugment, random erasing, drop path. Resumable like pre-training (mapet.engine.pretrain)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy

from mapet.data.dataset import read_description, read_manifest
from mapet.data.reader import ShardDataset
from mapet.data.transforms import finetune_transform
from mapet.engine.deepspeed_engine import fp32_state_dict, make_engine, resume_state
from mapet.engine.steps import plan_steps, select_shards, train_steps
from mapet.engine.distributed import init_distributed, teardown
from mapet.engine.optim import parameter_groups
from mapet.engine.probe import extract_features, fit_linear
from mapet.errors import MapetError
from mapet.files import write_json
from mapet.models import load_backbone, save_classifier


@dataclass
class FinetuneSettings:
    """params.yaml ``finetune`` (plus the ViT from ``model``)."""

    backbone: str = "vit_tiny_patch16_224"
    model_kwargs: dict = field(default_factory=dict)
    init: str = "pretrained"         # pretrained (the pre-trained backbone) | scratch (the baseline)
    epochs: int = 15
    batch_size: int = 128
    micro_batch_size: int = 128
    lr: float = 5e-4                 # at this batch size (the recipe's base lr is for batch 512)
    layer_decay: float = 0.65        # 0 or 1: none
    warmup_epochs: float = 1
    warmup_lr: float = 1e-6
    min_lr: float = 1e-6
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    drop_path_rate: float = 0.1
    mixup: float = 0.8
    cutmix: float = 1.0
    label_smoothing: float = 0.1
    auto_augment: str = "rand-m9-mstd0.5"
    reprob: float = 0.25
    crop_scale: tuple[float, float] = (0.08, 1.0)   # RandomResizedCrop's range of areas
    head_init: str = "random"        # random | probe: the head starts as a linear probe of the frozen features
    grad_clip: float = 0.0
    zero_stage: int = 1
    bf16: bool | None = None
    compile: bool | str = "auto"     # torch.compile; auto: on GPUs only
    seed: int = 0
    workers: int = 1
    split: str = "train"
    max_shards: int = 0              # the first N shards of the split only (a labelled subset); 0: all
    collective_timeout_s: float = 600  # a collective waiting this long for a lost peer fails the run
    checkpoint_every: int = 100
    keep_checkpoints: int = 2


def build_classifier(settings: FinetuneSettings, num_classes: int, backbone_file: Path | None) -> tuple:
    """(model, timm kwargs, names of the weights that came from the backbone file)."""
    kwargs = {**settings.model_kwargs, "num_classes": num_classes, "global_pool": "avg",
              "drop_path_rate": settings.drop_path_rate}
    model = timm.create_model(settings.backbone, **kwargs)
    loaded = load_backbone(model, backbone_file) if backbone_file else []
    return model, kwargs, loaded


def init_head_by_probe(model: VisionTransformer, data: Path, split: str, shards: list[str], num_classes: int,
                       progress: bool = True) -> None:
    """LP-FT: fit the head as a linear probe of the frozen features of the labelled images (what the
    head sees: pooled, fc_norm), so fine-tuning starts from a fitted head and moves the backbone
    less (Kumar et al., 2022). Deterministic, so every rank fits the same head."""
    features, labels = extract_features(model, data, split, 0, shards=shards, progress=progress)
    probe = fit_linear(features["pre_logits"], labels, num_classes)
    with torch.no_grad():
        model.head.weight.copy_(probe.weight)
        model.head.bias.copy_(probe.bias)


def run_finetune(settings: FinetuneSettings, data: Path, backbone_file: Path | None, out: Path,
                 resume: bool = False, progress: bool = True) -> dict[str, Any]:
    data, out = Path(data), Path(out)
    if backbone_file is not None and not Path(backbone_file).is_file():
        raise MapetError(f"{backbone_file}: no backbone file (run `mapet pretrain`, or fine-tune with --scratch)")
    manifest = read_manifest(data)
    classes = read_description(data)["classes"]
    manifest, shards = select_shards(manifest, settings.split, settings.max_shards)

    rank, world, device = init_distributed(settings.collective_timeout_s)
    try:
        steps_per_epoch, accum = plan_steps(manifest, settings, world)
        torch.manual_seed(settings.seed)
        model, kwargs, loaded = build_classifier(settings, len(classes), backbone_file)
        if settings.head_init == "probe":
            init_head_by_probe(model, data, settings.split, shards, len(classes), progress=progress and rank == 0)
        decay = settings.layer_decay if 0 < settings.layer_decay < 1 else None
        groups = parameter_groups(model, settings.weight_decay, settings.lr, decay, len(model.blocks))
        engine, input_dtype = make_engine(settings, model, groups, steps_per_epoch, accum, device)
        mixup = Mixup(mixup_alpha=settings.mixup, cutmix_alpha=settings.cutmix, label_smoothing=settings.label_smoothing,
                      num_classes=len(classes)) if settings.mixup or settings.cutmix else None
        criterion = SoftTargetCrossEntropy() if mixup else torch.nn.CrossEntropyLoss(
            label_smoothing=settings.label_smoothing)
        checkpoints = out / "checkpoints"
        state = resume_state(engine, checkpoints) if resume else None
        step, history = (state["global_step"], state["history"]) if state else (0, [])
        if rank == 0:
            origin = f"{len(loaded)} tensors from {backbone_file}" if backbone_file else "scratch (random init)"
            print(f"finetune {settings.backbone}: {len(classes)} classes, {len(manifest)} labelled images, "
                  f"backbone {origin}; {world} rank(s) x {max(1, settings.workers)} reader(s), "
                  f"{steps_per_epoch} steps/epoch, "
                  f"{'resuming at step ' + str(step) if step else 'starting at step 0'}")

        transform = finetune_transform(settings.model_kwargs["img_size"], settings.auto_augment or None,
                                       settings.reprob, tuple(settings.crop_scale))
        dataset = ShardDataset(data, settings.split, transform, shuffle=True, seed=settings.seed, rank=rank,
                               world_size=world, shards=shards)

        def micro_step(batch: tuple, seed: int) -> torch.Tensor:
            images, labels, _ = batch
            torch.manual_seed(seed)
            np.random.seed(seed % 2**32)                                            # timm's Mixup draws from numpy
            if mixup:
                images, labels = mixup(images, labels)
            logits = engine(images.to(device, input_dtype))
            loss = criterion(logits.float(), labels.to(device))
            engine.backward(loss)
            engine.step()
            return torch.stack([loss.detach().float(), torch.ones((), device=device)])

        speed = train_steps(engine, dataset, settings, world=world, rank=rank, accum=accum,
                                   steps_per_epoch=steps_per_epoch, step=step, history=history,
                                   checkpoints=checkpoints, micro_step=micro_step,
                                   record_of=lambda sums: {"loss": round((sums[0] / sums[1]).item(), 5)},
                                   desc="finetune", progress=progress)
        metrics = {"steps": len(history), "loss": history[-1]["loss"],
                   "initialised_from": str(backbone_file or "scratch"), **speed}
        weights = fp32_state_dict(engine)                                   # collective: every rank gathers
        if rank == 0:
            save_classifier(engine.module, settings.backbone, kwargs, classes, out / "model.safetensors",
                            {"backbone_file": str(backbone_file or "scratch")}, weights)
            write_json(out / "metrics.json", metrics)
            write_json(out / "history.json", history)
        return metrics
    except BaseException:
        teardown(finished=False)
        raise
    finally:
        teardown()

