"""Images per second of `mapet data import`, `mapet validate` and the shard reader (2 workers)
on the Fashion-MNIST demo, as one JSON line.

    python benchmarks/data_throughput.py [--train 12000 --test 2000]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from machine import describe_cpu
from torch.utils.data import DataLoader

from mapet.data.dataset import import_dataset
from mapet.data.reader import ShardDataset
from mapet.data.sources import FASHION_MNIST_DIR, fashion_mnist
from mapet.data.transforms import pretrain_transform
from mapet.validation import Limits, validate_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train", type=int, default=12000)
    parser.add_argument("--test", type=int, default=2000)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    images = args.train + args.test
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder) / "data"
        start = time.perf_counter()
        import_dataset(fashion_mnist(FASHION_MNIST_DIR, {"train": args.train, "test": args.test}), root,
                       "fashion-mnist", 1000, workers=args.workers, progress=False)
        imported = time.perf_counter() - start

        start = time.perf_counter()
        results = validate_dataset(root, Limits(min_size=28), workers=args.workers, progress=False)
        validated = time.perf_counter() - start
        assert all(r.success for r in results)

        loader = DataLoader(ShardDataset(root, "train", pretrain_transform(28)), batch_size=256,
                            num_workers=args.workers)
        start = time.perf_counter()
        read = sum(len(keys) for _, _, keys in loader)
        reading = time.perf_counter() - start
    print(json.dumps({"machine": describe_cpu(), "workers": args.workers,
                      "images": images, "import_images_per_s": round(images / imported),
                      "validate_images_per_s": round(images / validated),
                      "reader_images_per_s": round(read / reading), "reader_transform": "pretrain, 28 px"}))


if __name__ == "__main__":
    main()
