"""Tar shards in the WebDataset layout: for each key, ``<key>.<suffix>`` (the image file as it
was) and ``<key>.cls`` (the class index as decimal text), in key order.

Shards hold one split each and are named ``shards/<split>-<n>.tar``. Members carry fixed
metadata (mtime 0, root, mode 0644) so that the same images give the same bytes.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterator
from pathlib import Path


def shard_name(split: str, index: int) -> str:
    return f"shards/{split}-{index:05d}.tar"


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


class ShardWriter:
    """Writes one split's images into shards of at most ``shard_size`` images each."""

    def __init__(self, root: Path, split: str, shard_size: int):
        self.root, self.split, self.shard_size = root, split, shard_size
        self.count = 0
        self._tar: tarfile.TarFile | None = None
        self.current = ""

    def add(self, key: str, suffix: str, data: bytes, label: int) -> str:
        """Store one image; returns the shard (relative path) it went to."""
        if self.count % self.shard_size == 0:
            self.close()
            self.current = shard_name(self.split, self.count // self.shard_size)
            (self.root / self.current).parent.mkdir(parents=True, exist_ok=True)
            self._tar = tarfile.open(self.root / self.current, "w", format=tarfile.PAX_FORMAT)
        label_text = str(label).encode()
        self._tar.addfile(_member(f"{key}.{suffix}", len(data)), io.BytesIO(data))
        self._tar.addfile(_member(f"{key}.cls", len(label_text)), io.BytesIO(label_text))
        self.count += 1
        return self.current

    def close(self) -> None:
        if self._tar is not None:
            self._tar.close()
            self._tar = None


def _sample(key: str, parts: dict[str, bytes]) -> Iterator[tuple[str, str, bytes, int | None]]:
    label = parts.pop("cls", b"")
    for suffix, data in parts.items():
        yield key, suffix, data, int(label) if label.strip().isdigit() else None


def read_shard(path: Path) -> Iterator[tuple[str, str, bytes, int | None]]:
    """(key, suffix, image bytes, label) for each sample of a shard, streamed in stored order.

    A sample whose ``.cls`` member is missing or not a number comes with label None; a key with
    no image member yields nothing.
    """
    with tarfile.open(path, "r|") as tar:
        key_now, parts = None, {}
        for member in tar:
            if not member.isfile():
                continue
            key, _, suffix = member.name.partition(".")
            if key != key_now:
                if key_now is not None:
                    yield from _sample(key_now, parts)
                key_now, parts = key, {}
            parts[suffix] = tar.extractfile(member).read()
        if key_now is not None:
            yield from _sample(key_now, parts)
