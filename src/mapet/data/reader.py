"""Streaming the shards of one split into training: an IterableDataset for DataLoader workers
and distributed ranks.

Shards are dealt round-robin over (rank, worker) pairs, so no two readers share a shard and
every image is read exactly once per epoch; with ``shuffle`` the shard order (the same on every
rank) and the order inside each shard change with ``set_epoch``.
"""

from __future__ import annotations

import io
import random
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.distributed as dist
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from mapet.data.dataset import read_manifest
from mapet.data.shards import read_shard
from mapet.errors import MapetError

JPEG_MAGIC = b"\xff\xd8\xff"


class ShardDataset(IterableDataset):
    """Yields ``(image, label, key)``: the image as RGB PIL, or transformed by ``transform``; with
    ``decode=False``, its JPEG file as a 1-D uint8 tensor (for decoding on the GPU, see
    :func:`mapet.data.transforms.decode_center_square`; batch them with :func:`collate_encoded`).

    ``shards`` restricts reading to those shards of the split (e.g. the ones left to process).
    """

    def __init__(self, root: str | Path, split: str, transform: Callable | None = None, shuffle: bool = False,
                 seed: int = 0, rank: int | None = None, world_size: int | None = None,
                 shards: list[str] | None = None, decode: bool = True):
        self.root = Path(root)
        manifest = read_manifest(self.root)
        rows = manifest[manifest["split"] == split]
        if rows.empty:
            splits = ", ".join(sorted(manifest["split"].unique()))
            raise MapetError(f"{self.root}: no split {split!r} (it has: {splits})")
        self.split, self.transform, self.shuffle, self.seed = split, transform, shuffle, seed
        if shards is not None:
            rows = rows[rows["shard"].isin(shards)]
        self.shards = sorted(rows["shard"].unique())
        self.num_images = len(rows)
        self.rank, self.world_size = rank, world_size
        self.decode = decode
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def require_jpeg(self) -> None:
        """Refuses, before any reading starts, a split whose first image is not a JPEG file
        (``decode=False`` serves JPEG files only; the readers check every other image)."""
        if self.shards:
            for key, suffix, data, _ in read_shard(self.root / self.shards[0]):
                _require_jpeg(self.root / self.shards[0], key, suffix, data)
                break

    def _my_shards(self) -> list[str]:
        distributed = dist.is_available() and dist.is_initialized()
        rank = self.rank if self.rank is not None else (dist.get_rank() if distributed else 0)
        world = self.world_size if self.world_size is not None else (dist.get_world_size() if distributed else 1)
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker else (0, 1)
        shards = list(self.shards)
        if self.shuffle:
            random.Random(f"{self.seed}-{self.epoch}").shuffle(shards)
        return shards[rank * num_workers + worker_id::world * num_workers]

    def __iter__(self) -> Iterator[tuple]:
        for shard in self._my_shards():
            samples = read_shard(self.root / shard)
            if self.shuffle:
                samples = list(samples)
                random.Random(f"{self.seed}-{self.epoch}-{shard}").shuffle(samples)
            for key, suffix, data, label in samples:
                if not self.decode:
                    _require_jpeg(self.root / shard, key, suffix, data)
                    yield torch.frombuffer(bytearray(data), dtype=torch.uint8), label, key
                    continue
                with Image.open(io.BytesIO(data)) as image:
                    rgb = image.convert("RGB")
                yield (self.transform(rgb) if self.transform else rgb), label, key


def _require_jpeg(shard: Path, key: str, suffix: str, data: bytes) -> None:
    if not data.startswith(JPEG_MAGIC):
        raise MapetError(f"{shard}: image {key} ({suffix}) is not a JPEG file; decoding on the GPU "
                         f"(pretrain.decode: gpu) reads JPEG files only: use pretrain.decode: cpu for this dataset")


def collate_encoded(batch: list[tuple]) -> tuple[list[torch.Tensor], list, list[str]]:
    """DataLoader's collate for ``decode=False``: the files stay a list (they differ in length)."""
    images, labels, keys = zip(*batch)
    return list(images), list(labels), list(keys)
