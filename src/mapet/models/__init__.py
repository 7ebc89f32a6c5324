"""Model factory, the model files (read and written through :mod:`mapet.checkpoints`) and export
of the pre-trained backbone to timm.

Files are safetensors with their description in the header metadata, so one file says what it
holds: ``kind`` ("pretrain" or "backbone"), ``backbone`` (timm model name), ``timm_kwargs``
(JSON), and for pre-training models ``objective`` and ``vocab_size``. timm loads a backbone file
directly: ``timm.models.load_checkpoint(model, path, strict=False)``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import timm
import torch
from timm.models.vision_transformer import VisionTransformer

from mapet.checkpoints import load_weights, read_model_file, write_model_file
from mapet.errors import MapetError
from mapet.masking import OBJECTIVES
from mapet.models.pretrain import MaskedImageModel, PretrainModel, TwoStreamModel

__all__ = ["create_pretrain_model", "export_backbone", "init_pretrain_model", "load_backbone", "load_backbone_file",
           "load_classifier", "load_pretrain_model",
           "save_backbone", "save_classifier", "save_pretrain_model", "PretrainModel", "TwoStreamModel",
           "MaskedImageModel"]

# METHOD.md section 2: LayerScale 0.1 on both residual branches, stochastic depth up to 0.1.
BACKBONE_DEFAULTS = {"init_values": 0.1, "drop_path_rate": 0.1}


def create_pretrain_model(objective: str, backbone: str, vocab_size: int, **timm_kwargs) -> PretrainModel:
    """A pre-training model for ``objective`` ("mapet", "plm" or "mim") on a timm ViT.

    ``timm_kwargs`` go to ``timm.create_model`` (img_size, patch_size, depth, embed_dim, ...);
    LayerScale (init_values) and drop_path_rate default to METHOD.md's 0.1. The backbone is built
    without a classifier head; the effective arguments are kept as ``model.timm_kwargs`` so that
    ``timm.create_model(model.backbone_name, **model.timm_kwargs)`` rebuilds the same network.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    if vocab_size < 2:
        raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
    kwargs = {**BACKBONE_DEFAULTS, **timm_kwargs}
    kwargs.pop("num_classes", None)
    network = timm.create_model(backbone, num_classes=0, **kwargs)
    if not isinstance(network, VisionTransformer):
        raise ValueError(f"{backbone!r} is a {type(network).__name__}; pre-training needs a timm VisionTransformer")
    if objective == "mim":
        model = MaskedImageModel(network, vocab_size)
    else:
        model = TwoStreamModel(network, vocab_size, mask_tokens=objective == "mapet")
    model.backbone_name = backbone
    model.timm_kwargs = kwargs
    return model


def export_backbone(model: PretrainModel, state_dict: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The backbone's weights: ``timm.create_model(name, **timm_kwargs)`` loads them strictly
    except for its classifier head (absent here; the backbone was built without one).
    ``state_dict``: the whole model's weights to take them from (default: the model's own)."""
    state = model.state_dict() if state_dict is None else state_dict
    return {name.removeprefix("backbone."): tensor.detach().clone() for name, tensor in state.items()
            if name.startswith("backbone.")}


def save_pretrain_model(model: PretrainModel, path: str | os.PathLike, provenance: dict | None = None,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write the whole pre-training model (backbone, mask token, token head) with its description
    and, optionally, where it came from (tokenizer, data version) as JSON under ``provenance``.
    ``state_dict``: the weights to write instead of the model's own (e.g. fp32 master weights)."""
    metadata = {"kind": "pretrain", "objective": model.objective, "backbone": model.backbone_name,
                "vocab_size": str(model.vocab_size), "timm_kwargs": json.dumps(model.timm_kwargs)}
    if provenance is not None:
        metadata["provenance"] = json.dumps(provenance)
    write_model_file(model.state_dict() if state_dict is None else state_dict, metadata, path)


def load_pretrain_model(path: str | os.PathLike) -> PretrainModel:
    tensors, meta = read_model_file(path, "pretrain")
    model = create_pretrain_model(meta["objective"], meta["backbone"], int(meta["vocab_size"]),
                                  **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(tensors)
    return model


def init_pretrain_model(model: PretrainModel, path: str | os.PathLike) -> None:
    """Start ``model`` from the weights of a pre-training model file (``mapet pretrain --init``):
    the same ViT and token count, whatever objective wrote it."""
    tensors, meta = read_model_file(path, "pretrain")
    if int(meta["vocab_size"]) != model.vocab_size:
        raise MapetError(f"{path}: predicts {meta['vocab_size']} tokens; the token file of this run has "
                         f"{model.vocab_size}")
    load_weights(model, tensors, Path(path))


def save_backbone(model: PretrainModel, path: str | os.PathLike,
                  state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """Write :func:`export_backbone` (of ``state_dict`` if given) as a safetensors file that timm can load."""
    write_model_file(export_backbone(model, state_dict), {"kind": "backbone", "backbone": model.backbone_name,
                                               "objective": model.objective,
                                               "timm_kwargs": json.dumps(model.timm_kwargs)}, path)


def load_backbone(model: VisionTransformer, path: str | os.PathLike) -> list[str]:
    """Load a backbone file into a timm ViT built for fine-tuning; returns the names loaded.

    Only the classifier (``head``) and, with average pooling, ``fc_norm`` may stay as initialised
    (the pre-training ``norm`` then goes unused, as in BEiT and MAE); any other missing or
    unexpected weight is an error, so nothing is silently re-initialised.
    """
    tensors, _ = read_model_file(path, "backbone")
    if isinstance(model.norm, torch.nn.Identity):
        tensors = {name: tensor for name, tensor in tensors.items() if not name.startswith("norm.")}
    result = model.load_state_dict(tensors, strict=False)
    fresh = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}
    missing = sorted(set(result.missing_keys) - fresh)
    if missing or result.unexpected_keys:
        raise MapetError(f"{path}: does not fit the model: missing {missing or 'nothing'}, "
                         f"unexpected {sorted(result.unexpected_keys) or 'nothing'}")
    return sorted(tensors)


def load_backbone_file(path: str | os.PathLike) -> VisionTransformer:
    """The ViT that a backbone file describes, with its weights and no classifier head."""
    tensors, meta = read_model_file(path, "backbone")
    model = timm.create_model(meta["backbone"], num_classes=0, **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(tensors)
    return model


def save_classifier(model: VisionTransformer, backbone: str, timm_kwargs: dict, classes: list[str],
                    path: str | os.PathLike, provenance: dict | None = None,
                    state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """A fine-tuned classifier with what rebuilds it: timm name, arguments, class names;
    ``state_dict``: the weights to write instead of the model's own (e.g. fp32 master weights)."""
    write_model_file(model.state_dict() if state_dict is None else state_dict,
          {"kind": "classifier", "backbone": backbone, "timm_kwargs": json.dumps(timm_kwargs),
           "classes": json.dumps(classes), "provenance": json.dumps(provenance or {})}, path)


def load_classifier(path: str | os.PathLike) -> tuple[VisionTransformer, list[str], dict]:
    tensors, meta = read_model_file(path, "classifier")
    model = timm.create_model(meta["backbone"], **json.loads(meta["timm_kwargs"]))
    model.load_state_dict(tensors)
    return model, json.loads(meta["classes"]), json.loads(meta.get("provenance", "{}"))
