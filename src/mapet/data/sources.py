"""Where images come from: Debian's Fashion-MNIST IDX files, or an ImageNet-style folder.

A source yields :class:`SourceImage` records in a fixed order, so that importing the same source
twice gives the same dataset byte for byte.
"""

from __future__ import annotations

import gzip
import io
import random
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mapet.errors import MapetError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FASHION_MNIST_SPLITS = {"train": "train", "test": "t10k"}
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass(frozen=True)
class SourceImage:
    split: str
    label: int
    path: str             # where it came from, relative to the source folder: "train/cat/000.png",
                          # or the IDX file and index: "train-images-idx3-ubyte.gz#12345"
    suffix: str           # file suffix it is stored under in the shard, e.g. "png"
    data: bytes
    problem: str = ""     # why it could not be read, when it could not


@dataclass(frozen=True)
class Source:
    root: Path                   # the source folder; image paths are relative to it
    classes: list[str]
    counts: dict[str, int]       # images per split that will be yielded
    images: Iterator[SourceImage]


def _read_idx(path: Path) -> np.ndarray:
    """An IDX array (the MNIST file format: magic, dimensions, then unsigned bytes)."""
    if not path.is_file():
        raise MapetError(f"{path}: Fashion-MNIST file not found (install Debian's dataset-fashion-mnist, "
                         "or pass --source DIR with the four IDX .gz files)")
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        shape = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, ValueError, struct.error, EOFError) as error:
        raise MapetError(f"{path}: not a readable IDX file ({error})") from error


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="L").save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def fashion_mnist(source: Path, max_per_split: dict[str, int]) -> Source:
    """Debian's Fashion-MNIST: splits train (60,000) and test (10,000), 28x28 grayscale PNGs."""
    arrays = {}
    for split, stem in FASHION_MNIST_SPLITS.items():
        images = _read_idx(source / f"{stem}-images-idx3-ubyte.gz")
        labels = _read_idx(source / f"{stem}-labels-idx1-ubyte.gz")
        if len(images) != len(labels):
            raise MapetError(f"{source}: {stem} has {len(images)} images but {len(labels)} labels")
        arrays[split] = (images, labels, stem)

    def generate() -> Iterator[SourceImage]:
        for split, (images, labels, stem) in arrays.items():
            for index in range(min(len(images), max_per_split.get(split, len(images)))):
                yield SourceImage(split, int(labels[index]), f"{stem}-images-idx3-ubyte.gz#{index}",
                                  "png", _png(images[index]))

    counts = {split: min(len(images), max_per_split.get(split, len(images))) for split, (images, _, _) in arrays.items()}
    return Source(source, FASHION_MNIST_CLASSES, counts, generate())


def image_folder(source: Path, max_per_split: dict[str, int]) -> Source:
    """SOURCE/<split>/<class>/<image> (the ImageNet layout); classes are the sorted class folders.

    The images of a split go in one fixed pseudo-random order (seeded by the split's name, so a
    re-import writes the same shards): every shard mixes the classes, as do the batches that
    DataLoader workers read from one shard at a time, and the first N of ``max_per_split`` are a
    sample of every class rather than the first classes alone."""
    if not source.is_dir():
        raise MapetError(f"{source}: not a folder (expected SOURCE/<split>/<class>/<image>)")
    splits = sorted(path for path in source.iterdir() if path.is_dir())
    if not splits:
        raise MapetError(f"{source}: no split folders (expected SOURCE/<split>/<class>/<image>, e.g. train/ and val/)")
    classes = sorted({path.name for split in splits for path in split.iterdir() if path.is_dir()})
    if not classes:
        raise MapetError(f"{source}: no class folders inside {', '.join(split.name for split in splits)}")
    label_of = {name: label for label, name in enumerate(classes)}
    files = {split.name: sorted(path for path in split.glob("*/*")
                                if path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES)
             for split in splits}
    for split, paths in files.items():
        random.Random(f"mapet-import-{split}").shuffle(paths)

    def generate() -> Iterator[SourceImage]:
        for split, paths in files.items():
            for path in paths[:max_per_split.get(split, len(paths))]:
                label, suffix = label_of[path.parent.name], path.suffix.lower().lstrip(".")
                relative = path.relative_to(source).as_posix()
                try:
                    yield SourceImage(split, label, relative, suffix, path.read_bytes())
                except OSError as error:
                    yield SourceImage(split, label, relative, suffix, b"", f"unreadable ({error.strerror})")

    counts = {split: min(len(paths), max_per_split.get(split, len(paths))) for split, paths in files.items()}
    return Source(source, classes, counts, generate())


FORMATS = {"fashion-mnist": fashion_mnist, "imagefolder": image_folder}
