"""Codebook health from the tokens of the training split: how much of the vocabulary is used."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from mapet.files import write_json  # noqa: E402


def codebook_health(tokens: np.ndarray, k: int) -> tuple[dict[str, Any], np.ndarray]:
    """Metrics (fraction of codes used, perplexity, dead codes) and the count of each code."""
    counts = np.bincount(np.asarray(tokens, dtype=np.int64).ravel(), minlength=k)
    share = counts / max(counts.sum(), 1)
    used = share[share > 0]
    metrics = {"codes": k, "codes_used": int((counts > 0).sum()), "fraction_used": round(float((counts > 0).mean()), 4),
               "dead_codes": int((counts == 0).sum()), "perplexity": round(float(np.exp(-(used * np.log(used)).sum())), 2),
               "largest_cluster_share": round(float(share.max()), 4), "patches": int(counts.sum())}
    return metrics, counts


def write_health(metrics: dict[str, Any], counts: np.ndarray, out: Path, encoder_name: str) -> None:
    """health.json (DVC metrics), cluster_sizes.png (the histogram) and codebook.md (the report)."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "health.json", metrics)

    figure, (histogram, ranked) = plt.subplots(1, 2, figsize=(10, 3.8))
    histogram.hist(counts, bins=min(50, max(counts.max(), 1)), color="#3a6ea5")
    histogram.set(title="Cluster sizes", xlabel="patches assigned to a code", ylabel="codes")
    ranked.plot(np.sort(counts)[::-1], color="#3a6ea5")
    ranked.set(title="Codes by usage", xlabel="code rank", ylabel="patches", yscale="symlog")
    figure.suptitle(f"{metrics['codes_used']}/{metrics['codes']} codes used, perplexity {metrics['perplexity']} "
                    f"({encoder_name})", fontsize=10)
    figure.tight_layout()
    figure.savefig(out / "cluster_sizes.png.partial.png", dpi=100)
    plt.close(figure)
    os.replace(out / "cluster_sizes.png.partial.png", out / "cluster_sizes.png")

    report = "\n".join([
        f"# Codebook health ({encoder_name})", "",
        "| metric | value |", "|---|---|",
        *(f"| {name} | {value} |" for name, value in metrics.items()), "",
        "![cluster sizes](cluster_sizes.png)", ""])
    (out / "codebook.md").write_text(report)
