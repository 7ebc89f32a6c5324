"""`mapet pictures`: what a pre-trained model predicts and what the tokenizer's codes look like,
as pictures a person can judge.

- ``predictions.png``: for the first few images of a split, one row each: the image as the ViT
  sees it, its true token map, the tokens the model predicts at one (seeded) prediction order
  (context patches hatched grey) and which predicted patches are right (green) or wrong (red).
- ``codebook.png``: the most used codes of the token file, each with a row of image patches
  assigned to it (one per image), labelled with the code's share of all patches.
- ``index.html``: both pictures in one self-contained page (a kfp HTML artifact).
"""

from __future__ import annotations

import colorsys
import json
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from matplotlib.colors import ListedColormap  # noqa: E402
from matplotlib.patches import Rectangle  # noqa: E402
from safetensors import safe_open  # noqa: E402

from mapet.data.dataset import read_manifest  # noqa: E402
from mapet.data.reader import ShardDataset  # noqa: E402
from mapet.data.transforms import normalize_batch, pretrain_transform  # noqa: E402
from mapet.engine.evaluate import save_figure, write_html  # noqa: E402
from mapet.errors import MapetError  # noqa: E402
from mapet.masking import default_num_predict, sample_orders  # noqa: E402
from mapet.models import PretrainModel, load_pretrain_model  # noqa: E402
from mapet.tokenizers.health import codebook_health  # noqa: E402
from mapet.tokenizers.tokens import load_tokens  # noqa: E402

RIGHT, WRONG, CONTEXT = (0.18, 0.65, 0.29), (0.86, 0.2, 0.18), (0.8, 0.8, 0.8)
FRAME = (255, 200, 0)
IDS_UP_TO = 8          # grids up to 8x8 get each cell's token id written on it


@dataclass
class PicturesSettings:
    """params.yaml ``pictures``."""

    split: str = "test"
    images: int = 6                  # rows of predictions.png: the first N images of the split
    seed: int = 0                    # the prediction order
    codes: int = 16                  # rows of codebook.png: the most used codes
    patches_per_code: int = 8
    codebook_images: int = 2000      # the first N images of the split searched for the codes' patches
    context: int = 1                 # patches shown around each of them


def first_images(data: Path, split: str, count: int, img_size: int) -> tuple[torch.Tensor, list[str]]:
    """(uint8 (n, C, H, W) as the ViT sees them, keys) of the first ``count`` images of ``split``."""
    items = list(islice(ShardDataset(data, split, pretrain_transform(img_size, normalize=False)), count))
    if not items:
        raise MapetError(f"{data}: split {split!r} has no images")
    return torch.stack([image for image, _, _ in items]), [key for _, _, key in items]


def prediction_order(model: PretrainModel, batch_size: int, seed: int, num_predict: int | None = None,
                     min_block: int = 16) -> tuple[torch.Tensor, int]:
    """(one seeded order per image, patches predicted) for the model's objective."""
    num_predict = num_predict or default_num_predict(model.objective, model.num_patches)
    order = sample_orders(model.objective, batch_size, model.grid_size, num_predict,
                          torch.Generator().manual_seed(seed), min_block=min_block)
    return order, num_predict


def patch_maps(logits: torch.Tensor, order: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(predicted token per patch, -1 on context patches; right per patch) both (B, N) in raster
    order, from logits (B, M, vocab) that belong to the last M entries of ``order``."""
    predicted_patches = order[:, order.shape[1] - logits.shape[1]:]
    predicted = torch.full_like(targets, -1).scatter_(1, predicted_patches, logits.argmax(dim=2))
    return predicted, predicted.eq(targets)


def token_colors(vocab_size: int) -> ListedColormap:
    """A colour per code id, neighbours far apart (golden-ratio hues, three lightness levels)."""
    return ListedColormap([colorsys.hls_to_rgb((i * 0.618034) % 1, (0.45, 0.62, 0.78)[i % 3], 0.75)
                           for i in range(vocab_size)])


def _grid_lines(axes, cells: tuple[int, int], step: float = 1.0) -> None:
    for row in range(1, cells[0]):
        axes.axhline(row * step - 0.5, color="white", linewidth=0.6)
    for column in range(1, cells[1]):
        axes.axvline(column * step - 0.5, color="white", linewidth=0.6)
    axes.set_xticks([]), axes.set_yticks([])


def _token_panel(axes, tokens: np.ndarray, colors: ListedColormap, title: str) -> None:
    """Token ids (H, W) on their grid; -1 (context) hatched grey."""
    axes.imshow(np.ma.masked_less(tokens, 0), cmap=colors.with_extremes(bad=CONTEXT), vmin=-0.5,
                vmax=colors.N - 0.5, interpolation="nearest")
    for (row, column), token in np.ndenumerate(tokens):
        if token < 0:
            axes.add_patch(Rectangle((column - 0.5, row - 0.5), 1, 1, fill=False, hatch="///", edgecolor="0.6",
                                     linewidth=0))
        elif max(tokens.shape) <= IDS_UP_TO:
            lightness = colorsys.rgb_to_hls(*colors(token)[:3])[1]
            axes.text(column, row, str(token), ha="center", va="center", fontsize=7,
                      color="black" if lightness > 0.55 else "white")
    _grid_lines(axes, tokens.shape)
    axes.set_title(title, fontsize=9)


def plot_predictions(images: torch.Tensor, targets: torch.Tensor, predicted: torch.Tensor, right: torch.Tensor,
                     captions: list[str], grid: tuple[int, int], vocab_size: int, title: str, path: Path) -> None:
    colors = token_colors(vocab_size)
    patch = images.shape[-1] // grid[1]
    figure = plt.figure(figsize=(10.5, 2.75 * len(images) + 0.6), layout="constrained")
    figure.suptitle(title, fontsize=10)
    for row, subfigure in enumerate(figure.subfigures(len(images), 1)):
        image = images[row].permute(1, 2, 0).numpy()
        shown, correct = predicted[row] >= 0, right[row].reshape(grid).numpy()
        subfigure.suptitle(f"{captions[row]}: {int(right[row].sum())} of {int(shown.sum())} predicted tokens right "
                           f"({right[row].sum() / max(int(shown.sum()), 1):.0%})", fontsize=10, fontweight="bold")
        axes = subfigure.subplots(1, 4)
        axes[0].imshow(image, cmap="gray", interpolation="nearest")
        _grid_lines(axes[0], grid, patch)
        axes[0].set_title("image (as the ViT sees it)", fontsize=9)
        _token_panel(axes[1], targets[row].reshape(grid).numpy(), colors, "true tokens")
        _token_panel(axes[2], predicted[row].reshape(grid).numpy(), colors, "predicted (hatched: context)")
        verdict = np.where(shown.reshape(grid).numpy()[..., None], np.where(correct[..., None], RIGHT, WRONG), CONTEXT)
        axes[3].imshow(verdict, interpolation="nearest")
        axes[3].imshow(image.mean(axis=2), cmap="gray", alpha=0.35, interpolation="nearest",
                       extent=(-0.5, grid[1] - 0.5, grid[0] - 0.5, -0.5))
        _grid_lines(axes[3], grid)
        axes[3].set_title("right (green) / wrong (red)", fontsize=9)
    save_figure(figure, path)


def codebook_mosaic(data: Path, split: str, tokens: np.ndarray, row_of: dict[str, int], counts: np.ndarray,
                    settings: PicturesSettings, img_size: int, grid: tuple[int, int]
                    ) -> tuple[list[int], np.ndarray, np.ndarray]:
    """The most used codes and, for each, up to ``patches_per_code`` patches from the first
    ``codebook_images`` images of ``split`` (one per image): (codes, windows (codes, n, w, w, C)
    uint8 of the patch and ``context`` patches around it, kept inside the image; the patch's
    (top, left) pixel inside its window (codes, n, 2), -1 where a code had fewer patches)."""
    codes = [int(code) for code in np.argsort(-counts, kind="stable")[:settings.codes] if counts[code]]
    patch = img_size // grid[1]
    side = min(2 * settings.context + 1, *grid) * patch
    windows = np.zeros((len(codes), settings.patches_per_code, side, side, 3), dtype=np.uint8)
    corners = np.full((len(codes), settings.patches_per_code, 2), -1, dtype=np.int64)
    found = np.zeros(len(codes), dtype=np.int64)
    dataset = ShardDataset(data, split, pretrain_transform(img_size, normalize=False))
    for image, _, key in islice(dataset, settings.codebook_images):
        ids = tokens[row_of[key]]
        for slot, code in enumerate(codes):
            where = np.flatnonzero(ids == code)
            if found[slot] < settings.patches_per_code and len(where):
                corner = np.array(divmod(int(where[0]), grid[1])) * patch
                top, left = np.clip(corner - settings.context * patch, 0, img_size - side)
                windows[slot, found[slot]] = image[:, top:top + side, left:left + side].permute(1, 2, 0).numpy()
                corners[slot, found[slot]] = corner - (top, left)
                found[slot] += 1
        if found.min(initial=settings.patches_per_code) == settings.patches_per_code:
            break
    return codes, windows, corners


def plot_codebook(codes: list[int], windows: np.ndarray, corners: np.ndarray, patch: int, shares: np.ndarray,
                  title: str, path: Path) -> None:
    """One row per code: its windows enlarged (nearest), the assigned patch framed in yellow;
    missing windows (corner -1) left blank."""
    rows, columns, window = windows.shape[:3]
    scale, gap = max(1, 72 // window), 8
    side = window * scale
    mosaic = np.full((rows * (side + gap) - gap, columns * (side + gap) - gap, 3), 255, dtype=np.uint8)
    for row, column in zip(*np.nonzero(corners[..., 0] >= 0)):
        tile = windows[row, column].repeat(scale, 0).repeat(scale, 1)
        top, left = corners[row, column] * scale
        frame = tile[top:top + patch * scale, left:left + patch * scale]
        frame[:2], frame[-2:], frame[:, :2], frame[:, -2:] = FRAME, FRAME, FRAME, FRAME
        y, x = row * (side + gap), column * (side + gap)
        mosaic[y:y + side, x:x + side] = tile
    figure, axes = plt.subplots(figsize=(2.2 + mosaic.shape[1] / 90, 0.7 + mosaic.shape[0] / 90))
    axes.imshow(mosaic, interpolation="nearest")
    axes.set_yticks([row * (side + gap) + side / 2 for row in range(rows)],
                    [f"code {code}: {share:.1%}" for code, share in zip(codes, shares)], fontsize=9)
    axes.set_xticks([])
    axes.tick_params(length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    axes.set_title(title, fontsize=10)
    figure.tight_layout()
    save_figure(figure, path)


def _check_model_tokens(model_file: Path, description: dict[str, Any], vocab_size: int, tokens_dir: Path) -> None:
    """The model must predict the codes of this token file's codebook (where its file says which)."""
    with safe_open(str(model_file), framework="pt") as handle:
        trained_on = json.loads((handle.metadata() or {}).get("provenance", "{}")).get("tokens", {})
    if description["k"] != vocab_size or trained_on.get("codebook_sha256", description["codebook_sha256"]) \
            != description["codebook_sha256"]:
        raise MapetError(f"{tokens_dir}: tokens of another codebook than {model_file} was pre-trained on "
                         f"({description['k']} codes, codebook sha256 {description['codebook_sha256'][:12]}; the "
                         f"model: {vocab_size} codes, {trained_on.get('codebook_sha256', 'unrecorded')[:12]})")


@torch.no_grad()
def run_pictures(model_file: Path, data: Path, tokens_dir: Path, out: Path, settings: PicturesSettings,
                 num_predict: int | None = None, min_block: int = 16) -> dict[str, Any]:
    """Writes predictions.png, codebook.png and index.html to ``out``; returns what they show:
    per image its key and the predicted and right token counts, and the codes of the mosaic."""
    model = load_pretrain_model(model_file).eval()
    tokens, description = load_tokens(tokens_dir, data, expected_grid=model.grid_size)
    _check_model_tokens(model_file, description, model.vocab_size, tokens_dir)
    manifest = read_manifest(data)
    row_of = {key: row for row, key in enumerate(manifest["key"])}
    class_of = dict(zip(manifest["key"], manifest["class_name"]))
    img_size, grid = model.backbone.patch_embed.img_size[0], model.grid_size
    images, keys = first_images(data, settings.split, settings.images, img_size)
    targets = torch.from_numpy(tokens[[row_of[key] for key in keys]].astype(np.int64))
    order, num_predict = prediction_order(model, len(keys), settings.seed, num_predict, min_block)
    logits = model(normalize_batch(images, torch.float32), order, num_predict)
    predicted, right = patch_maps(logits, order, targets)
    right_counts, total = right.sum(dim=1), num_predict * len(keys)

    encoder = description["encoder"]["name"] + ("" if description["encoder"]["clip"] else ", not CLIP")
    codebook = f"{encoder}, k = {description['k']}"
    out.mkdir(parents=True, exist_ok=True)
    plot_predictions(images, targets, predicted, right, [f"{key} ({class_of[key]})" for key in keys], grid,
                     model.vocab_size,
                     f"{model.objective} model {model_file.name}: one prediction order (seed {settings.seed}), "
                     f"{num_predict} of {model.num_patches} patches predicted from the other "
                     f"{model.num_patches - num_predict}\ntokens: {codebook}; token accuracy on these images "
                     f"{int(right_counts.sum())}/{total} ({int(right_counts.sum()) / total:.0%})",
                     out / "predictions.png")

    _, counts = codebook_health(tokens, description["k"])
    codes, windows, corners = codebook_mosaic(data, settings.split, tokens, row_of, counts, settings, img_size, grid)
    shares = counts[codes] / counts.sum()
    plot_codebook(codes, windows, corners, img_size // grid[1], shares,
                  f"the {len(codes)} most used codes ({codebook}) and their share of all patches:\n"
                  f"{settings.split} image patches assigned to each (framed), with their surroundings",
                  out / "codebook.png")
    write_html(out, "mapet pictures", {"predictions.png": f"What {model_file.name} predicts for the first {len(keys)} {settings.split} "
                                        f"images at one prediction order (green right, red wrong, hatched context).",
                     "codebook.png": f"The {len(codes)} most used codes of {codebook}, each with {settings.split} "
                                     f"image patches assigned to it (framed)."})
    return {"images": [{"key": key, "predicted": num_predict, "right": int(count)}
                       for key, count in zip(keys, right_counts)],
            "token_accuracy": round(int(right_counts.sum()) / total, 5),
            "codes": [{"code": code, "share": round(float(share), 5)} for code, share in zip(codes, shares)]}
