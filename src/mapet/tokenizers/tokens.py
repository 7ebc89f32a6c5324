"""Token files: the nearest-centroid id of every patch of every image, aligned row for row with
the manifest.

    OUT/tokens.npy     uint16 (num_images, grid_h * grid_w), raster order, memory-mapped
    OUT/tokens.json    encoder, k, grid, sha256 of the manifest and of the codebook, rows

While it runs, ``mapet tokenize`` writes ``tokens.npy.partial`` and records the shards it has
finished in ``tokens.progress.json``; run again after an interruption and it carries on with the
remaining shards. The final names appear only once every row is written.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm import tqdm

from mapet.data.dataset import MANIFEST, read_manifest
from mapet.data.reader import ShardDataset
from mapet.errors import MapetError
from mapet.files import file_sha256, write_json
from mapet.tokenizers.codebook import Codebook, nearest
from mapet.tokenizers.encoders import PatchEncoder

TOKENS, DESCRIPTION, PARTIAL, PROGRESS = "tokens.npy", "tokens.json", "tokens.npy.partial", "tokens.progress.json"


def tokenize_dataset(encoder: PatchEncoder, codebook: Codebook, codebook_path: Path, data: Path, out: Path,
                     batch_size: int = 128, workers: int = 0, progress: bool = True) -> dict[str, Any]:
    """Tokenize every image of ``data``; returns the description written to tokens.json."""
    data, out = Path(data), Path(out)
    manifest = read_manifest(data)
    grid, _ = encoder.grid_and_dim()
    if list(grid) != list(codebook.metadata["grid"]) or encoder.describe() != codebook.metadata["encoder"]:
        raise MapetError(f"{codebook_path}: made with {codebook.metadata['encoder']['name']} "
                         f"({codebook.metadata['grid']} grid), not with the configured {encoder.describe()['name']}")
    description = {"encoder": codebook.metadata["encoder"], "k": codebook.k, "grid": list(grid),
                   "rows": len(manifest), "manifest_sha256": file_sha256(data / MANIFEST),
                   "codebook_sha256": file_sha256(codebook_path)}
    out.mkdir(parents=True, exist_ok=True)
    tokens, done = _open_partial(out, description, (len(manifest), grid[0] * grid[1]))
    row_of = {key: row for row, key in enumerate(manifest["key"])}
    rows_per_shard = manifest.groupby("shard").size().to_dict()
    written = {shard: 0 for shard in rows_per_shard}
    shard_of = dict(zip(manifest["key"], manifest["shard"]))
    remaining = manifest[~manifest["shard"].isin(done)]
    with tqdm(total=len(manifest), initial=len(manifest) - len(remaining), desc="tokenize", unit="img",
              disable=not progress) as bar:
        for split in remaining["split"].unique():
            shards = sorted(remaining.loc[remaining["split"] == split, "shard"].unique())
            dataset = ShardDataset(data, split, encoder.transform(), shards=shards)
            for images, _, keys in DataLoader(dataset, batch_size=batch_size, num_workers=workers):
                with torch.no_grad():
                    features = encoder(images)
                ids = nearest(codebook.centroids, features.reshape(-1, features.shape[-1]).numpy())
                tokens[[row_of[key] for key in keys]] = ids.reshape(len(keys), -1).astype(np.uint16)
                finished = []
                for key in keys:
                    shard = shard_of[key]
                    written[shard] += 1
                    if written[shard] == rows_per_shard[shard]:
                        finished.append(shard)
                if finished:
                    tokens.flush()
                    done.extend(finished)
                    write_json(out / PROGRESS, {**description, "done_shards": sorted(done)})
                bar.update(len(keys))
    tokens.flush()
    del tokens
    os.replace(out / PARTIAL, out / TOKENS)
    write_json(out / DESCRIPTION, description)
    (out / PROGRESS).unlink(missing_ok=True)
    return description


def _open_partial(out: Path, description: dict[str, Any], shape: tuple[int, int]) -> tuple[np.memmap, list[str]]:
    """The partial token array and the shards already done: resumed when the progress file was
    written for the same manifest, codebook and encoder, else started afresh."""
    progress_path = out / PROGRESS
    if progress_path.is_file() and (out / PARTIAL).is_file():
        progress = json.loads(progress_path.read_text())
        if {key: progress.get(key) for key in description} == description:
            return np.lib.format.open_memmap(out / PARTIAL, mode="r+"), list(progress["done_shards"])
    tokens = np.lib.format.open_memmap(out / PARTIAL, mode="w+", dtype=np.uint16, shape=shape)
    write_json(progress_path, {**description, "done_shards": []})
    return tokens, []


def load_tokens(tokens_dir: Path, data: Path, expected_grid: tuple[int, int] | None = None) -> tuple[np.ndarray, dict]:
    """The token array (memory-mapped) after checking that it was made for ``data``'s manifest."""
    tokens_dir, data = Path(tokens_dir), Path(data)
    description_path = tokens_dir / DESCRIPTION
    if not description_path.is_file() or not (tokens_dir / TOKENS).is_file():
        raise MapetError(f"{tokens_dir}: no complete token file (run `mapet tokenize`)")
    description = json.loads(description_path.read_text())
    manifest_sha = file_sha256(data / MANIFEST)
    if description.get("manifest_sha256") != manifest_sha:
        raise MapetError(f"{description_path}: made for another manifest (sha256 {description.get('manifest_sha256')}, "
                         f"but {data / MANIFEST} has {manifest_sha}); re-run `mapet tokenize` for this data")
    tokens = np.load(tokens_dir / TOKENS, mmap_mode="r")
    if tokens.shape[0] != description["rows"]:
        raise MapetError(f"{tokens_dir / TOKENS}: {tokens.shape[0]} rows, but tokens.json says {description['rows']}")
    if expected_grid is not None and list(expected_grid) != description["grid"]:
        raise MapetError(f"{description_path}: tokens on a {description['grid']} grid, but the ViT has "
                         f"{list(expected_grid)} patches")
    return tokens, description
