"""Pre-training models around a stock timm VisionTransformer: MaPeT, PLM and MIM.

All three add only a learned mask embedding (``mask_token``) and a token head (``token_head``,
Linear(dim -> vocab)) to ``backbone``; every other weight is the backbone's own, so fine-tuning
loads the backbone as it is.

    logits = model(images, order, num_predict)      # (B, num_predict, vocab)

``logits[b, t]`` belongs to patch ``order[b, N - num_predict + t]`` (see mapet.masking).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import Attention
from timm.models.vision_transformer import Block, VisionTransformer
from torch import nn

from mapet.masking import ranks_from_orders, two_stream_mask


def _heads(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """(B, L, heads * head_dim) -> (B, heads, L, head_dim)"""
    return x.view(x.shape[0], x.shape[1], attn.num_heads, attn.head_dim).transpose(1, 2)


def _drop_path_draw(drop_path: nn.Module, like: torch.Tensor) -> torch.Tensor | None:
    """One per-image stochastic-depth factor (0 or 1/keep) to apply to both streams, or None."""
    if isinstance(drop_path, nn.Identity) or not drop_path.training:
        return None
    return drop_path(like.new_ones(like.shape[0], 1, 1))


def _residual(x: torch.Tensor, branch: torch.Tensor, draw: torch.Tensor | None) -> torch.Tensor:
    return x + (branch if draw is None else branch * draw)


def _two_stream_block(block: Block, x: torch.Tensor, prefix: int, rest_mask: torch.Tensor,
                      content_needed: bool = True) -> torch.Tensor:
    """One timm Block applied to both streams with its own weights.

    ``x`` holds the rows [content prefix | predicted content | query] (B, L, dim); keys and
    values come from the content rows only. The first ``prefix`` rows attend to each other and to
    nothing else, so they take plain unmasked attention; the predicted content rows and the
    query rows attend to all content rows under ``rest_mask`` (2M rows). Every other step of the
    block runs once over all rows, with one drop-path draw per image for both streams. Without
    ``content_needed`` (last block) only the query rows are computed and returned.
    """
    attn = block.attn
    width = attn.num_heads * attn.head_dim
    num_content = rest_mask.shape[1]
    weight_q, weight_kv = attn.qkv.weight.split([width, 2 * width])
    bias_q, bias_kv = attn.qkv.bias.split([width, 2 * width]) if attn.qkv.bias is not None else (None, None)
    dropout = attn.attn_drop.p if attn.training else 0.0

    normed = block.norm1(x)
    k, v = F.linear(normed[:, :num_content], weight_kv, bias_kv).split(width, dim=2)
    k, v = attn.k_norm(_heads(attn, k)), _heads(attn, v)
    if content_needed:
        q = attn.q_norm(_heads(attn, F.linear(normed, weight_q, bias_q)))
        out = torch.cat([F.scaled_dot_product_attention(q[:, :, :prefix], k[:, :, :prefix], v[:, :, :prefix],
                                                        dropout_p=dropout),
                         F.scaled_dot_product_attention(q[:, :, prefix:], k, v, attn_mask=rest_mask,
                                                        dropout_p=dropout)], dim=2)
    else:
        x, normed = x[:, num_content:], normed[:, num_content:]
        q = attn.q_norm(_heads(attn, F.linear(normed, weight_q, bias_q)))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=rest_mask[rest_mask.shape[0] - x.shape[1]:],
                                             dropout_p=dropout)
    out = attn.norm(out.transpose(1, 2).flatten(2))
    if attn.gate is not None:
        out = out * attn.gate(normed).sigmoid()
    x = _residual(x, block.ls1(attn.proj_drop(attn.proj(out))), _drop_path_draw(block.drop_path1, x))
    return _residual(x, block.ls2(block.mlp(block.norm2(x))), _drop_path_draw(block.drop_path2, x))


class PretrainModel(nn.Module):
    """The backbone plus what every objective adds: a mask embedding and a token head."""

    objective: str

    def __init__(self, backbone: VisionTransformer, vocab_size: int):
        super().__init__()
        if backbone.cls_token is None or backbone.num_prefix_tokens != 1 or backbone.no_embed_class:
            raise ValueError("pre-training needs a timm VisionTransformer with one CLS token, no register "
                             "tokens and a position embedding that covers CLS (class_token=True, reg_tokens=0, "
                             "no_embed_class=False)")
        if backbone.dynamic_img_size:
            raise ValueError("pre-training needs a fixed image size (dynamic_img_size=False)")
        if not all(type(block) is Block and type(block.attn) is Attention for block in backbone.blocks):
            raise ValueError("pre-training needs timm's standard Block and Attention in every layer")
        self.backbone = backbone
        self.vocab_size = vocab_size
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        self.token_head = nn.Linear(backbone.embed_dim, vocab_size)
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.token_head.weight, std=0.02)
        nn.init.zeros_(self.token_head.bias)

    @property
    def grid_size(self) -> tuple[int, int]:
        return tuple(self.backbone.patch_embed.grid_size)

    @property
    def num_patches(self) -> int:
        return self.backbone.patch_embed.num_patches

    def _check(self, images: torch.Tensor, order: torch.Tensor, num_predict: int) -> None:
        if order.shape != (images.shape[0], self.num_patches):
            raise ValueError(f"order must have shape (batch, num_patches) = ({images.shape[0]}, {self.num_patches}), "
                             f"got {tuple(order.shape)}")
        if not 0 <= num_predict <= self.num_patches:
            raise ValueError(f"num_predict must be within 0..{self.num_patches}, got {num_predict}")


class TwoStreamModel(PretrainModel):
    r"""MaPeT (``mask_tokens=True``) and PLM (``mask_tokens=False``): permuted prediction.

    With N patches, M of them predicted and C = 1 + N - M context tokens (CLS included), the
    streams are held in prediction order, each token carrying its own position embedding:

        content stream: [ CLS | C-1 context patches | M mask tokens (MaPeT) | M predicted patches ]
                          \________________ prefix ________________/
        query stream:   [ M query rows ]

    Both streams travel as one tensor, the query rows after the content rows, so every step of a
    block but attention (norms, projections, MLP, residuals) runs once over all rows.

    Mask tokens and query rows both start as ``mask_token + pos_embed[p]`` for the predicted
    positions p, in prediction order, so a token's rank is its place in the stream and one mask
    serves the whole batch and every head. The rules of METHOD.md section 4 are
    :func:`mapet.masking.two_stream_mask`; in this layout they say that the prefix attends to
    itself only (every position once: context by its pixels, predicted by its mask token, as in
    fine-tuning), so it takes plain attention, and only predicted content rows and query rows
    need a mask.
    """

    def __init__(self, backbone: VisionTransformer, vocab_size: int, mask_tokens: bool):
        super().__init__(backbone, vocab_size)
        self.mask_tokens = mask_tokens
        self.objective = "mapet" if mask_tokens else "plm"
        self._mask_cache: dict[tuple[int, torch.device], tuple[int, torch.Tensor]] = {}

    def _layout(self, num_predict: int, device: torch.device) -> torch.Tensor:
        """Index into this layout of each key of :func:`two_stream_mask` for ranks 0..N."""
        num_context = 1 + self.num_patches - num_predict
        shift = num_predict if self.mask_tokens else 0
        ranks = torch.arange(1 + self.num_patches, device=device)
        content = torch.where(ranks < num_context, ranks, ranks + shift)
        mask_tokens = torch.arange(num_context, num_context + shift, device=device)
        return torch.cat([content, mask_tokens])

    @torch.compiler.disable
    def _attention_masks(self, num_predict: int, device: torch.device) -> tuple[int, torch.Tensor]:
        """Prefix length, and the mask of the predicted content rows stacked over the query rows;
        built once per (num_predict, device) and reused, outside any compiled graph, which takes
        the mask as an input."""
        key = (num_predict, device)
        if key not in self._mask_cache:
            self._mask_cache[key] = self._build_attention_masks(num_predict, device)
        return self._mask_cache[key]

    def _build_attention_masks(self, num_predict: int, device: torch.device) -> tuple[int, torch.Tensor]:
        ranks_in_sequence = torch.arange(1 + self.num_patches, device=device)[None]
        mask = two_stream_mask(ranks_in_sequence, num_predict, self.mask_tokens)[0]
        mask = mask[:, self._layout(num_predict, device).argsort()]     # columns in stream order
        num_context = 1 + self.num_patches - num_predict
        rest = torch.cat([mask[num_context:1 + self.num_patches], mask[mask.shape[0] - num_predict:]])
        return mask.shape[1] - num_predict, rest

    def _streams(self, images: torch.Tensor, order: torch.Tensor, num_predict: int) -> torch.Tensor:
        """Both streams in one tensor (B, 1 + N [+ M] + M, dim): the content rows, then the query rows."""
        backbone = self.backbone
        batch, dim = images.shape[0], backbone.embed_dim
        num_context = 1 + self.num_patches - num_predict
        pos_cls, pos_patches = backbone.pos_embed[:, :1], backbone.pos_embed[:, 1:]
        patches = backbone.patch_embed(images) + pos_patches                       # (B, N, dim)
        patches = patches.gather(1, order[:, :, None].expand(-1, -1, dim))         # rank order
        query = self.mask_token + pos_patches[0][order[:, num_context - 1:]]       # (B, M, dim)
        cls = (backbone.cls_token + pos_cls).expand(batch, -1, -1)
        context, predicted = patches[:, :num_context - 1], patches[:, num_context - 1:]
        rows = [cls, context, query, predicted, query] if self.mask_tokens else [cls, context, predicted, query]
        return backbone.norm_pre(backbone.pos_drop(torch.cat(rows, dim=1)))

    def forward(self, images: torch.Tensor, order: torch.Tensor, num_predict: int) -> torch.Tensor:
        self._check(images, order, num_predict)
        masks = self._attention_masks(num_predict, images.device)
        x = self._streams(images, order, num_predict)
        *blocks, last = self.backbone.blocks
        for block in blocks:
            x = _two_stream_block(block, x, *masks)
        return self.token_head(self.backbone.norm(_two_stream_block(last, x, *masks, content_needed=False)))

    def forward_features(self, images: torch.Tensor, order: torch.Tensor,
                         num_predict: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams after the final norm: content (B, 1 + N, dim) in raster order, query (B, M, dim)."""
        self._check(images, order, num_predict)
        masks = self._attention_masks(num_predict, images.device)
        x = self._streams(images, order, num_predict)
        for block in self.backbone.blocks:
            x = _two_stream_block(block, x, *masks)
        x = self.backbone.norm(x)
        content, query = x[:, :masks[1].shape[1]], x[:, masks[1].shape[1]:]
        stream_index = self._layout(num_predict, images.device)[ranks_from_orders(order)]  # (B, 1 + N)
        return content.gather(1, stream_index[:, :, None].expand(-1, -1, content.shape[2])), query


class MaskedImageModel(PretrainModel):
    """MIM (BEiT): masked patches replaced by ``mask_token``, one stream, full attention."""

    objective = "mim"

    def forward(self, images: torch.Tensor, order: torch.Tensor, num_predict: int) -> torch.Tensor:
        self._check(images, order, num_predict)
        backbone = self.backbone
        batch, dim = images.shape[0], backbone.embed_dim
        predicted = order[:, self.num_patches - num_predict:]                      # (B, M)
        masked = torch.zeros(order.shape, dtype=torch.bool, device=order.device).scatter_(1, predicted, True)
        patches = torch.where(masked[:, :, None], self.mask_token, backbone.patch_embed(images))
        cls = backbone.cls_token.expand(batch, -1, -1)
        x = torch.cat([cls, patches], dim=1) + backbone.pos_embed
        x = backbone.blocks(backbone.norm_pre(backbone.pos_drop(x)))
        x = x.gather(1, (predicted + 1)[:, :, None].expand(-1, -1, dim))
        return self.token_head(backbone.norm(x))
