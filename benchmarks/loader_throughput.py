"""Images per second of the pre-training input path at 224 px on ImageNet-like JPEG shards, with 1
DataLoader worker (one core) and with W, as one JSON line; with --target (the GPU's images/s)
also the loader cores one GPU needs.

    python benchmarks/loader_throughput.py [--data DIR | --images 2560] [--workers W] [--target 830]

The path is `mapet pretrain`'s: ShardDataset (tar read, PIL decode, RGB) with
pretrain_transform(224, color_jitter, normalize=False) (centre square resized bicubic, jitter, uint8
tensor; the training step normalises on the device),
through a DataLoader; `--transform finetune` takes the paper's fine-tuning transform instead
(RandomResizedCrop, flip, RandAugment, random erasing). Without --data, benchmarks/imagenet_like.py makes the shards in a
temporary folder. Rates are steady-state: timed from the moment every worker has delivered its
first batch. Also times the JPEG decode alone, PIL (what the reader does) and
torchvision.io.decode_jpeg, on one thread.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tempfile
import time
from pathlib import Path

import torch
from imagenet_like import make_imagenet_like
from machine import describe_cpu
from PIL import Image
from torch.utils.data import DataLoader
from torchvision.io import decode_jpeg

from mapet.data.reader import ShardDataset
from mapet.data.shards import read_shard
from mapet.data.transforms import finetune_transform, pretrain_transform


def loader_rate(data: Path, transform, workers: int, shards: list[str], batch_size: int) -> float:
    """Steady-state images/s of ``workers`` DataLoader workers reading ``shards``."""
    dataset = ShardDataset(data, "train", transform, shards=shards)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    images, start = 0, None
    for index, (batch, _, _) in enumerate(loader):
        assert batch.shape[1:] == (3, 224, 224)
        if index == workers - 1:
            start = time.perf_counter()
        elif start is not None:
            images += len(batch)
    if not images:
        raise SystemExit(f"too few images for {workers} worker(s) at batch {batch_size}: each needs two batches")
    return images / (time.perf_counter() - start)


def decode_ms(data: Path, shard: str, limit: int = 128) -> dict[str, float]:
    """Milliseconds per image to decode one shard's JPEGs on one thread: PIL + RGB, and torchvision."""
    blobs = [blob for _, _, blob, _ in read_shard(data / shard)][:limit]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        start = time.perf_counter()
        for blob in blobs:
            with Image.open(io.BytesIO(blob)) as image:
                image.convert("RGB")
        pil = time.perf_counter() - start
        tensors = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
        start = time.perf_counter()
        for tensor in tensors:
            decode_jpeg(tensor)
        torchvision = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    return {"pil_decode_ms": round(pil / len(blobs) * 1000, 2),
            "torchvision_decode_ms": round(torchvision / len(blobs) * 1000, 2)}


def measure(data: Path, transform, workers: int, batch_size: int, single_shards: int) -> dict:
    shards = ShardDataset(data, "train").shards
    balanced = shards[:len(shards) // workers * workers]        # the same number of shards per worker
    if not balanced:
        raise SystemExit(f"{data}: {len(shards)} shards for {workers} workers")
    single = loader_rate(data, transform, 1, shards[:single_shards], batch_size)
    many = loader_rate(data, transform, workers, balanced, batch_size)
    return {"one_worker_images_per_s": round(single, 1), "workers": workers,
            "images_per_s": round(many, 1), "per_worker_images_per_s": round(many / workers, 1),
            **decode_ms(data, shards[0])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, help="a dataset folder of JPEG shards (default: make one)")
    parser.add_argument("--images", type=int, default=2560, help="images to make without --data (default: %(default)s)")
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=os.cpu_count(), help="DataLoader workers (default: all cores)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--transform", choices=["pretrain", "finetune"], default="pretrain")
    parser.add_argument("--color-jitter", type=float, default=0.4, help="the paper preset's (default: %(default)s)")
    parser.add_argument("--single-shards", type=int, default=4, help="shards the one-worker run reads (default: %(default)s)")
    parser.add_argument("--target", type=float, help="images/s one GPU consumes (e.g. pretrain_step.py's)")
    args = parser.parse_args()
    if args.transform == "pretrain":
        transform = pretrain_transform(224, args.color_jitter, normalize=False)
        described = f"pretrain, 224 px, color_jitter {args.color_jitter}, uint8"
    else:
        transform, described = finetune_transform(224), "finetune (paper recipe), 224 px"
    with tempfile.TemporaryDirectory() as folder:
        data = args.data or make_imagenet_like(Path(folder), args.images, shard_size=args.shard_size,
                                               workers=args.workers)[0]
        result = {"machine": describe_cpu(), "transform": described, "batch_size": args.batch_size,
                  **measure(data, transform, args.workers, args.batch_size, args.single_shards)}
    result["pil_decode_share"] = round(result["pil_decode_ms"] * result["one_worker_images_per_s"] / 1000, 3)
    if args.target:
        result["target_images_per_s"] = args.target
        result["cores_per_gpu"] = math.ceil(args.target / result["per_worker_images_per_s"])
    print(json.dumps(result))
    if args.target:
        print(f"{args.target:g} images/s per GPU needs {result['cores_per_gpu']} loader cores per GPU at "
              f"{result['per_worker_images_per_s']} images/s per worker with {args.workers} workers busy "
              f"({math.ceil(args.target / result['one_worker_images_per_s'])} at the one-worker rate), "
              f"plus the training process's own core")


if __name__ == "__main__":
    main()
