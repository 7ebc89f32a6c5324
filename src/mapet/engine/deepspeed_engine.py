"""The DeepSpeed engine of both training loops: its configuration, AdamW and the schedule, optional
torch.compile, the fp32 master weights that exported models are written from, and the
checkpoints every rank writes and resumes from."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from mapet.engine.optim import clip_by_global_norm, warmup_cosine
from mapet.errors import MapetError
from mapet.files import write_text

LATEST = "latest"


def deepspeed_config(micro: int, accum: int, grad_clip: float, zero_stage: int, bf16: bool) -> dict[str, Any]:
    """DeepSpeed's configuration of a loop.

    ZeRO 1 and 2: DeepSpeed's ZeRO optimizer keeps bf16 weights with fp32 masters and clips; bf16
    has fp32's range, so no loss scale and no check of every gradient for inf/NaN before each step
    (about 2,000 kernel launches and a host sync per step at ViT-B); a non-finite loss stops the run
    instead (:func:`train_steps`).

    ZeRO 0: DeepSpeed's data parallelism without ZeRO; the weights stay fp32, bf16 is torch's
    autocast in the forward, and :func:`make_engine` clips and steps over all gradients at once, so
    the work outside the model no longer grows with the number of parameter tensors (DeepSpeed's
    ZeRO optimizer, its bf16 optimizer and its clipping all touch every gradient one by one). The
    gradients are all-reduced in fp32: autocast's default would send those of Linear and Conv layers
    in bf16.
    """
    config: dict[str, Any] = {"train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": accum,
                              "zero_optimization": {"stage": zero_stage}, "steps_per_print": 10**12}
    if zero_stage == 0:          # DeepSpeed's own clipping (its default: 1.0) goes one gradient at a time
        config["gradient_clipping"] = 0.0
        config["torch_autocast"] = {"enabled": bf16, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    else:
        config["gradient_clipping"] = grad_clip
        config["bf16"] = {"enabled": bf16, "check_grad_overflow": False}
    return config


def make_engine(settings, model: torch.nn.Module, groups: list[dict], steps_per_epoch: int, accum: int,
                device: torch.device):
    """(DeepSpeed engine, the dtype of its inputs) with AdamW over ``groups`` and the per-step warm-up
    + cosine; the inputs are bf16 where DeepSpeed keeps bf16 weights (bf16 with ZeRO 1 or 2). Without
    ZeRO, AdamW is torch's fused one (one kernel per group), the gradients are clipped by their
    global norm just before it steps, and a single process skips DeepSpeed's all-reduce (a copy per
    gradient, for nothing to reduce)."""
    import deepspeed

    without_zero = settings.zero_stage == 0
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, betas=tuple(settings.betas), fused=without_zero)
    if without_zero and settings.grad_clip > 0:      # deepspeed_config leaves clipping to us
        parameters = [p for group in groups for p in group["params"]]
        optimizer.register_step_pre_hook(lambda *_: clip_by_global_norm(parameters, settings.grad_clip))
    scheduler = warmup_cosine(optimizer, settings.lr, round(settings.warmup_epochs * steps_per_epoch),
                              settings.epochs * steps_per_epoch, settings.warmup_lr, settings.min_lr)
    bf16 = device.type == "cuda" if settings.bf16 is None else settings.bf16
    config = deepspeed_config(settings.micro_batch_size, accum, settings.grad_clip, settings.zero_stage, bf16)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler, config=config)
    if without_zero and dist.get_world_size() == 1:
        engine.enable_backward_allreduce = False
    if use_compile(settings.compile, device):
        engine.compile(backend="inductor")      # compiles the module in place: its weight names stay as they are
    return engine, torch.bfloat16 if bf16 and not without_zero else torch.float32


def fp32_state_dict(engine) -> dict[str, torch.Tensor]:
    """The module's state dict on the CPU in float32, every parameter replaced by its fp32 master
    weight where the optimizer keeps one (bf16, ZeRO 1 and 2), so that exported weights keep full
    precision. Collective: every rank must call it.

    DeepSpeed's ``safe_get_full_fp32_param`` all-reduces each parameter's fragments from the
    ranks' optimizer partitions; it gives None where the module holds the master itself (fp32
    without ZeRO) and for parameters the optimizer does not train.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    state = engine.module.state_dict()
    for name, param in engine.module.named_parameters(remove_duplicate=False):
        master = safe_get_full_fp32_param(param)
        if master is not None:
            state[name] = master
    return {name: tensor.detach().cpu().float() if tensor.is_floating_point() else tensor.detach().cpu()
            for name, tensor in state.items()}


def use_compile(setting: bool | str, device: torch.device) -> bool:
    """A loop's ``compile`` setting: ``auto`` compiles on GPUs only."""
    return device.type == "cuda" if setting == "auto" else setting


def checkpoint(engine, folder: Path, step: int, history: list, rank: int, keep: int) -> None:
    """Every rank writes its part; only then does rank 0 point ``latest`` at it."""
    tag = f"step{step:08d}"
    engine.save_checkpoint(str(folder), tag=tag, client_state={"global_step": step, "history": history},
                           save_latest=False)
    dist.barrier()
    if rank == 0:
        write_text(folder / LATEST, tag)
        for old in sorted(p for p in folder.glob("step*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()


def resume_state(engine, folder: Path) -> dict[str, Any] | None:
    """The client state of the newest checkpoint every rank can load, loaded into ``engine``;
    None without checkpoints. A damaged or incomplete newest checkpoint (a part missing, a file
    cut short) is skipped with a warning for the one before it; when none loads, the error names
    the folder. Every rank must call it: the ranks agree on the checkpoint."""
    if not (folder / LATEST).is_file():
        return None
    latest = (folder / LATEST).read_text().strip()
    tags = sorted((path.name for path in folder.glob("step*") if path.is_dir() and path.name <= latest), reverse=True)
    rank = dist.get_rank()
    if latest not in tags and rank == 0:
        print(f"warning: {folder / latest}: the checkpoint that {folder / LATEST} names is missing", file=sys.stderr)
    for tag in tags:
        try:
            _, state = engine.load_checkpoint(str(folder), tag=tag)
            problem = None if state and "global_step" in state else "no training state in it"
        except Exception as error:      # DeepSpeed and torch.load raise many kinds for a damaged file
            problem = str(error).splitlines()[0][:300] if str(error) else type(error).__name__
        loaded = torch.tensor(0.0 if problem else 1.0, device=engine.device)
        dist.all_reduce(loaded, op=dist.ReduceOp.MIN)
        if loaded.item() == 1:
            if tag != latest and rank == 0:
                print(f"warning: resuming from {folder / tag}, the newest checkpoint that loads", file=sys.stderr)
            return state
        if rank == 0:
            print(f"warning: {folder / tag}: cannot resume from it ({problem or 'another rank could not load its part'})",
                  file=sys.stderr)
    raise MapetError(f"{folder}: no checkpoint could be loaded (tried {', '.join(tags) or 'none'}); move the folder "
                     f"away to start from scratch")
