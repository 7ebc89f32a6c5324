"""Image transforms of METHOD.md sections 6 and 7, at any input size.

Pre-training must show the model the field of view the tokenizer saw: a deterministic centre
square resized to the input size, no flips, no random crops (colour jitter is allowed).
Fine-tuning and evaluation follow the timm recipe (RandomResizedCrop, flip, RandAugment, random
erasing; resize then centre crop at evaluation).
"""

from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, create_transform
from torchvision import transforms as T
from torchvision.transforms import functional as TF


class CenterSquare:
    """Crop the largest centred square."""

    def __call__(self, image):
        side = min(image.size)
        return TF.center_crop(image, [side, side])


def pretrain_transform(img_size: int, color_jitter: float = 0.0, mean=IMAGENET_DEFAULT_MEAN,
                       std=IMAGENET_DEFAULT_STD) -> T.Compose:
    steps = [CenterSquare(), T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BICUBIC)]
    if color_jitter:
        steps.append(T.ColorJitter(color_jitter, color_jitter, color_jitter))
    return T.Compose([*steps, T.ToTensor(), T.Normalize(mean, std)])


def finetune_transform(img_size: int, auto_augment: str | None = "rand-m9-mstd0.5", reprob: float = 0.25,
                       scale: tuple[float, float] = (0.08, 1.0), mean=IMAGENET_DEFAULT_MEAN,
                       std=IMAGENET_DEFAULT_STD):
    return create_transform(img_size, is_training=True, scale=scale, hflip=0.5, auto_augment=auto_augment,
                            re_prob=reprob, re_mode="pixel", interpolation="bicubic", mean=mean, std=std)


def eval_transform(img_size: int, crop_pct: float = 224 / 248, mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD):
    """Resize to img_size / crop_pct (248 for 224), then centre crop img_size."""
    return create_transform(img_size, is_training=False, crop_pct=crop_pct, interpolation="bicubic",
                            mean=mean, std=std)
