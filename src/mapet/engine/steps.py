"""The step loop of both training loops and its plan: which shards a loop reads, how many
optimizer steps an epoch holds for its readers, the per-micro-batch seeds, the loop itself with
its history, progress bar and periodic checkpoints, and a loop's settings from params.yaml."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from itertools import islice
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from mapet.engine.deepspeed_engine import checkpoint
from mapet.errors import MapetError
from mapet.params import build_settings, check_model


def readers_plan(manifest, split: str, readers: int, micro: int) -> int:
    """Full micro-batches the poorest reader can supply in an epoch."""
    rows = manifest[manifest["split"] == split]
    shards = sorted(rows["shard"].unique())
    if len(shards) < readers:
        raise MapetError(f"split {split!r} has {len(shards)} shards for {readers} readers (ranks x DataLoader "
                         f"workers): lower pretrain.workers or re-import with a smaller data.shard_size")
    sizes = rows.groupby("shard").size()
    return int(min(sum(sizes[s] for s in shards[r::readers]) // micro for r in range(readers)))


def select_shards(manifest, split: str, max_shards: int) -> tuple:
    """(the manifest's rows of the first ``max_shards`` shards of ``split``, those shard names);
    ``max_shards`` 0 keeps them all."""
    shards = sorted(manifest.loc[manifest["split"] == split, "shard"].unique())
    shards = shards[:max_shards] if max_shards else shards
    return manifest[manifest["shard"].isin(shards)], shards


def plan_steps(manifest, settings, world: int) -> tuple[int, int]:
    """(optimizer steps per epoch, gradient accumulation) for a loop's global ``batch_size`` of
    ``micro_batch_size`` per rank, every (rank, DataLoader worker) reader supplying the same
    number of full batches."""
    batch, micro, workers = settings.batch_size, settings.micro_batch_size, max(1, settings.workers)
    accum, remainder = divmod(batch, micro * world)
    if remainder or accum < 1:
        raise MapetError(f"batch_size {batch} is not a multiple of micro_batch_size {micro} x {world} ranks")
    steps = readers_plan(manifest, settings.split, world * workers, micro) * workers // accum
    while steps * accum % workers:
        steps -= 1
    if steps < 1:
        raise MapetError(f"split {settings.split!r} is too small for a global batch of {batch}")
    return steps, accum


def compiled_graphs() -> int:
    """Graphs torch.compile has made in this process so far (a count that grows on recompilation)."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"]


def micro_batch_seed(seed: int, step: int, micro: int, accum: int, world: int, rank: int) -> int:
    """The same for a micro-batch whichever (rank, micro-batch) reads it: see mapet.engine.pretrain."""
    return seed * 1_000_003 + (step * accum + micro) * world + rank


def train_steps(engine, dataset, settings, *, world: int, rank: int, accum: int, steps_per_epoch: int, step: int,
                history: list[dict], checkpoints: Path, micro_step: Callable[[tuple, int], torch.Tensor],
                record_of: Callable[[torch.Tensor], dict], desc: str, progress: bool = True,
                after_step: Callable[[int], dict] = lambda step: {}, collate: Callable | None = None) -> dict:
    """Optimizer steps from ``step`` to the end of the last epoch; returns images/s after the first
    step (which includes compilation), not counting the time in ``after_step``, and the graphs
    torch.compile made after it (0 unless it recompiled). ``collate``: the DataLoader's (None: its
    default).

    ``micro_step(batch, seed)`` runs forward, backward and ``engine.step()`` on one micro-batch
    and returns a tensor of sums; they are added over the step's micro-batches and all ranks,
    and ``record_of(sums)`` turns them into the step's entry of ``history``, with what
    ``after_step(step)`` adds (every rank calls it: it may be collective). A resumed run skips
    the micro-batches the interrupted one had consumed in its epoch.
    """
    total_steps = settings.epochs * steps_per_epoch
    bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", disable=not progress or rank != 0)
    first_step, started, images, graphs = step + 1, time.perf_counter(), 0, 0
    while step < total_steps:
        epoch, done_in_epoch = divmod(step, steps_per_epoch)
        dataset.set_epoch(epoch)
        loader = DataLoader(dataset, batch_size=settings.micro_batch_size, num_workers=settings.workers,
                            pin_memory=engine.device.type == "cuda", collate_fn=collate)
        micro_batches = islice(iter(loader), done_in_epoch * accum, steps_per_epoch * accum)
        for _ in range(done_in_epoch, steps_per_epoch):
            sums = sum(micro_step(next(micro_batches), micro_batch_seed(settings.seed, step, micro, accum, world, rank))
                       for micro in range(accum))
            dist.all_reduce(sums)
            step += 1
            if step == first_step:          # the rate leaves out the first step, which compiles and warms up
                started, graphs = time.perf_counter(), compiled_graphs()
            else:
                images += settings.batch_size
            record = {"step": step, "epoch": epoch, **record_of(sums), "lr": max(engine.lr_scheduler.get_last_lr())}
            if not math.isfinite(record["loss"]):
                raise MapetError(f"{desc}: the loss is {record['loss']} at step {step}; the run stops here (its "
                                 f"checkpoints in {checkpoints} come from before it). Lower the learning rate or "
                                 f"the gradient clipping threshold, then resume with --resume")
            monitor_started = time.perf_counter()
            record.update(after_step(step))
            if step > first_step:
                started += time.perf_counter() - monitor_started
            history.append(record)
            bar.update(1)
            bar.set_postfix(loss=f"{record['loss']:.3f}", lr=f"{record['lr']:.2e}",
                            img_s=f"{images / max(time.perf_counter() - started, 1e-9):.0f}")
            if step % settings.checkpoint_every == 0 or step == total_steps:
                checkpoint(engine, checkpoints, step, history, rank, settings.keep_checkpoints)
    bar.close()
    recompiled = compiled_graphs() - graphs if step >= first_step else 0
    if recompiled and rank == 0:
        print(f"warning: {desc}: torch.compile made {recompiled} more graph(s) after the first step (recompilation); "
              f"run with TORCH_LOGS=recompiles to see why")
    return {"images_per_s": round(images / max(time.perf_counter() - started, 1e-9), 1), "recompilations": recompiled}


def loop_settings(section: str, values: dict, model: dict, cls: type, model_keys_owned: tuple[str, ...] = ()):
    """A loop's settings dataclass from params.yaml's ``section`` plus the ViT of ``model``
    (``backbone`` and the timm arguments, less the keys the section sets itself)."""
    model_kwargs = {k: v for k, v in model.items() if k != "backbone" and k not in model_keys_owned}
    check_model(model)
    result = build_settings(section, values, cls, ignore=("out_dir",))
    if result.compile not in ("auto", True, False):
        raise MapetError(f"params: {section}.compile must be auto, true or false, got {result.compile!r}")
    result.backbone, result.model_kwargs = model.get("backbone", result.backbone), model_kwargs
    return result
