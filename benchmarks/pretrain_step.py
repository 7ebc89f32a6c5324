"""Seconds per training step (forward, cross-entropy, backward) of MaPeT, PLM and MIM against a
plain timm ViT forward+backward on the same backbone and batch, with the FLOP ratios.

    python benchmarks/pretrain_step.py                  # CPU: ViT-T/16 at 224, batch 16, fp32
    python benchmarks/pretrain_step.py --device cuda    # GPU: ViT-B/16 at 224, batch 128, bf16
    python benchmarks/pretrain_step.py --device cuda --compile   # eager and torch.compile side by side
    python benchmarks/pretrain_step.py --device cuda --compile --compile-mode max-autotune --sdpa cudnn --models mapet

Prints one JSON line. Steps of all models are interleaved and the median is reported, so that a
noisy machine slows all of them alike; the ratios are what to compare across machines. With
--compile every model also runs compiled (``vit+compile``, ...; the module compiled in place, as
``pretrain.compile`` does, the loss outside it as in the training loop). ``token_head`` is the
8192-way head and its cross-entropy alone, on the MaPeT step's B x 147 rows, to show its share;
``token_head_chunked`` is the same loss computed a few thousand rows at a time, with the
gradients taken in the forward pass, so that no (rows x 8192) fp32 logits or gradients are ever
held whole (the fused linear cross-entropy of Liger and others), to see whether that wins.
``--compile-mode`` and ``--sdpa`` look for the compiled step's ceiling: torch.compile's mode
(``max-autotune`` tunes the matrix products and, like ``reduce-overhead``, replays the step as CUDA
graphs; ``max-autotune-no-cudagraphs`` tunes without them) and the attention kernel that every
step runs (flash, efficient, cudnn, math; default: PyTorch's choice).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import time
from functools import partial

import timm
import torch
import torch.nn.functional as F
from machine import describe_cpu
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from mapet.masking import default_num_predict, sample_orders
from mapet.models import create_pretrain_model

VOCAB = 8192
MODELS = ("vit", "mapet", "plm", "mim", "token_head", "token_head_chunked")
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # dense tensor-core peaks


class ChunkedTokenLoss(torch.autograd.Function):
    """Summed cross-entropy of ``features @ weight.T + bias`` against ``targets``, ``chunk`` rows
    at a time: each chunk's logits live only while its gradients are taken."""

    @staticmethod
    def forward(ctx, features, weight, bias, targets, chunk: int):
        device = features.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else features.dtype
        features_, weight_, bias_ = features.to(dtype), weight.to(dtype), bias.to(dtype)
        grad_features = torch.empty_like(features_)
        grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        loss = torch.zeros((), dtype=torch.float32, device=features.device)
        with torch.autocast(device, enabled=False):
            for start in range(0, len(features_), chunk):
                rows, wanted = features_[start:start + chunk], targets[start:start + chunk]
                logits = F.linear(rows, weight_, bias_).float()
                log_norm = logits.logsumexp(-1)
                loss += (log_norm - logits.gather(1, wanted[:, None])[:, 0]).sum()
                grad = logits.sub_(log_norm[:, None]).exp_()                              # softmax
                grad[torch.arange(len(wanted), device=grad.device), wanted] -= 1
                grad_bias += grad.sum(0)
                grad = grad.to(dtype)
                grad_features[start:start + chunk] = grad @ weight_
                grad_weight += (grad.t() @ rows).float()
        ctx.save_for_backward(grad_features, grad_weight.to(weight.dtype), grad_bias.to(bias.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_features, grad_weight, grad_bias = ctx.saved_tensors
        return grad_features * grad_loss, grad_weight * grad_loss, grad_bias * grad_loss, None, None


SDPA_BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--backbone", help="timm model (default: ViT-T/16 on CPU, ViT-B/16 on CUDA)")
    parser.add_argument("--batch", type=int, help="batch size (default: 16 on CPU, 128 on CUDA)")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, help="bf16 autocast (default: on CUDA only)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per model (compilation included)")
    parser.add_argument("--compile", action="store_true", help="also time each model under torch.compile")
    parser.add_argument("--compile-mode", default="default",
                        choices=["default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                        help="torch.compile's mode (with --compile)")
    parser.add_argument("--sdpa", choices=sorted(SDPA_BACKENDS), help="the attention kernel of every step "
                        "(default: PyTorch's choice)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help="comma-separated subset to time (default: %(default)s; vit is always timed)")
    args = parser.parse_args()
    unknown = set(args.models.split(",")) - set(MODELS)
    if unknown:
        parser.error(f"--models: unknown {', '.join(sorted(unknown))} (known: {', '.join(MODELS)})")
    cuda = args.device == "cuda"
    args.backbone = args.backbone or ("vit_base_patch16_224" if cuda else "vit_tiny_patch16_224")
    args.batch = args.batch or (128 if cuda else 16)
    args.bf16 = cuda if args.bf16 is None else args.bf16
    return args


def build_steps(args: argparse.Namespace, device: torch.device) -> dict:
    """name -> (model, a function computing one training step's loss on fixed inputs)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, 224, 224, generator=generator).to(device)
    models, losses = {}, {}

    models["vit"] = timm.create_model(args.backbone, num_classes=1000, init_values=0.1, drop_path_rate=0.1)
    labels = torch.randint(1000, (args.batch,), generator=generator).to(device)
    losses["vit"] = lambda model: F.cross_entropy(model(images), labels)

    for objective in ("mapet", "plm", "mim"):
        models[objective] = create_pretrain_model(objective, args.backbone, VOCAB)
        num_predict = default_num_predict(objective, models[objective].num_patches)
        order = sample_orders(objective, args.batch, models[objective].grid_size, num_predict, generator).to(device)
        targets = torch.randint(VOCAB, (args.batch * num_predict,), generator=generator).to(device)

        def loss(model, order=order, num_predict=num_predict, targets=targets):
            return F.cross_entropy(model(images, order, num_predict).flatten(0, 1).float(), targets)

        losses[objective] = loss

    rows = args.batch * default_num_predict("mapet", models["mapet"].num_patches)
    models["token_head"] = torch.nn.Linear(models["vit"].embed_dim, VOCAB)
    features = torch.randn(rows, models["vit"].embed_dim, generator=generator).to(device).requires_grad_()
    head_targets = torch.randint(VOCAB, (rows,), generator=generator).to(device)
    losses["token_head"] = lambda head: F.cross_entropy(head(features).float(), head_targets)
    models["token_head_chunked"] = torch.nn.Linear(models["vit"].embed_dim, VOCAB)
    losses["token_head_chunked"] = lambda head: ChunkedTokenLoss.apply(features, head.weight, head.bias, head_targets,
                                                                       4096) / rows

    steps = {}
    chosen = {"vit", *args.models.split(",")}
    for name, model in ((name, model) for name, model in models.items() if name in chosen):
        model.to(device).train()
        steps[name] = (model, partial(losses[name], model))
        if args.compile:
            compiled = torch.compile(model, mode=args.compile_mode)         # shares the eager model's weights
            steps[name + "+compile"] = (model, partial(losses[name], compiled))
    return steps


def run_step(model, loss_fn, autocast, attention=contextlib.nullcontext) -> None:
    model.zero_grad(set_to_none=True)
    with autocast(), attention():
        loss = loss_fn()
    loss.backward()


def main() -> None:
    args = parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    torch.manual_seed(0)
    autocast = ((lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16
                else contextlib.nullcontext)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    attention = partial(sdpa_kernel, SDPA_BACKENDS[args.sdpa]) if args.sdpa else contextlib.nullcontext
    steps = build_steps(args, device)

    flops = {}
    for name, (model, loss_fn) in steps.items():
        if name.endswith("+compile"):
            flops[name] = flops[name.removesuffix("+compile")]
            continue
        # The math backend spells attention out as matmuls, which the counter counts on every device.
        with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
            run_step(model, loss_fn, autocast)
        flops[name] = counter.get_total_flops()

    for _ in range(args.warmup):
        for model, loss_fn in steps.values():
            run_step(model, loss_fn, autocast, attention)
    times = {name: [] for name in steps}
    peak_memory = {}
    for _ in range(args.steps):
        for name, (model, loss_fn) in steps.items():
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            start = time.perf_counter()
            run_step(model, loss_fn, autocast, attention)
            sync()
            times[name].append(time.perf_counter() - start)
            if device.type == "cuda":
                peak_memory[name] = torch.cuda.max_memory_allocated() / 2**30

    seconds = {name: statistics.median(values) for name, values in times.items()}
    # each step over the ViT step of its own round (compiled over compiled): the median of pairs
    baseline = lambda name: times["vit+compile" if name.endswith("+compile") else "vit"]  # noqa: E731
    pair_ratios = {name: [mine / vit for mine, vit in zip(values, baseline(name))] for name, values in times.items()}
    result = {
        "device": torch.cuda.get_device_name() if device.type == "cuda" else describe_cpu(),
        "threads": torch.get_num_threads(),
        "backbone": args.backbone, "batch": args.batch, "dtype": "bf16" if args.bf16 else "fp32",
        "compile_mode": args.compile_mode if args.compile else None, "sdpa": args.sdpa or "auto",
        "steps": args.steps,
        "seconds_per_step": {name: round(value, 4) for name, value in seconds.items()},
        "images_per_s": {name: round(args.batch / value, 1) for name, value in seconds.items()},
        "ratio_to_vit": {name: round(statistics.median(pair_ratios[name]), 3) for name in steps},
        "ratio_to_vit_range": {name: [round(min(pair_ratios[name]), 3), round(max(pair_ratios[name]), 3)]
                               for name in steps},
        "compile_speedup": {name: round(seconds[name] / seconds[name + "+compile"], 3)
                            for name in seconds if name + "+compile" in seconds},
        "flop_ratio_to_vit": {name: round(value / flops["vit"], 3) for name, value in flops.items()},
        "gflops_per_step": {name: round(value / 1e9, 1) for name, value in flops.items()},
    }
    if device.type == "cuda":
        result["peak_memory_gib"] = {name: round(value, 2) for name, value in peak_memory.items()}
        peak = next((v for k, v in PEAK_BF16_FLOPS.items() if k in result["device"]), None)
        if peak and args.bf16:
            result["peak_tflops_used"] = peak / 1e12
            result["model_flop_utilisation"] = {name: round(flops[name] / seconds[name] / peak, 3) for name in steps}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
