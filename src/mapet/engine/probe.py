"""`mapet probe`: how good a frozen backbone's features are, before any fine-tuning.

Two read-outs on the features of the train split (the memory bank, the linear probe's training
set) and the test split, each on three representations, all after the backbone's final norm:
the average of the patch tokens (``avg``), the CLS token (``cls``), and both side by side
(``cls_avg``, DINO's linear protocol for ViT-B). The headline ``knn_top1`` is the average's,
``linear_top1`` the pair's.

- k-NN top-1 by DINO's protocol: L2-normalised features, the k most similar train images vote
  with weight exp(similarity / temperature) (k = 20 and 10, temperature 0.07).
- Linear-probe top-1: features standardised with the train split's statistics, then a linear
  classifier (multinomial logistic regression, full-batch L-BFGS) fitted once on the cached
  features.

Images take the pre-training transform without jitter (the field of view the backbone learnt
from). The same code runs inside pre-training as a monitor (``pretrain.probe_every``).

The raw pixels are the baseline every backbone must beat: the same two read-outs on the
flattened input images at the backbone's size (one channel where every image is grey), the k-NN
on pixels standardised with the train split's statistics (``pixels_knn_top1``,
``pixels_linear_top1``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from timm.models.vision_transformer import VisionTransformer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from tqdm import tqdm  # noqa: E402

from mapet.data.reader import ShardDataset  # noqa: E402
from mapet.data.transforms import pretrain_transform  # noqa: E402
from mapet.engine.evaluate import save_figure  # noqa: E402
from mapet.errors import MapetError  # noqa: E402


@dataclass
class ProbeSettings:
    """params.yaml ``probe``."""

    train_split: str = "train"
    test_split: str = "test"
    train_images: int = 0            # the first N images of the train split; 0: all
    test_images: int = 0
    k: int = 20
    temperature: float = 0.07
    linear_iterations: int = 1000    # L-BFGS iterations of the linear probe (at most)
    linear_weight_decay: float = 1e-4
    batch_size: int = 256
    workers: int = 0
    seed: int = 0                    # the random initialisation of --scratch


class FirstImages(torch.utils.data.IterableDataset):
    """The first ``limit`` items of a ShardDataset (all when ``limit`` is 0), in shard order."""

    def __init__(self, dataset: ShardDataset, limit: int):
        self.dataset, self.limit = dataset, limit

    def __len__(self) -> int:
        return min(self.limit, self.dataset.num_images) if self.limit else self.dataset.num_images

    def __iter__(self):
        for index, item in enumerate(self.dataset):
            if index == len(self):
                return
            yield item


def first_images(data: Path, split: str, limit: int, transform, batch_size: int, workers: int,
                 shards: list[str] | None = None) -> DataLoader:
    """Batches of the first ``limit`` images of ``split`` (all when 0), in shard order."""
    images = FirstImages(ShardDataset(data, split, transform, shards=shards), limit)
    return DataLoader(images, batch_size=batch_size, num_workers=workers)


@torch.no_grad()
def extract_features(backbone: VisionTransformer, data: Path, split: str, limit: int, batch_size: int = 256,
                     workers: int = 0, progress: bool = True,
                     shards: list[str] | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """({"avg": (n, dim), "cls": (n, dim), "pre_logits": (n, dim)} in float32, labels (n,)) of the
    first ``limit`` images of ``split`` (of ``shards`` only, if given). ``pre_logits`` is what the
    ViT's own head would see (its pooling and fc_norm). The backbone runs in eval mode and is
    left in the mode it was in."""
    batches = first_images(data, split, limit, pretrain_transform(backbone.patch_embed.img_size[0]), batch_size,
                           workers, shards)
    parameter = next(backbone.parameters())
    was_training = backbone.training
    backbone.eval()
    avg, cls, pre_logits, labels = [], [], [], []
    try:
        for batch, batch_labels, _ in tqdm(batches, total=len(batches), desc=f"features {split}", unit="batch",
                                           disable=not progress):
            tokens = backbone.forward_features(batch.to(parameter.device, parameter.dtype))
            pre_logits.append(backbone.forward_head(tokens, pre_logits=True).float().cpu())
            tokens = tokens.float()
            cls.append(tokens[:, 0].cpu())
            avg.append(tokens[:, backbone.num_prefix_tokens:].mean(dim=1).cpu())
            labels.append(batch_labels)
    finally:
        backbone.train(was_training)
    return {"avg": torch.cat(avg), "cls": torch.cat(cls), "pre_logits": torch.cat(pre_logits)}, torch.cat(labels)


def extract_pixels(data: Path, split: str, limit: int, image_size: int, batch_size: int = 256,
                   workers: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images (n, C, image_size, image_size), labels (n,)): the first ``limit`` images of
    ``split`` as the backbone sees them, before normalisation."""
    batches = first_images(data, split, limit, pretrain_transform(image_size, normalize=False), batch_size, workers)
    images, labels = zip(*((batch, batch_labels) for batch, batch_labels, _ in batches))
    return torch.cat(images), torch.cat(labels)


def flat_pixels(*splits: torch.Tensor) -> list[torch.Tensor]:
    """uint8 (n, C, H, W) images -> float (n, C x H x W); (n, H x W) where every image of every
    split is grey (its channels equal), as the loader gives greyscale images in RGB."""
    if all(bool((images == images[:, :1]).all()) for images in splits):
        splits = [images[:, :1] for images in splits]
    return [images.flatten(1).float() for images in splits]


def pixel_baseline(data: Path, settings: ProbeSettings, image_size: int, num_classes: int) -> dict[str, float]:
    """``pixels_knn_top1`` and ``pixels_linear_top1``: the probe's read-outs on the raw input."""
    train, train_labels = extract_pixels(data, settings.train_split, settings.train_images, image_size,
                                         settings.batch_size, settings.workers)
    test, test_labels = extract_pixels(data, settings.test_split, settings.test_images, image_size,
                                       settings.batch_size, settings.workers)
    train, test = flat_pixels(train, test)
    mean, std = train.mean(dim=0), train.std(dim=0).clamp(min=1e-6)
    return {"pixels_knn_top1": round(knn_top1((train - mean) / std, train_labels, (test - mean) / std, test_labels,
                                              settings.k, settings.temperature, num_classes), 5),
            "pixels_linear_top1": round(linear_top1(train, train_labels, test, test_labels, settings.linear_iterations,
                                                    settings.linear_weight_decay, num_classes), 5)}


def knn_top1(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
             k: int = 20, temperature: float = 0.07, num_classes: int | None = None, chunk: int = 1024) -> float:
    """DINO's weighted k-NN classifier's top-1 accuracy (a fraction)."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train))
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    correct = 0
    for start in range(0, len(test), chunk):
        similarity, neighbours = (test[start:start + chunk] @ train.T).topk(k, dim=1)
        votes = torch.zeros(len(similarity), num_classes).scatter_add_(
            1, train_labels[neighbours], (similarity / temperature).exp())
        correct += int((votes.argmax(dim=1) == test_labels[start:start + chunk]).sum())
    return correct / len(test)


def fit_linear(features: torch.Tensor, labels: torch.Tensor, num_classes: int, iterations: int = 1000,
               weight_decay: float = 1e-4) -> torch.nn.Linear:
    """A multinomial logistic regression (float64) fitted by full-batch L-BFGS from zeros."""
    features = features.double()
    classifier = torch.nn.Linear(features.shape[1], num_classes, dtype=torch.float64)
    torch.nn.init.zeros_(classifier.weight)
    torch.nn.init.zeros_(classifier.bias)
    optimizer = torch.optim.LBFGS(classifier.parameters(), max_iter=iterations, history_size=20,
                                  line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(classifier(features), labels) + weight_decay * classifier.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return classifier


def linear_top1(train: torch.Tensor, train_labels: torch.Tensor, test: torch.Tensor, test_labels: torch.Tensor,
                iterations: int = 1000, weight_decay: float = 1e-4, num_classes: int | None = None) -> float:
    """Top-1 accuracy (a fraction) of a logistic regression fitted on ``train``, standardised."""
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    mean, std = train.mean(dim=0), train.std(dim=0).clamp(min=1e-6)
    classifier = fit_linear((train - mean) / std, train_labels, num_classes, iterations, weight_decay)
    with torch.no_grad():
        return float((classifier(((test - mean) / std).double()).argmax(dim=1) == test_labels).double().mean())


def knn_monitor(backbone: VisionTransformer, data: Path, settings: ProbeSettings) -> float:
    """The k-NN top-1 (avg-pooled patches) of the probe's subsets: pre-training's monitor."""
    train, train_labels = extract_features(backbone, data, settings.train_split, settings.train_images,
                                           settings.batch_size, progress=False)
    test, test_labels = extract_features(backbone, data, settings.test_split, settings.test_images,
                                         settings.batch_size, progress=False)
    return round(knn_top1(train["avg"], train_labels, test["avg"], test_labels, settings.k, settings.temperature), 5)


def run_probe(backbone: VisionTransformer, data: Path, settings: ProbeSettings, num_classes: int,
              progress: bool = True) -> dict[str, Any]:
    """The k-NN and linear-probe top-1 of ``backbone``'s features, for every representation;
    at the top level the average's ``knn_top1`` and the pair's ``linear_top1``, beside the raw
    pixels' (:func:`pixel_baseline`)."""
    train, train_labels = extract_features(backbone, data, settings.train_split, settings.train_images,
                                           settings.batch_size, settings.workers, progress)
    test, test_labels = extract_features(backbone, data, settings.test_split, settings.test_images,
                                         settings.batch_size, settings.workers, progress)
    if len(train_labels) < 1 or len(test_labels) < 1:
        raise MapetError(f"{data}: the probe needs images in both splits {settings.train_split!r} and "
                         f"{settings.test_split!r}")
    for features in (train, test):
        features["cls_avg"] = torch.cat([features["cls"], features["avg"]], dim=1)
    results = {}
    for name in ("avg", "cls", "cls_avg"):
        results[name] = {
            "knn_top1": knn_top1(train[name], train_labels, test[name], test_labels, settings.k,
                                 settings.temperature, num_classes),
            "knn_top1_k10": knn_top1(train[name], train_labels, test[name], test_labels, 10,
                                     settings.temperature, num_classes),
            "linear_top1": linear_top1(train[name], train_labels, test[name], test_labels,
                                       settings.linear_iterations, settings.linear_weight_decay, num_classes),
        }
        results[name] = {key: round(value, 5) for key, value in results[name].items()}
    return {"knn_top1": results["avg"]["knn_top1"], "linear_top1": results["cls_avg"]["linear_top1"], **results,
            **pixel_baseline(data, settings, backbone.patch_embed.img_size[0], num_classes),
            "train_images": len(train_labels), "test_images": len(test_labels), "k": settings.k,
            "temperature": settings.temperature}


def plot_probe(metrics: dict[str, Any], path: Path) -> None:
    """Bars of every read-out, for both representations and the raw pixels."""
    readouts = [("knn_top1", f"k-NN, k = {metrics['k']}"), ("knn_top1_k10", "k-NN, k = 10"), ("linear_top1", "linear")]
    series = [(label, [metrics[representation][key] for key, _ in readouts])
              for representation, label in (("avg", "average of patches"), ("cls", "CLS"),
                                            ("cls_avg", "CLS and average"))]
    series.append(("raw pixels", [metrics.get(f"pixels_{key}") for key, _ in readouts]))
    figure, axes = plt.subplots(figsize=(7, 4.2))
    for offset, (label, values) in enumerate(series):
        rows = [(i * 5 + offset, value) for i, value in enumerate(values) if value is not None]
        axes.barh([row for row, _ in rows], [value for _, value in rows], label=label)
        for row, value in rows:
            axes.text(value, row, f" {value:.3f}", va="center", fontsize=8)
    axes.set_yticks([i * 5 + 1.5 for i in range(len(readouts))], [name for _, name in readouts])
    axes.set(xlim=(0, 1.1), xlabel=f"top-1 on {metrics['test_images']} test images",
             title=f"frozen features of {Path(metrics['backbone']).name}")
    axes.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=4, fontsize=8, frameon=False)
    figure.tight_layout()
    save_figure(figure, path)
