"""Image transforms of METHOD.md sections 6 and 7, at any input size.

Pre-training must show the model the field of view the tokenizer saw: a deterministic centre
square resized to the input size, no flips, no random crops (colour jitter is allowed).
Fine-tuning and evaluation follow the timm recipe (RandomResizedCrop, flip, RandAugment, random
erasing; resize then centre crop at evaluation).
"""

from __future__ import annotations

import io

import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import transforms as T
from torchvision.io import ImageReadMode, decode_jpeg


class CenterSquareResize:
    """The largest centred square, resized to ``size`` x ``size`` (bicubic) in one resampling
    pass; the filter at the square's edges reads the pixels just outside it, where there are any."""

    def __init__(self, size: int):
        self.size = size

    def __call__(self, image: Image.Image) -> Image.Image:
        width, height = image.size
        side = min(width, height)
        left, top = int(round((width - side) / 2)), int(round((height - side) / 2))
        return image.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + side, top + side))


def pretrain_transform(img_size: int, color_jitter: float = 0.0, mean=IMAGENET_DEFAULT_MEAN,
                       std=IMAGENET_DEFAULT_STD, normalize: bool = True) -> T.Compose:
    """PIL image -> normalised float tensor (C, H, W); without ``normalize``, a uint8 tensor that
    :func:`normalize_batch` turns into the same values on the device (a quarter of the bytes to
    copy, and the loader workers spared the float arithmetic)."""
    steps = [CenterSquareResize(img_size)]
    if color_jitter:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    return T.Compose([*steps, *([T.ToTensor(), T.Normalize(mean, std)] if normalize else [T.PILToTensor()])])


def decode_center_square(jpegs: list[torch.Tensor], size: int, device: torch.device, color_jitter: float = 0.0,
                         generator: torch.Generator | None = None) -> torch.Tensor:
    """JPEG files (1-D uint8 tensors) -> uint8 (B, 3, size, size) on ``device``: the centre square
    resized as :class:`CenterSquareResize` does (bicubic, antialiased; the filter stays inside the
    square), decoded by nvJPEG on a GPU, so that the loader workers only read the shards.

    ``color_jitter`` draws brightness, contrast and saturation factors in [1 - j, 1 + j] per image
    from ``generator`` (on the CPU) and applies them in one random order per batch (torchvision's
    ColorJitter draws an order per image). A file nvJPEG refuses (CMYK, say) is decoded by PIL.
    """
    try:
        images = decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        images = [_decode_with_pil(jpeg).to(device) for jpeg in jpegs]
    batch = torch.empty(len(images), 3, size, size, device=device)
    for index, image in enumerate(images):
        height, width = image.shape[1:]
        side = min(width, height)
        left, top = int(round((width - side) / 2)), int(round((height - side) / 2))
        square = image[None, :, top:top + side, left:left + side].float()
        batch[index] = F.interpolate(square, size=(size, size), mode="bicubic", antialias=True, align_corners=False)[0]
    batch = batch.clamp_(0, 255)
    if color_jitter:
        batch = _jitter(batch, color_jitter, generator)
    return batch.round_().to(torch.uint8)


def _decode_with_pil(jpeg: torch.Tensor) -> torch.Tensor:
    with Image.open(io.BytesIO(jpeg.numpy().tobytes())) as image:
        return T.functional.pil_to_tensor(image.convert("RGB"))


def _jitter(batch: torch.Tensor, strength: float, generator: torch.Generator | None) -> torch.Tensor:
    """Brightness, contrast and saturation of float images in [0, 255], as torchvision blends them."""
    factors = (1 + strength * (2 * torch.rand(3, len(batch), 1, 1, 1, generator=generator) - 1)).to(batch.device)
    weights = torch.tensor([0.299, 0.587, 0.114], device=batch.device).view(1, 3, 1, 1)
    for step in torch.randperm(3, generator=generator).tolist():
        gray = (batch * weights).sum(1, keepdim=True)
        other = {0: torch.zeros_like(gray), 1: gray.mean((2, 3), keepdim=True), 2: gray}[step]
        batch = (other + factors[step] * (batch - other)).clamp_(0, 255)
    return batch


def normalize_batch(images: torch.Tensor, dtype: torch.dtype, mean=IMAGENET_DEFAULT_MEAN,
                    std=IMAGENET_DEFAULT_STD) -> torch.Tensor:
    """uint8 (B, C, H, W) -> what ToTensor + Normalize give, in ``dtype``, on the batch's device."""
    mean = torch.tensor(mean, device=images.device).view(1, -1, 1, 1)
    std = torch.tensor(std, device=images.device).view(1, -1, 1, 1)
    return images.float().div(255).sub(mean).div(std).to(dtype)


def finetune_transform(img_size: int, auto_augment: str | None = "rand-m9-mstd0.5", reprob: float = 0.25,
                       scale: tuple[float, float] = (0.08, 1.0), mean=IMAGENET_DEFAULT_MEAN,
                       std=IMAGENET_DEFAULT_STD):
    return create_transform(img_size, is_training=True, scale=scale, hflip=0.5, auto_augment=auto_augment,
                            re_prob=reprob, re_mode="pixel", interpolation="bicubic", mean=mean, std=std)


def eval_transform(img_size: int, crop_pct: float = 224 / 248, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """Resize to img_size / crop_pct (248 for 224), then centre crop img_size."""
    return create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation="bicubic",
                            mean=mean, std=std)
