"""MIM's BEiT block-wise sampler (`mapet.masking.blockwise_orders`), orders/s, as one JSON line.

    python benchmarks/mim_sampler.py        # 14x14 (ViT-B/16 at 224) and the demo's 7x7, batch 256
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from machine import describe_cpu

from mapet.masking import blockwise_orders, default_num_predict

CASES = {"14x14": ((14, 14), 16), "7x7": ((7, 7), 4)}  # grid, min_block (the paper's; the demo's)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=50, help="timed batches per grid; the median is kept")
    args = parser.parse_args()

    generator = torch.Generator().manual_seed(0)
    results = {}
    for name, (grid, min_block) in CASES.items():
        num_predict = default_num_predict("mim", grid[0] * grid[1])
        blockwise_orders(args.batch, grid, num_predict, generator, min_block)
        seconds = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            blockwise_orders(args.batch, grid, num_predict, generator, min_block)
            seconds.append(time.perf_counter() - start)
        results[name] = {"num_predict": num_predict, "min_block": min_block,
                         "orders_per_s": round(args.batch / statistics.median(seconds))}
    print(json.dumps({"device": describe_cpu(), "torch": torch.__version__, "batch": args.batch, **results}))


if __name__ == "__main__":
    main()
