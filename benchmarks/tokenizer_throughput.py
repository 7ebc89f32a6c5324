"""Tokenization images/s (encoder + nearest centroid) and k-means seconds per iteration, as one
JSON line.

    python benchmarks/tokenizer_throughput.py                         # CPU: the demo's EfficientNet-Lite0, k = 256
    python benchmarks/tokenizer_throughput.py --encoder open_clip --model ViT-B-16 --input-size 224 --k 8192
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from machine import describe_cpu

from mapet.tokenizers.codebook import KMeansSettings, nearest, train_kmeans
from mapet.tokenizers.encoders import create_encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoder", default="efficientnet-lite0", choices=["efficientnet-lite0", "open_clip", "timm"])
    parser.add_argument("--model", help="open_clip / timm model name (random weights: speed only)")
    parser.add_argument("--input-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=20, help="how long to tokenize")
    parser.add_argument("--k", type=int, default=256)
    parser.add_argument("--vectors", type=int, default=100_000)
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    encoder = create_encoder({"kind": args.encoder, "model": args.model, "input_size": args.input_size}).to(args.device)
    rng = np.random.default_rng(0)
    images = torch.randn(args.batch, 3, args.input_size, args.input_size, device=args.device)
    with torch.no_grad():
        dim = encoder(images[:1]).shape[-1]
    vectors = rng.standard_normal((args.vectors, dim), dtype=np.float32)
    settings = KMeansSettings(k=args.k, iterations=args.iterations, restarts=1, seed=0)
    centroids, result = train_kmeans(vectors, settings)

    done, start = 0, time.perf_counter()
    while time.perf_counter() - start < args.seconds:
        with torch.no_grad():
            features = encoder(images)
        nearest(centroids, features.reshape(-1, dim).float().cpu().numpy())
        done += args.batch
    elapsed = time.perf_counter() - start
    device = torch.cuda.get_device_name() if args.device == "cuda" else describe_cpu()
    print(json.dumps({"device": device, "encoder": encoder.describe()["name"], "input_size": args.input_size,
                      "batch": args.batch, "tokenize_images_per_s": round(done / elapsed, 1),
                      "kmeans": {"k": args.k, "vectors": args.vectors, "dim": dim, "device": result["device"],
                                 "seconds_per_iteration": round(result["kmeans_seconds"] / args.iterations, 4)}}))


if __name__ == "__main__":
    main()
