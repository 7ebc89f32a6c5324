"""Host operators per optimizer step of the pre-training loop, inside the model and outside it:
what DeepSpeed's ``engine.backward`` and ``engine.step`` dispatch beyond the model's own forward
and backward (on a GPU each operator is one kernel launch or more; on the CPU their count is the
proxy the profiler can give).

    python benchmarks/step_ops.py                          # the paper preset's ViT-B/16, batch 2, ZeRO 1, fp32
    python benchmarks/step_ops.py --zero 0 --bf16          # other configurations (the paper preset's: ZeRO 0, bf16)
    python benchmarks/step_ops.py --backbone vit_tiny_patch16_224 --depth 12 --width 192 --heads 3

One process (gloo). The model runs the same micro-batches three ways: a plain forward and
backward (the model's own operators), then the DeepSpeed engine built as ``mapet pretrain``
builds it (``make_engine``: AdamW over the loop's parameter groups, gradient clipping 3.0; with
ZeRO 0 and bf16, the plain model runs under the autocast the engine applies). Prints one JSON
line: operators per step of each part, and the difference, the work outside the model; all aten
operators, and the outermost of them alone (``*_outermost``: the calls from Python, the count that
stands for kernel launches on a GPU).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from machine import describe_cpu
from torch.profiler import ProfilerActivity, profile

with contextlib.redirect_stdout(sys.stderr):
    from mapet.engine.deepspeed_engine import make_engine
    from mapet.engine.distributed import init_distributed, teardown
    from mapet.engine.optim import parameter_groups
    from mapet.masking import default_num_predict, sample_orders
    from mapet.models import create_pretrain_model

def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="vit_base_patch16_224")
    parser.add_argument("--depth", type=int, default=12)
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--heads", type=int, default=12)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--zero", type=int, default=1, choices=[0, 1, 2])
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--grad-clip", type=float, default=3.0)
    parser.add_argument("--steps", type=int, default=2, help="steps profiled, after one of warm-up")
    return parser.parse_args()


def aten_ops(run, steps: int) -> tuple[float, float]:
    """(aten operators, of them the outermost) per step that ``run()`` dispatches, counted by
    torch.profiler. The outermost are the calls from Python, each a kernel launch or more on a GPU;
    the rest run inside them (a view's as_strided, or a foreach operator's per-tensor loop, which
    only the CPU has: on a GPU a foreach operator is a few multi-tensor kernels)."""
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        run()
    operators = [event for event in profiled.events() if event.name.startswith("aten::")]
    outermost = [event for event in operators
                 if event.cpu_parent is None or not event.cpu_parent.name.startswith("aten::")]
    return len(operators) / steps, len(outermost) / steps


def main() -> None:
    args = parse_args()
    with contextlib.redirect_stdout(sys.stderr):
        _, _, device = init_distributed()
    try:
        torch.manual_seed(0)
        kwargs = {"img_size": 224, "patch_size": 16, "depth": args.depth, "embed_dim": args.width,
                  "num_heads": args.heads}
        model = create_pretrain_model("mapet", args.backbone, args.vocab, **kwargs)
        num_predict = default_num_predict("mapet", model.num_patches)
        autocast = args.bf16 and args.zero == 0         # without ZeRO, bf16 is autocast over fp32 weights
        dtype = torch.bfloat16 if args.bf16 and not autocast else torch.float32
        batches = []
        for seed in range(args.steps + 1):
            generator = torch.Generator().manual_seed(seed)
            order = sample_orders("mapet", args.batch, model.grid_size, num_predict, generator)
            batches.append((torch.randn(args.batch, 3, 224, 224, generator=generator).to(dtype), order,
                            torch.randint(args.vocab, (args.batch, num_predict), generator=generator)))

        def loss_of(network, batch, cast: bool = False) -> torch.Tensor:
            """``cast``: run ``network`` under bf16 autocast (the plain model; the engine applies its own)."""
            images, order, targets = batch
            with torch.autocast("cpu", torch.bfloat16, enabled=cast):
                logits = network(images, order, num_predict)
            return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())

        plain = model.to(dtype)
        loss_of(plain, batches[0], autocast).backward()                             # warm-up
        model_ops = aten_ops(lambda: [loss_of(plain, batch, autocast).backward() for batch in batches[1:]], args.steps)
        plain.zero_grad(set_to_none=True)

        settings = SimpleNamespace(lr=1.5e-3, betas=(0.9, 0.999), warmup_epochs=0, epochs=1, warmup_lr=1e-6,
                                   min_lr=1e-5, micro_batch_size=args.batch, grad_clip=args.grad_clip,
                                   zero_stage=args.zero, bf16=args.bf16, compile=False)
        with contextlib.redirect_stdout(sys.stderr):
            engine, _ = make_engine(settings, model, parameter_groups(model, 0.05, settings.lr), 100, 1, device)

        def micro_step(batch) -> None:
            engine.backward(loss_of(engine, batch))
            engine.step()

        micro_step(batches[0])                                                      # warm-up
        loop_ops = aten_ops(lambda: [micro_step(batch) for batch in batches[1:]], args.steps)
        step_ops = [0.0, 0.0]
        for batch in batches[1:]:
            engine.backward(loss_of(engine, batch))
            step_ops = [total + part for total, part in zip(step_ops, aten_ops(engine.step, args.steps))]
        print(json.dumps({"backbone": args.backbone, "depth": args.depth, "width": args.width, "batch": args.batch,
                          "zero_stage": args.zero, "bf16": args.bf16, "grad_clip": args.grad_clip,
                          "optimizer": type(engine.optimizer).__name__,
                          "engine_zero_stage": engine.zero_optimization_stage(),
                          "parameters": sum(1 for p in model.parameters() if p.requires_grad),
                          "model_ops": model_ops[0], "loop_ops": loop_ops[0],
                          "outside_model_ops": loop_ops[0] - model_ops[0], "engine_step_ops": step_ops[0],
                          "model_outermost": model_ops[1], "loop_outermost": loop_ops[1],
                          "outside_model_outermost": loop_ops[1] - model_ops[1], "engine_step_outermost": step_ops[1],
                          "machine": describe_cpu(), "torch": torch.__version__}))
    finally:
        teardown()


if __name__ == "__main__":
    main()
