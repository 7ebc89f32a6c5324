"""k-CLIP codebooks: patch vectors sampled from the training split, clustered by faiss k-means.

The codebook file is safetensors (``centroids``, k x dim float32) whose header metadata says
which encoder made the vectors (JSON), k, the feature grid and the k-means settings.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader
from tqdm import tqdm

from mapet.data.reader import ShardDataset
from mapet.errors import MapetError
from mapet.tokenizers.encoders import PatchEncoder

MAX_VOCAB = 65536  # token ids are stored as uint16


@dataclass(frozen=True)
class KMeansSettings:
    k: int = 8192
    iterations: int = 20
    restarts: int = 5
    max_points_per_centroid: int = 512
    seed: int = 42


@dataclass(frozen=True)
class Codebook:
    centroids: np.ndarray          # (k, dim) float32
    metadata: dict[str, Any]       # encoder (dict), k, grid, kmeans settings, vectors, seconds

    @property
    def k(self) -> int:
        return self.centroids.shape[0]


def sample_patch_vectors(encoder: PatchEncoder, data: Path, split: str, max_images: int, max_vectors: int,
                         seed: int, batch_size: int = 64, workers: int = 0, progress: bool = True) -> np.ndarray:
    """Up to ``max_vectors`` patch vectors from ``max_images`` images of ``split`` (seeded shuffle),
    the same number of randomly chosen patches from each image; memory stays within the budget."""
    dataset = ShardDataset(data, split, encoder.transform(), shuffle=True, seed=seed)
    max_images = min(max_images, dataset.num_images)
    grid, dim = encoder.grid_and_dim()
    per_image = min(grid[0] * grid[1], math.ceil(max_vectors / max_images))
    generator = torch.Generator().manual_seed(seed)
    vectors = np.empty((max_images * per_image, dim), dtype=np.float32)
    seen = 0
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers)
    with tqdm(total=max_images, desc="sample patches", unit="img", disable=not progress) as bar:
        for images, _, _ in loader:
            images = images[:max_images - seen]
            with torch.no_grad():
                features = encoder(images).flatten(1, 2)                                 # (B, cells, dim)
            choice = torch.rand(features.shape[:2], generator=generator).argsort(dim=1)[:, :per_image]
            picked = features.gather(1, choice[:, :, None].expand(-1, -1, dim)).reshape(-1, dim)
            vectors[seen * per_image:(seen + len(images)) * per_image] = picked.numpy()
            seen += len(images)
            bar.update(len(images))
            if seen >= max_images:
                break
    return vectors[:seen * per_image][:max_vectors]


def train_kmeans(vectors: np.ndarray, settings: KMeansSettings) -> tuple[np.ndarray, dict[str, Any]]:
    """faiss k-means (Lloyd, L2), on the GPU when faiss sees one; the best of ``restarts`` runs."""
    if not 2 <= settings.k <= MAX_VOCAB:
        raise MapetError(f"tokenizer.k must be within 2..{MAX_VOCAB} (ids are stored as uint16), got {settings.k}")
    if len(vectors) < settings.k:
        raise MapetError(f"only {len(vectors)} patch vectors for k = {settings.k} clusters: raise "
                         f"tokenizer.max_vectors / sample_images or lower tokenizer.k")
    use_gpu = hasattr(faiss, "get_num_gpus") and faiss.get_num_gpus() > 0
    kmeans = faiss.Kmeans(vectors.shape[1], settings.k, niter=settings.iterations, nredo=settings.restarts,
                          max_points_per_centroid=settings.max_points_per_centroid, seed=settings.seed,
                          gpu=use_gpu, verbose=False)
    start = time.perf_counter()
    kmeans.train(np.ascontiguousarray(vectors, dtype=np.float32))
    seconds = time.perf_counter() - start
    return kmeans.centroids.copy(), {"kmeans_seconds": round(seconds, 3), "objective": float(kmeans.obj[-1]),
                                     "device": "gpu" if use_gpu else "cpu"}


def nearest(centroids: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (L2) for each row of ``vectors``."""
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    _, ids = index.search(np.ascontiguousarray(vectors, dtype=np.float32), 1)
    return ids[:, 0]


def save_codebook(codebook: Codebook, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    metadata = {key: json.dumps(value) for key, value in codebook.metadata.items()}
    save_file({"centroids": torch.from_numpy(np.ascontiguousarray(codebook.centroids))}, str(partial), metadata)
    os.replace(partial, path)


def load_codebook(path: Path) -> Codebook:
    path = Path(path)
    if not path.is_file():
        raise MapetError(f"{path}: no codebook (run `mapet tokenizer build` first)")
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = {key: json.loads(value) for key, value in (handle.metadata() or {}).items()}
            centroids = handle.get_tensor("centroids").numpy()
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as error:
        raise MapetError(f"{path}: not a codebook written by mapet ({error})") from error
    if "encoder" not in metadata:
        raise MapetError(f"{path}: codebook without an encoder description")
    return Codebook(centroids, metadata)
