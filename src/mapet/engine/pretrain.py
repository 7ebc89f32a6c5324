"""`mapet pretrain`: MaPeT, PLM or MIM on the shard reader and the token file, on DeepSpeed.

Exactly resumable: every micro-batch draws its prediction orders and its dropout/drop-path noise
from a seed derived from (seed, step, micro-batch, rank), the data order depends only on the
epoch, and DeepSpeed restores model, optimizer and schedule; a resumed run skips the batches it
had already consumed in the interrupted epoch.

Equivalent scales: readers are (rank, DataLoader worker) pairs, each with its own shards, so one
process with W workers and gradient accumulation W sees the same global batches as W processes
with one worker each.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from mapet.data.dataset import read_manifest
from mapet.data.reader import ShardDataset
from mapet.data.transforms import pretrain_transform
from mapet.engine.common import (checkpoint, deepspeed_config, micro_batch_seed, resume_state, write_json)
from mapet.engine.common import steps_per_epoch as plan_steps
from mapet.engine.distributed import init_distributed, teardown
from mapet.engine.optim import parameter_groups, warmup_cosine
from mapet.errors import MapetError
from mapet.masking import default_num_predict, sample_orders
from mapet.models import create_pretrain_model, save_backbone, save_pretrain_model
from mapet.params import build_settings
from mapet.tokenizers.tokens import load_tokens

@dataclass
class PretrainSettings:
    """params.yaml ``pretrain`` (plus the ViT from ``model``)."""

    backbone: str = "vit_tiny_patch16_224"
    model_kwargs: dict = field(default_factory=dict)   # img_size, patch_size, depth, embed_dim, num_heads, ...
    objective: str = "mapet"
    num_predict: int | None = None
    mim_min_block: int = 16
    epochs: int = 1
    batch_size: int = 64             # global
    micro_batch_size: int = 64       # per rank and step
    lr: float = 1.5e-3
    warmup_lr: float = 1e-6
    min_lr: float = 1e-5
    warmup_epochs: float = 1
    weight_decay: float = 0.05
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 3.0
    zero_stage: int = 1
    bf16: bool | None = None         # None: on GPUs only
    color_jitter: float = 0.0
    seed: int = 42
    workers: int = 1
    split: str = "train"
    checkpoint_every: int = 100      # optimizer steps
    keep_checkpoints: int = 2


def run_pretrain(settings: PretrainSettings, data: Path, tokens_dir: Path, out: Path, resume: bool = False,
                 progress: bool = True) -> dict[str, Any]:
    import deepspeed

    data, tokens_dir, out = Path(data), Path(tokens_dir), Path(out)
    image_size, patch = settings.model_kwargs["img_size"], settings.model_kwargs["patch_size"]
    grid = (image_size // patch, image_size // patch)
    tokens, token_info = load_tokens(tokens_dir, data, expected_grid=grid)      # refuse before any set-up
    manifest = read_manifest(data)
    row_of = {key: row for row, key in enumerate(manifest["key"])}

    rank, world, device = init_distributed()
    try:
        workers = max(1, settings.workers)
        steps_per_epoch, accum = plan_steps(manifest, settings.split, world, workers, settings.micro_batch_size,
                                            settings.batch_size)
        total_steps = settings.epochs * steps_per_epoch

        torch.manual_seed(settings.seed)
        model = create_pretrain_model(settings.objective, settings.backbone, token_info["k"], **settings.model_kwargs)
        num_predict = settings.num_predict or default_num_predict(settings.objective, model.num_patches)
        optimizer = torch.optim.AdamW(parameter_groups(model, settings.weight_decay, settings.lr), lr=settings.lr,
                                      betas=tuple(settings.betas))
        scheduler = warmup_cosine(optimizer, settings.lr, round(settings.warmup_epochs * steps_per_epoch),
                                  total_steps, settings.warmup_lr, settings.min_lr)
        bf16 = device.type == "cuda" if settings.bf16 is None else settings.bf16
        config = deepspeed_config(settings.micro_batch_size, accum, settings.grad_clip, settings.zero_stage, bf16)
        engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                               config=config)

        checkpoints = out / "checkpoints"
        state = resume_state(engine, checkpoints) if resume else None
        step, history = (state["global_step"], state["history"]) if state else (0, [])
        if rank == 0:
            print(f"pretrain {settings.objective}: {settings.backbone} {model.grid_size[0]}x{model.grid_size[1]} "
                  f"patches, {num_predict} predicted; tokens from {token_info['encoder']['name']} "
                  f"(k = {token_info['k']}{'' if token_info['encoder']['clip'] else ', not CLIP'}); data manifest "
                  f"{token_info['manifest_sha256'][:12]}; {world} rank(s) x {workers} reader(s), "
                  f"{steps_per_epoch} steps/epoch, {'resuming at step ' + str(step) if step else 'starting at step 0'}")

        dataset = ShardDataset(data, settings.split, pretrain_transform(image_size, settings.color_jitter),
                               shuffle=True, seed=settings.seed, rank=rank, world_size=world)
        bar = tqdm(total=total_steps, initial=step, desc=f"pretrain {settings.objective}", unit="step",
                   disable=not progress or rank != 0)
        started, images_seen = time.perf_counter(), 0
        while step < total_steps:
            epoch, done_in_epoch = divmod(step, steps_per_epoch)
            dataset.set_epoch(epoch)
            loader = DataLoader(dataset, batch_size=settings.micro_batch_size, num_workers=settings.workers)
            micro_batches = islice(iter(loader), done_in_epoch * accum, steps_per_epoch * accum)
            for step_in_epoch in range(done_in_epoch, steps_per_epoch):
                totals = torch.zeros(3, device=device)                              # loss sum, correct, predicted
                for micro in range(accum):
                    images, _, keys = next(micro_batches)
                    seed = micro_batch_seed(settings.seed, step, micro, accum, world, rank)
                    generator = torch.Generator().manual_seed(seed)
                    order = sample_orders(settings.objective, len(keys), model.grid_size, num_predict, generator,
                                          min_block=settings.mim_min_block)
                    targets = torch.from_numpy(tokens[[row_of[k] for k in keys]].astype(np.int64))
                    targets = targets.gather(1, order[:, model.num_patches - num_predict:])
                    torch.manual_seed(seed + 1)                                     # dropout and drop path
                    images, order, targets = images.to(device), order.to(device), targets.to(device)
                    logits = engine(images.to(torch.bfloat16) if bf16 else images, order, num_predict)
                    loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
                    engine.backward(loss)
                    engine.step()
                    totals += torch.stack([loss.detach().float() * targets.numel(),
                                           (logits.argmax(-1) == targets).sum().float(),
                                           torch.tensor(float(targets.numel()), device=device)])
                dist.all_reduce(totals)
                step += 1
                images_seen += settings.batch_size
                record = {"step": step, "epoch": epoch, "loss": round(totals[0].item() / totals[2].item(), 5),
                          "token_accuracy": round(totals[1].item() / totals[2].item(), 5),
                          "lr": scheduler.get_last_lr()[0]}
                history.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                                img_s=f"{images_seen / (time.perf_counter() - started):.0f}")
                if step % settings.checkpoint_every == 0 or step == total_steps:
                    checkpoint(engine, checkpoints, step, history, rank, settings.keep_checkpoints)
        bar.close()

        metrics = {"objective": settings.objective, "steps": step, "loss": history[-1]["loss"],
                   "token_accuracy": history[-1]["token_accuracy"],
                   "images_per_s": round(images_seen / max(time.perf_counter() - started, 1e-9), 1)}
        if rank == 0:
            provenance = {"tokens": {k: token_info[k] for k in ("encoder", "k", "manifest_sha256", "codebook_sha256")}}
            save_pretrain_model(engine.module, out / "model.safetensors", provenance)
            save_backbone(engine.module, out / "backbone.safetensors")
            write_json(out / "metrics.json", metrics)
            write_json(out / "history.json", history)
        return metrics
    finally:
        teardown()


def settings_from_params(pretrain: dict, model: dict) -> PretrainSettings:
    model_kwargs = {k: v for k, v in model.items() if k != "backbone"}
    for required in ("img_size", "patch_size"):
        if required not in model_kwargs:
            raise MapetError(f"params: model.{required} is required")
    result = build_settings("pretrain", pretrain, PretrainSettings, ignore=("out_dir",))
    result.backbone, result.model_kwargs = model.get("backbone", result.backbone), model_kwargs
    return result
