"""An ImageNet-like dataset in this project's format, for data-loading and pre-training benchmarks.

    python benchmarks/imagenet_like.py --out DIR [--images 2560] [--classes 10] [--test 0]
        [--shard-size 128] [--k 8192] [--grid 14] [--workers CORES]

DIR/data: JPEGs of ImageNet's sizes and weight (mostly 500x375 and its relatives, quality 90,
about 110 KB: smooth colour fields plus texture and noise, so decoding costs what a photo's
does), written as an ImageNet folder and imported by the code of `mapet data import --format
imagefolder`. DIR/tokens: random token ids that `mapet pretrain --data DIR/data --tokens
DIR/tokens` accepts; tokens.json says they are random (benchmark only: there is nothing to learn).
"""

from __future__ import annotations

import argparse
import io
import json
import multiprocessing
import os
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from mapet.data.dataset import MANIFEST, import_dataset, read_manifest
from mapet.data.sources import image_folder
from mapet.errors import MapetError
from mapet.files import file_sha256
from mapet.tokenizers.tokens import DESCRIPTION, TOKENS

ASPECTS = (4 / 3, 3 / 2, 1.0, 3 / 4, 2 / 3)       # width / height, ImageNet's usual shapes
ASPECT_SHARES = (0.45, 0.2, 0.1, 0.15, 0.1)
RANDOM_ENCODER = {"name": "random (benchmark only)", "clip": False,
                  "note": "uniformly random token ids from benchmarks/imagenet_like.py; not a tokenizer"}


def jpeg(seed: int, index: int, quality: int = 90) -> bytes:
    """One photo-like JPEG: long side 500 (four in five) or 300-800 px, ImageNet's aspect ratios."""
    rng = np.random.default_rng((seed, index))
    long_side = 500 if rng.random() < 0.8 else int(rng.integers(300, 801))
    aspect = rng.choice(ASPECTS, p=ASPECT_SHARES)
    width, height = (long_side, round(long_side / aspect)) if aspect >= 1 else (round(long_side * aspect), long_side)
    colours = Image.fromarray(rng.integers(0, 256, (4, 5, 3), dtype=np.uint8)).resize((width, height), Image.BICUBIC)
    texture = Image.fromarray(rng.integers(0, 256, (height // 4, width // 4, 3), dtype=np.uint8))
    pixels = np.asarray(colours, np.float32) + (np.asarray(texture.resize((width, height), Image.BICUBIC),
                                                           np.float32) - 128) * (50 / 128)
    pixels += rng.normal(0, 16, (height, width, 1)).astype(np.float32)    # luma noise survives chroma subsampling
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


def _write_jpeg(task: tuple[Path, int, int]) -> None:
    path, seed, index = task
    path.write_bytes(jpeg(seed, index))


def write_random_tokens(tokens_dir: Path, data: Path, k: int = 8192, grid: int = 14, seed: int = 0) -> dict:
    """tokens.npy (uniform ids in [0, k), one row per manifest row) and tokens.json, as `mapet
    tokenize` lays them out; returns the description."""
    if not 1 <= k <= 1 << 16:
        raise MapetError(f"k must be between 1 and 65536 (token ids are uint16), got {k}")
    tokens_dir.mkdir(parents=True, exist_ok=True)
    rows = len(read_manifest(data))
    np.save(tokens_dir / TOKENS, np.random.default_rng(seed).integers(0, k, (rows, grid * grid), dtype=np.uint16))
    description = {"encoder": RANDOM_ENCODER, "k": k, "grid": [grid, grid], "rows": rows,
                   "manifest_sha256": file_sha256(data / MANIFEST), "codebook_sha256": None}
    (tokens_dir / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
    return description


def make_imagenet_like(out: Path, images: int = 2560, classes: int = 10, test: int = 0, shard_size: int = 128,
                       k: int = 8192, grid: int = 14, workers: int | None = None, seed: int = 0) -> tuple[Path, Path]:
    """Write OUT/data and OUT/tokens; returns both paths. Image i of a split has class i mod ``classes``."""
    out = Path(out)
    workers = workers or os.cpu_count() or 1
    source = out / ".imagenet-like-source"
    shutil.rmtree(source, ignore_errors=True)
    tasks = []
    for split, count in (("train", images), ("test", test)):
        for index in range(count):
            folder = source / split / f"n{index % classes:08d}"
            folder.mkdir(parents=True, exist_ok=True)
            tasks.append((folder / f"{split}_{index:07d}.JPEG", seed + (split == "test"), index))
    try:
        with multiprocessing.Pool(workers) as pool:
            pool.map(_write_jpeg, tasks, chunksize=16)
        import_dataset(image_folder(source, {}), out / "data", "imagefolder", shard_size, workers=workers,
                       progress=False)
    finally:
        shutil.rmtree(source, ignore_errors=True)
    write_random_tokens(out / "tokens", out / "data", k, grid, seed)
    return out / "data", out / "tokens"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--images", type=int, default=2560, help="training images (default: %(default)s)")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--test", type=int, default=0, help="test images (default: none)")
    parser.add_argument("--shard-size", type=int, default=128)
    parser.add_argument("--k", type=int, default=8192, help="token vocabulary (default: %(default)s)")
    parser.add_argument("--grid", type=int, default=14, help="tokens per side: img_size / patch_size (default: %(default)s)")
    parser.add_argument("--workers", type=int, help="processes (default: all cores)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    data, tokens = make_imagenet_like(args.out, args.images, args.classes, args.test, args.shard_size, args.k,
                                      args.grid, args.workers, args.seed)
    manifest = read_manifest(data)
    print(f"wrote {data}: {len(manifest)} JPEGs ({manifest['bytes'].mean() / 1000:.0f} KB, "
          f"{manifest['width'].mean():.0f}x{manifest['height'].mean():.0f} px on average) in "
          f"{manifest['shard'].nunique()} shards; {tokens}: random tokens, k = {args.k}, {args.grid}x{args.grid}")


if __name__ == "__main__":
    main()
