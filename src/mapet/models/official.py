"""Checkpoints of the paper's own code (aimagelab/MaPeT) as this project's model files.

Two layouts, both timm-style state dicts (at the top level of the file or under ``state_dict``,
``model`` or ``state_dict_ema``; a ``module.`` prefix is dropped):

* the fine-tuned classifiers (``vit_standard_{tiny,small,base}_patch16_224``): a ViT whose
  attention is split into ``blocks.i.attn.q`` (dim -> dim) and ``blocks.i.attn.kv`` (dim -> 2 dim,
  the k rows then the v rows), with LayerScale (``ls1``/``ls2``), average pooling of the patch
  tokens and ``fc_norm`` (or, without ``fc_norm``, a final ``norm`` and the CLS token);
* the pre-training model (``XLeiTPositionalAugmented``): the same blocks and a final ``norm``, plus
  ``mask_positional_token`` (the mask embedding) and ``decoder`` (the token head).

timm fuses the projections into ``attn.qkv`` = [q; k; v], which computes the same function.
The ViT's size comes from the shapes; the number of heads, which no shape shows, is dim / 64 as in
every standard ViT unless given.
"""

from __future__ import annotations

import re
from pathlib import Path

import timm
import torch

from mapet.checkpoints import load_weights, read_state_dict
from mapet.errors import MapetError
from mapet.files import file_sha256

SIZE_NAMES = {192: "tiny", 384: "small", 768: "base", 1024: "large"}
BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(norm1|norm2|attn\.q|attn\.kv|attn\.proj|mlp\.fc1|mlp\.fc2)\.(weight|bias)$"
                       r"|blocks\.(\d+)\.(ls1|ls2)\.gamma$")
TRUNK_KEYS = {"cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"}
CLASSIFIER_KEYS = {"fc_norm.weight", "fc_norm.bias", "norm.weight", "norm.bias", "head.weight", "head.bias"}
PRETRAIN_KEYS = {"norm.weight", "norm.bias", "mask_positional_token", "decoder.weight", "decoder.bias"}


def vit_arguments(state: dict[str, torch.Tensor], path: Path, num_heads: int | None = None) -> dict:
    """timm VisionTransformer arguments that fit the shapes of ``state``."""
    for key in sorted(TRUNK_KEYS | {"blocks.0.attn.q.weight", "blocks.0.mlp.fc1.weight"}):
        if key not in state:
            raise MapetError(f"{path}: no {key!r}: not a checkpoint of the official MaPeT ViT")
    dim, _, patch, _ = state["patch_embed.proj.weight"].shape
    positions = state["pos_embed"].shape[1] - 1
    grid = round(positions ** 0.5)
    if grid * grid != positions:
        raise MapetError(f"{path}: 'pos_embed' has {positions + 1} rows, which is not 1 + a square grid of patches")
    depth = 1 + max(int(match.group(1) or match.group(4)) for key in state if (match := BLOCK_KEY.match(key)))
    heads = num_heads or dim // 64
    if not heads or dim % heads:
        raise MapetError(f"{path}: cannot tell the number of heads of a ViT of width {dim}: pass --num-heads")
    arguments = {"img_size": grid * patch, "patch_size": patch, "embed_dim": dim, "depth": depth, "num_heads": heads,
                 "mlp_ratio": state["blocks.0.mlp.fc1.weight"].shape[0] / dim, "qkv_bias": "blocks.0.attn.q.bias" in state,
                 "init_values": 0.1 if "blocks.0.ls1.gamma" in state else None}
    return arguments


def timm_name(arguments: dict) -> str:
    """The timm ViT of that size where timm has one; the explicit arguments make any name fit."""
    name = f"vit_{SIZE_NAMES.get(arguments['embed_dim'], 'base')}_patch{arguments['patch_size']}_{arguments['img_size']}"
    return name if timm.is_model(name) else "vit_base_patch16_224"


def fused_blocks(state: dict[str, torch.Tensor], path: Path, extra_keys: set[str]) -> dict[str, torch.Tensor]:
    """``state`` with each block's q and kv fused into timm's qkv; any key outside the layout
    (the trunk, the blocks and ``extra_keys``) is an error that names it."""
    unknown = sorted(key for key in state if key not in TRUNK_KEYS | extra_keys and not BLOCK_KEY.match(key))
    if unknown:
        raise MapetError(f"{path}: {len(unknown)} weight(s) outside the official MaPeT layout: {', '.join(unknown[:8])}")
    fused = {key: tensor for key, tensor in state.items() if ".attn.q." not in key and ".attn.kv." not in key}
    for key in (key for key in state if ".attn.q." in key):
        block, kind = key.split(".attn.q.")
        kv = state.get(f"{block}.attn.kv.{kind}")
        if kv is None:
            raise MapetError(f"{path}: {key!r} has no {block}.attn.kv.{kind!r} beside it")
        if kv.shape[0] != 2 * state[key].shape[0]:
            raise MapetError(f"{path}: {block}.attn.kv.{kind!r} has {kv.shape[0]} rows, expected 2 x "
                             f"{state[key].shape[0]} (k then v)")
        fused[f"{block}.attn.qkv.{kind}"] = torch.cat([state[key], kv])
    orphans = sorted(key for key in state if ".attn.kv." in key and key.replace(".kv.", ".q.") not in state)
    if orphans:
        raise MapetError(f"{path}: {orphans[0]!r} has no q projection beside it")
    return fused


def import_official_mapet(source: Path, out: Path, classes: list[str] | None = None,
                          num_heads: int | None = None) -> str:
    """Writes ``out`` (a classifier or a pre-training model file, whichever ``source`` holds);
    returns a one-line description."""
    from mapet.models import create_pretrain_model, save_classifier, save_pretrain_model

    source, out = Path(source), Path(out)
    state, where = read_state_dict(source)
    arguments = vit_arguments(state, source, num_heads)
    name = timm_name(arguments)
    provenance = {"imported": {"from": "official-mapet", "source": str(source), "sha256": file_sha256(source),
                               "weights": where}}
    if "decoder.weight" in state:
        weights = fused_blocks(state, source, PRETRAIN_KEYS)
        model = create_pretrain_model("mapet", name, state["decoder.weight"].shape[0], drop_path_rate=0.0, **arguments)
        renamed = {"mask_token": weights.pop("mask_positional_token"), "token_head.weight": weights.pop("decoder.weight"),
                   "token_head.bias": weights.pop("decoder.bias", None),
                   **{f"backbone.{key}": tensor for key, tensor in weights.items()}}
        load_weights(model, {key: tensor for key, tensor in renamed.items() if tensor is not None}, source)
        save_pretrain_model(model, out, provenance)
        return (f"{out}: MaPeT pre-training model, {name} ({arguments['depth']} blocks, width {arguments['embed_dim']}, "
                f"{arguments['num_heads']} heads), {model.vocab_size} tokens; from {where} of {source}")
    if "head.weight" not in state:
        raise MapetError(f"{source}: neither a classifier ('head.weight') nor a pre-training model ('decoder.weight')")
    num_classes = state["head.weight"].shape[0]
    classes = classes or [f"class_{index}" for index in range(num_classes)]
    if len(classes) != num_classes:
        raise MapetError(f"{source}: the head has {num_classes} classes, the class names given are {len(classes)}")
    pooling = "avg" if "fc_norm.weight" in state else "token"
    kwargs = {**arguments, "num_classes": num_classes, "global_pool": pooling, "drop_path_rate": 0.0}
    model = timm.create_model(name, **kwargs)
    load_weights(model, fused_blocks(state, source, CLASSIFIER_KEYS), source)
    save_classifier(model, name, kwargs, classes, out, provenance)
    return (f"{out}: classifier, {name} ({arguments['depth']} blocks, width {arguments['embed_dim']}, "
            f"{arguments['num_heads']} heads, {pooling} pooling), {num_classes} classes; from {where} of {source}")
