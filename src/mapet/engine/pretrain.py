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

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from mapet.data.dataset import read_manifest
from mapet.data.reader import ShardDataset, collate_encoded
from mapet.data.transforms import decode_center_square, normalize_batch, pretrain_transform
from mapet.engine.deepspeed_engine import fp32_state_dict, make_engine, resume_state
from mapet.engine.steps import plan_steps, select_shards, train_steps
from mapet.engine.distributed import init_distributed, teardown
from mapet.engine.optim import parameter_groups
from mapet.engine.probe import ProbeSettings, knn_monitor
from mapet.files import write_json
from mapet.masking import default_num_predict, sample_orders
from mapet.models import create_pretrain_model, init_pretrain_model, save_backbone, save_pretrain_model
from mapet.tokenizers.tokens import load_tokens

@dataclass
class PretrainSettings:
    """params.yaml ``pretrain`` (plus the ViT from ``model``)."""

    backbone: str = "vit_tiny_patch16_224"
    model_kwargs: dict = field(default_factory=dict)   # img_size, patch_size, depth, embed_dim, num_heads, ...
    objective: str = "mapet"
    init: str | None = None          # a pre-training model file to start from (e.g. the paper's, imported)
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
    compile: bool | str = "auto"     # torch.compile; auto: on GPUs only
    color_jitter: float = 0.0
    decode: str = "cpu"              # cpu: the loader workers decode; gpu: they read, nvJPEG decodes (JPEG only)
    seed: int = 42
    workers: int = 1
    split: str = "train"
    max_shards: int = 0              # the first N shards of the split only; 0: all
    collective_timeout_s: float = 600  # a collective waiting this long for a lost peer fails the run
    checkpoint_every: int = 100      # optimizer steps
    keep_checkpoints: int = 2
    probe_every: float = 0           # epochs between k-NN probes of the backbone; 0: off
    probe_train_images: int = 2000   # the probe's memory bank: the first N images of probe.train_split
    probe_test_images: int = 1000


def run_pretrain(settings: PretrainSettings, data: Path, tokens_dir: Path, out: Path, resume: bool = False,
                 progress: bool = True, probe: ProbeSettings | None = None) -> dict[str, Any]:
    """``probe``: the k-NN settings of the monitor (``settings.probe_every``); its subset sizes
    come from ``settings``."""
    data, tokens_dir, out = Path(data), Path(tokens_dir), Path(out)
    image_size, patch = settings.model_kwargs["img_size"], settings.model_kwargs["patch_size"]
    grid = (image_size // patch, image_size // patch)
    tokens, token_info = load_tokens(tokens_dir, data, expected_grid=grid)      # refuse before any set-up
    manifest = read_manifest(data)
    row_of = {key: row for row, key in enumerate(manifest["key"])}
    manifest, shards = select_shards(manifest, settings.split, settings.max_shards)

    rank, world, device = init_distributed(settings.collective_timeout_s)
    try:
        steps_per_epoch, accum = plan_steps(manifest, settings, world)
        torch.manual_seed(settings.seed)
        model = create_pretrain_model(settings.objective, settings.backbone, token_info["k"], **settings.model_kwargs)
        if settings.init:
            init_pretrain_model(model, settings.init)
        num_predict = settings.num_predict or default_num_predict(settings.objective, model.num_patches)
        groups = parameter_groups(model, settings.weight_decay, settings.lr)
        engine, input_dtype = make_engine(settings, model, groups, steps_per_epoch, accum, device)

        checkpoints = out / "checkpoints"
        state = resume_state(engine, checkpoints) if resume else None
        step, history = (state["global_step"], state["history"]) if state else (0, [])
        if rank == 0:
            print(f"pretrain {settings.objective}: {settings.backbone} {model.grid_size[0]}x{model.grid_size[1]} "
                  f"patches, {num_predict} predicted; tokens from {token_info['encoder']['name']} "
                  f"(k = {token_info['k']}{'' if token_info['encoder']['clip'] else ', not CLIP'}); data manifest "
                  f"{token_info['manifest_sha256'][:12]}; {world} rank(s) x {max(1, settings.workers)} reader(s), "
                  f"{steps_per_epoch} steps/epoch, {'resuming at step ' + str(step) if step else 'starting at step 0'}"
                  f"{' from ' + str(settings.init) if settings.init and not step else ''}")

        on_gpu = settings.decode == "gpu"
        dataset = ShardDataset(data, settings.split, pretrain_transform(image_size, settings.color_jitter, normalize=False),
                               shuffle=True, seed=settings.seed, rank=rank, world_size=world, shards=shards,
                               decode=not on_gpu)
        if on_gpu:
            dataset.require_jpeg()

        def micro_step(batch: tuple, seed: int) -> torch.Tensor:
            images, _, keys = batch
            order = sample_orders(settings.objective, len(keys), model.grid_size, num_predict,
                                  torch.Generator().manual_seed(seed), min_block=settings.mim_min_block)
            targets = torch.from_numpy(tokens[[row_of[k] for k in keys]].astype(np.int64))
            targets = targets.gather(1, order[:, model.num_patches - num_predict:]).to(device)
            if on_gpu:
                images = decode_center_square(images, image_size, device, settings.color_jitter,
                                              torch.Generator().manual_seed(seed + 2))
            torch.manual_seed(seed + 1)                                             # dropout and drop path
            images = normalize_batch(images.to(device, non_blocking=True), input_dtype)
            logits = engine(images, order.to(device), num_predict)
            loss = F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
            engine.backward(loss)
            engine.step()
            count = torch.tensor(float(targets.numel()), device=device)
            return torch.stack([loss.detach().float() * count, (logits.argmax(-1) == targets).sum().float(), count])

        def record_of(sums: torch.Tensor) -> dict:
            return {"loss": round((sums[0] / sums[2]).item(), 5), "token_accuracy": round((sums[1] / sums[2]).item(), 5)}

        monitor = replace(probe or ProbeSettings(), train_images=settings.probe_train_images,
                          test_images=settings.probe_test_images)
        probe_steps = max(1, round(settings.probe_every * steps_per_epoch)) if settings.probe_every else 0

        def after_step(step: int) -> dict:
            """The k-NN monitor: computed on rank 0 while the others wait, then shared; null between
            probes, so that every record has the same fields (DVC's plots need that)."""
            if not probe_steps or (step % probe_steps and step != settings.epochs * steps_per_epoch):
                return {"knn_top1": None}
            value = torch.zeros((), device=device)
            if rank == 0:
                value += knn_monitor(engine.module.backbone, data, monitor)
            dist.broadcast(value, 0)
            return {"knn_top1": round(value.item(), 5)}

        speed = train_steps(engine, dataset, settings, world=world, rank=rank, accum=accum,
                                   steps_per_epoch=steps_per_epoch, step=step, history=history,
                                   checkpoints=checkpoints, micro_step=micro_step, record_of=record_of,
                                   desc=f"pretrain {settings.objective}", progress=progress, after_step=after_step,
                                   collate=collate_encoded if on_gpu else None)
        metrics = {"objective": settings.objective, "steps": len(history), "loss": history[-1]["loss"],
                   "token_accuracy": history[-1]["token_accuracy"], **speed}
        if history[-1].get("knn_top1") is not None:
            metrics["knn_top1"] = history[-1]["knn_top1"]
        weights = fp32_state_dict(engine)                                   # collective: every rank gathers
        if rank == 0:
            provenance = {"tokens": {k: token_info[k] for k in ("encoder", "k", "manifest_sha256", "codebook_sha256")}}
            save_pretrain_model(engine.module, out / "model.safetensors", provenance, weights)
            save_backbone(engine.module, out / "backbone.safetensors", weights)
            write_json(out / "metrics.json", metrics)
            write_json(out / "history.json", history)
        return metrics
    except BaseException:
        teardown(finished=False)
        raise
    finally:
        teardown()

