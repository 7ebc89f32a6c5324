"""`mapet evaluate`: top-1, top-5, per-class accuracy and the confusion matrix of a fine-tuned
classifier on one split, as DVC metrics and plots."""

from __future__ import annotations

import base64
import csv
import html
import os
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mapet.data.reader import ShardDataset  # noqa: E402
from mapet.data.transforms import eval_transform  # noqa: E402
from mapet.files import write_json, write_text  # noqa: E402
from mapet.models import load_classifier  # noqa: E402


def classification_metrics(logits: torch.Tensor, labels: torch.Tensor, classes: list[str]) -> tuple[dict, np.ndarray]:
    """Metrics (top-1, top-5 when there are at least 5 classes, accuracy of each class that has
    images) and the confusion matrix (rows: true class, columns: predicted)."""
    predicted = logits.argmax(dim=1)
    confusion = np.zeros((len(classes), len(classes)), dtype=np.int64)
    np.add.at(confusion, (labels.numpy(), predicted.numpy()), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    present = confusion.sum(axis=1) > 0
    metrics: dict[str, Any] = {"images": len(labels), "top1": round(float((predicted == labels).float().mean()), 5)}
    if len(classes) >= 5:
        top5 = logits.topk(5, dim=1).indices.eq(labels[:, None]).any(dim=1)
        metrics["top5"] = round(float(top5.float().mean()), 5)
    metrics["per_class_accuracy"] = {name: round(float(value), 5)
                                     for name, value, seen in zip(classes, per_class, present) if seen}
    return metrics, confusion


def plot_confusion(confusion: np.ndarray, classes: list[str], path: Path, title: str) -> None:
    size = max(5.0, 0.55 * len(classes) + 2)
    figure, axes = plt.subplots(figsize=(size, size))
    shares = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    if len(classes) <= 30:
        axes.set_xticks(range(len(classes)), classes, rotation=60, ha="right", fontsize=8)
        axes.set_yticks(range(len(classes)), classes, fontsize=8)
        for (row, column), count in np.ndenumerate(confusion):
            if count:
                axes.text(column, row, str(count), ha="center", va="center", fontsize=7,
                          color="white" if shares[row, column] > 0.5 else "black")
    axes.set(xlabel="predicted", ylabel="true", title=title)
    figure.tight_layout()
    save_figure(figure, path)


def save_figure(figure: plt.Figure, path: Path, dpi: int = 100) -> None:
    """Write ``figure`` as PNG under a temporary name, then move it into place, and close it."""
    partial = path.with_name(path.stem + ".partial.png")
    figure.savefig(partial, dpi=dpi)
    plt.close(figure)
    os.replace(partial, path)


def write_html(out: Path, title: str, captions: dict[str, str]) -> None:
    """out/index.html: the PNGs under ``out`` named in ``captions``, embedded, each with its caption
    (one self-contained page, as Kubeflow's HTML artifacts want)."""
    sections = "".join(
        f"<figure><img alt=\"{name}\" style=\"max-width:100%\" src=\"data:image/png;base64,"
        f"{base64.b64encode((out / name).read_bytes()).decode()}\">\n<figcaption>{html.escape(caption)}</figcaption>"
        f"</figure>\n" for name, caption in captions.items())
    write_text(out / "index.html", f"<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{html.escape(title)}</title></head>\n"
               f"<body style=\"font-family:sans-serif\">\n{sections}</body></html>\n")


def run_evaluate(model_file: Path, data: Path, split: str, out: Path, crop_pct: float, batch_size: int = 256,
                 workers: int = 0, progress: bool = True) -> dict[str, Any]:
    model, classes, provenance = load_classifier(model_file)
    model.eval()
    image_size = model.patch_embed.img_size[0]
    dataset = ShardDataset(data, split, eval_transform(image_size, crop_pct))
    all_logits, all_labels, keys = [], [], []
    with torch.no_grad():
        for images, labels, batch_keys in tqdm(DataLoader(dataset, batch_size=batch_size, num_workers=workers),
                                               total=-(-dataset.num_images // batch_size), desc=f"evaluate {split}",
                                               unit="batch", disable=not progress):
            all_logits.append(model(images))
            all_labels.append(labels)
            keys.extend(batch_keys)
    logits, labels = torch.cat(all_logits), torch.cat(all_labels)
    metrics, confusion = classification_metrics(logits, labels, classes)
    metrics = {"split": split, "model": str(model_file), **provenance, **metrics}
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "metrics.json", metrics)
    plot_confusion(confusion, classes, out / "confusion_matrix.png", f"{split}: top-1 {metrics['top1']:.3f}")
    with open(out / "predictions.csv.partial", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["key", "actual", "predicted"])
        for key, actual, predicted in zip(keys, labels.tolist(), logits.argmax(dim=1).tolist()):
            writer.writerow([key, classes[actual], classes[predicted]])
    os.replace(out / "predictions.csv.partial", out / "predictions.csv")
    return metrics
