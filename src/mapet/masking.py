"""Prediction orders and the attention masks they imply.

An *order* is a (B, N) long tensor; each row is a permutation of the N patch indices (0-based,
raster order, CLS excluded). The last ``num_predict`` entries of a row are the patches to
predict, in prediction order; the others are context. CLS is always context.

*Ranks* say the same thing per token: with T = 1 + N tokens (CLS first, then patches in raster
order), ``ranks[b, k]`` is the position of token k in the order, CLS having rank 0. With
``num_context = T - num_predict``, a token is context iff its rank is below ``num_context``.

Every attention rule of the two-stream model (METHOD.md section 4) reduces to comparing ranks.
Give each query row a *row rank* rho and each key a *key rank* kappa:

    content key k allowed  <=>  kappa_k <= max(rho, num_context - 1)
    mask key m_j allowed   <=>  kappa_j > rho          (kappa_j = rank of m_j's position)

    row                                      rho
    content token i (context or predicted)   rank(i)
    mask token m_l (content stream)          num_context - 1
    query row g for position p               rank(p) - 1

Worked example of METHOD.md (T = 6, num_context = 3, order t0 t2 t4 t3 t5 t1):

    content row   t0 t1 t2 t3 t4 t5 | m3 m5 m1        query row   t0 t1 t2 t3 t4 t5 | m3 m5 m1
    t3 (rho 3)     1  0  1  1  1  0 |  0  1  1        g(t3) rho 2  1  0  1  0  1  0 |  1  1  1
    t5 (rho 4)     1  0  1  1  1  1 |  0  0  1        g(t5) rho 3  1  0  1  1  1  0 |  0  1  1
    t1 (rho 5)     1  1  1  1  1  1 |  0  0  0        g(t1) rho 4  1  0  1  1  1  1 |  0  0  1
    context rows   1  0  1  0  1  0 |  1  1  1
    mask rows      1  0  1  0  1  0 |  1  1  1
"""

from __future__ import annotations

import math

import numpy as np
import torch

OBJECTIVES = ("mapet", "plm", "mim")
PERMUTED_PREDICT_RATIO = 0.75
MIM_MASK_RATIO = 0.4


def default_num_predict(objective: str, num_patches: int) -> int:
    """75 % of the patches for mapet/plm (147 of 196), about 40 % for mim (78 of 196)."""
    ratio = MIM_MASK_RATIO if objective == "mim" else PERMUTED_PREDICT_RATIO
    return round(ratio * num_patches)


def random_orders(batch_size: int, num_patches: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Uniformly random permutations, one per row: (B, N) long on the generator's device."""
    device = generator.device if generator is not None else None
    return torch.rand(batch_size, num_patches, generator=generator, device=device).argsort(dim=1)


def blockwise_orders(batch_size: int, grid: tuple[int, int], num_predict: int,
                     generator: torch.Generator | None = None, min_block: int = 16,
                     max_aspect: float = 1 / 0.3) -> torch.Tensor:
    """Orders for MIM: each row lists its unmasked patches, then its ``num_predict`` masked ones.

    Both parts are in random order; the masked set is a BEiT block-wise mask. Every row draws
    rectangles of at least ``min_block`` patches with aspect ratio in [1/max_aspect, max_aspect],
    keeping those that add patches without passing the target, until it is reached; a row whose
    last ten draws added nothing (a small grid that is nearly full) gets its remaining patches
    uniformly at random. All rows draw at once. Returns (B, N) long, N = H * W; uses a CPU generator.
    """
    height, width = grid
    num_patches = height * width
    grid_rows, grid_cols = np.arange(height), np.arange(width)
    masked = np.zeros((batch_size, height, width), dtype=bool)
    rows = np.arange(batch_size if num_predict > 0 else 0)  # rows still drawing rectangles
    remaining = np.full(len(rows), num_predict)
    failures = np.zeros(len(rows), dtype=np.int64)
    log_aspect = math.log(max_aspect)
    while len(rows):
        u = torch.rand(len(rows), 4, generator=generator, dtype=torch.float64).numpy()
        low = np.minimum(remaining, min_block)
        area = low + (remaining - low) * u[:, 0]
        aspect = np.exp(log_aspect * (2 * u[:, 1] - 1))
        h = np.rint(np.sqrt(area * aspect)).astype(np.int64)
        w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
        top = (u[:, 2] * (height - h + 1)).astype(np.int64)
        left = (u[:, 3] * (width - w + 1)).astype(np.int64)
        block = (((grid_rows >= top[:, None]) & (grid_rows < (top + h)[:, None]))[:, :, None]
                 & ((grid_cols >= left[:, None]) & (grid_cols < (left + w)[:, None]))[:, None, :])
        new = h * w - np.count_nonzero(block & masked[rows], axis=(1, 2))
        accept = (h > 0) & (h <= height) & (w > 0) & (w <= width) & (new > 0) & (new <= remaining)
        masked[rows[accept]] |= block[accept]
        remaining = remaining - new * accept
        failures = np.where(accept, 0, failures + 1)
        keep = (remaining > 0) & (failures < 10)
        rows, remaining, failures = rows[keep], remaining[keep], failures[keep]
    # Masked patches sort last; the free ones with the largest keys fill what the rectangles left.
    # That puts the fill before the rectangles' patches, so the predicted part is shuffled again.
    keys = torch.rand(batch_size, num_patches, generator=generator, dtype=torch.float64).numpy()
    order = (keys + 2 * masked.reshape(batch_size, num_patches)).argsort(axis=1)
    num_context = num_patches - num_predict
    shuffle = torch.rand(batch_size, num_predict, generator=generator, dtype=torch.float64).numpy()
    order[:, num_context:] = np.take_along_axis(order[:, num_context:], shuffle.argsort(axis=1), axis=1)
    return torch.from_numpy(order)


def sample_orders(objective: str, batch_size: int, grid: tuple[int, int], num_predict: int,
                  generator: torch.Generator | None = None, min_block: int = 16) -> torch.Tensor:
    """Orders for one batch: uniform permutations for mapet/plm, block-wise masks for mim."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    num_patches = grid[0] * grid[1]
    if not 0 <= num_predict <= num_patches:
        raise ValueError(f"num_predict must be within 0..{num_patches}, got {num_predict}")
    if objective == "mim":
        return blockwise_orders(batch_size, grid, num_predict, generator, min_block)
    return random_orders(batch_size, num_patches, generator)


def ranks_from_orders(orders: torch.Tensor) -> torch.Tensor:
    """(B, N) orders -> (B, 1 + N) ranks of CLS + patches in raster order (CLS has rank 0)."""
    batch_size, num_patches = orders.shape
    ranks = torch.zeros(batch_size, 1 + num_patches, dtype=torch.long, device=orders.device)
    positions = torch.arange(1, num_patches + 1, device=orders.device).expand(batch_size, -1)
    ranks.scatter_(1, orders + 1, positions)
    return ranks


def two_stream_mask(ranks: torch.Tensor, num_predict: int, mask_tokens: bool) -> torch.Tensor:
    """Boolean attention mask (True = may attend) of the two-stream model.

    ranks: (B, T) rank of each content token in the order the content stream holds them.
    Rows: the T content tokens, then (if ``mask_tokens``, MaPeT) the M mask tokens, then the M
    query rows; mask tokens and query rows are both in prediction order. Columns (keys): the T
    content tokens, then the M mask tokens. Shape (B, T + 2M, T + M) for MaPeT, (B, T + M, T)
    for PLM (no mask tokens). The same mask serves every head.
    """
    batch_size, num_tokens = ranks.shape
    num_context = num_tokens - num_predict
    predicted_ranks = torch.arange(num_context, num_tokens, device=ranks.device).expand(batch_size, -1)
    row_ranks = [ranks]
    if mask_tokens:
        row_ranks.append(torch.full_like(predicted_ranks, num_context - 1))
    row_ranks.append(predicted_ranks - 1)
    rho = torch.cat(row_ranks, dim=1)[:, :, None]
    allowed = ranks[:, None, :] <= rho.clamp(min=num_context - 1)
    if mask_tokens:
        allowed = torch.cat([allowed, predicted_ranks[:, None, :] > rho], dim=2)
    return allowed
