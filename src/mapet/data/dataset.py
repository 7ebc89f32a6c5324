"""A dataset folder: shards, a manifest with one row per image, and a description.

    DIR/shards/<split>-<n>.tar   images in the WebDataset layout (mapet.data.shards)
    DIR/manifest.parquet         key, source_path, split, label, class_name, shard, bytes, sha256,
                                 width, height, mode
    DIR/dataset.json             format, classes, images per split, and every source file that
                                 could not be imported (path and reason)

Paths name source files relative to the import's source folder (``train/cat/000.png``; for
Fashion-MNIST, which has no per-image files, the IDX file and index:
``train-images-idx3-ubyte.gz#12345``), so that messages point at files a user can find while the
dataset's bytes do not depend on where the source was mounted.

Importing writes into a temporary folder next to DIR and renames it into place at the end, so
an interrupted import never leaves a half-written DIR behind nor destroys the previous one.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image
from tqdm import tqdm

from mapet.data.shards import ShardWriter
from mapet.data.sources import Source, SourceImage
from mapet.errors import MapetError

MANIFEST = "manifest.parquet"
DESCRIPTION = "dataset.json"
MANIFEST_SCHEMA = pa.schema([
    ("key", pa.string()), ("source_path", pa.string()), ("split", pa.string()), ("label", pa.int32()), ("class_name", pa.string()),
    ("shard", pa.string()), ("bytes", pa.int64()), ("sha256", pa.string()),
    ("width", pa.int32()), ("height", pa.int32()), ("mode", pa.string()),
])
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImportResult:
    images: dict[str, int]              # imported images per split
    bad_files: list[dict[str, str]]     # {"path" (relative to the source), "split", "reason"} per file left out


def decode_problem(data: bytes) -> tuple[str, tuple[int, int, str] | None]:
    """("", (width, height, mode)) for an image that decodes fully, else (reason, None)."""
    if not data:
        return "zero-byte file", None
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return "", (image.width, image.height, image.mode)
    except DECODE_ERRORS as error:
        return f"cannot be decoded as an image ({type(error).__name__}: {error})", None


def _inspect(image: SourceImage) -> tuple[SourceImage, str, tuple[int, int, str] | None, str]:
    if image.problem:
        return image, image.problem, None, ""
    problem, geometry = decode_problem(image.data)
    return image, problem, geometry, hashlib.sha256(image.data).hexdigest()


def import_dataset(source: Source, out: Path, format_name: str, shard_size: int, workers: int = 1,
                   progress: bool = True) -> ImportResult:
    """Write ``source`` as a dataset folder at ``out`` (replacing it only once complete)."""
    if shard_size < 1:
        raise MapetError(f"shard size must be at least 1, got {shard_size}")
    out = Path(out)
    temporary = out.with_name(f".{out.name}.importing-{os.getpid()}")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        result = _write(source, temporary, format_name, shard_size, workers, progress)
        _replace(temporary, out)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)
    return result


def _write(source: Source, root: Path, format_name: str, shard_size: int, workers: int,
           progress: bool) -> ImportResult:
    rows, bad_files, writers, index_in_split = [], [], {}, {}
    total = sum(source.counts.values())
    with contextlib.ExitStack() as stack:
        if workers > 1:
            inspected = stack.enter_context(multiprocessing.Pool(workers)).imap(_inspect, source.images, chunksize=64)
        else:
            inspected = map(_inspect, source.images)
        for image, problem, geometry, digest in tqdm(inspected, total=total, desc="import", unit="img",
                                                     disable=not progress):
            index = index_in_split.get(image.split, 0)
            index_in_split[image.split] = index + 1
            if problem:
                bad_files.append({"path": image.path, "split": image.split, "reason": problem})
                continue
            key = f"{image.split}_{index:08d}"
            writer = writers.setdefault(image.split, ShardWriter(root, image.split, shard_size))
            shard = writer.add(key, image.suffix, image.data, image.label)
            width, height, mode = geometry
            rows.append((key, image.path, image.split, image.label, source.classes[image.label], shard, len(image.data),
                         digest, width, height, mode))
    for writer in writers.values():
        writer.close()
    table = pa.Table.from_pylist([dict(zip(MANIFEST_SCHEMA.names, row)) for row in rows], schema=MANIFEST_SCHEMA)
    pq.write_table(table, root / MANIFEST)
    images = {split: writer.count for split, writer in writers.items()}
    description = {"format": format_name, "classes": source.classes, "images": images,
                   "shard_size": shard_size, "bad_files": bad_files}
    (root / DESCRIPTION).write_text(json.dumps(description, indent=2) + "\n")
    return ImportResult(images, bad_files)


def _replace(new: Path, out: Path) -> None:
    old = out.with_name(f".{out.name}.old-{os.getpid()}")
    if out.exists():
        os.replace(out, old)
    os.replace(new, out)
    shutil.rmtree(old, ignore_errors=True)


def read_manifest(root: Path) -> pd.DataFrame:
    """The manifest as a DataFrame, one row per image in key order.

    A manifest written before source paths were kept has no ``source_path`` column; it reads with
    that column empty, and validation then names its images by key alone.
    """
    path = Path(root) / MANIFEST
    if not path.is_file():
        raise MapetError(f"{path}: no manifest (is {root} a dataset folder written by `mapet data import`?)")
    try:
        manifest = pq.read_table(path).to_pandas()
    except (pa.ArrowException, OSError) as error:
        raise MapetError(f"{path}: not a readable Parquet manifest ({error})") from error
    if "source_path" not in manifest:
        manifest.insert(1, "source_path", "")
    return manifest


def read_description(root: Path) -> dict:
    path = Path(root) / DESCRIPTION
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise MapetError(f"{path}: missing (is {root} a dataset folder written by `mapet data import`?)") from error
    except (OSError, json.JSONDecodeError) as error:
        raise MapetError(f"{path}: not readable JSON ({error})") from error
