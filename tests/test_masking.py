import functools
import math

import numpy as np
import pytest
import torch

from mapet.masking import (blockwise_orders, default_num_predict, random_orders, ranks_from_orders,
                           sample_orders, two_stream_mask)

# METHOD.md section 4, verbatim: T = 6 tokens (t0 = CLS), order t0 t2 t4 t3 t5 t1, 3 context.
CONTENT_TABLE = """
t0 1 0 1 0 1 0 1 1 1
t1 1 1 1 1 1 1 0 0 0
t2 1 0 1 0 1 0 1 1 1
t3 1 0 1 1 1 0 1 0 1
t4 1 0 1 0 1 0 1 1 1
t5 1 0 1 1 1 1 1 0 0
m  1 0 1 0 1 0 1 1 1
"""
QUERY_TABLE = """
g1 1 0 1 1 1 1 1 0 0
g3 1 0 1 0 1 0 1 1 1
g5 1 0 1 1 1 0 1 0 1
"""
MASK_COLUMNS_BY_POSITION = {1: 6, 3: 7, 5: 8}  # columns m1, m3, m5 of the tables


def parse(table):
    return {line.split()[0]: [int(v) for v in line.split()[1:]] for line in table.strip().splitlines()}


def worked_example():
    order = torch.tensor([[1, 3, 2, 4, 0]])  # patches t2 t4 t3 t5 t1 (patch k is token t(k+1))
    return order, ranks_from_orders(order), 3  # num_predict


def test_ranks_from_orders_matches_worked_example():
    _, ranks, _ = worked_example()
    assert ranks.tolist() == [[0, 5, 1, 3, 2, 4]]


@pytest.mark.parametrize("mask_tokens", [True, False])
def test_masks_reproduce_worked_example(mask_tokens):
    order, ranks, num_predict = worked_example()
    mask = two_stream_mask(ranks, num_predict, mask_tokens)[0].int()
    content, query = parse(CONTENT_TABLE), parse(QUERY_TABLE)
    predicted_tokens = (order[0, -num_predict:] + 1).tolist()  # [3, 5, 1], prediction order
    # Our mask-token columns and rows are in prediction order; the tables list them by position.
    columns = list(range(6)) + ([MASK_COLUMNS_BY_POSITION[t] for t in predicted_tokens] if mask_tokens else [])
    expected_rows = [[content[f"t{i}"][c] for c in columns] for i in range(6)]
    if mask_tokens:
        expected_rows += [[content["m"][c] for c in columns]] * num_predict
    expected_rows += [[query[f"g{t}"][c] for c in columns] for t in predicted_tokens]
    assert mask.tolist() == expected_rows


def test_mask_is_per_sample_and_shared_shape():
    orders = random_orders(4, 9, torch.Generator().manual_seed(0))
    mask = two_stream_mask(ranks_from_orders(orders), 5, True)
    assert mask.shape == (4, 10 + 2 * 5, 10 + 5) and mask.dtype == torch.bool
    assert not torch.equal(mask[0], mask[1])


def test_default_num_predict():
    assert default_num_predict("mapet", 196) == 147
    assert default_num_predict("plm", 49) == 37
    assert default_num_predict("mim", 196) == 78


def test_random_orders_are_seeded_permutations():
    a = random_orders(8, 49, torch.Generator().manual_seed(3))
    b = random_orders(8, 49, torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    assert torch.equal(a.sort(dim=1).values, torch.arange(49).expand(8, -1))
    assert len({tuple(row) for row in a.tolist()}) == 8


def _reference_blockwise_mask(grid, num_masked, min_block, max_aspect, generator):
    """Test oracle: the per-image BEiT sampler that blockwise_orders replaced. (H * W,) bool."""
    height, width = grid
    mask = torch.zeros(height, width, dtype=torch.bool)

    def uniform(low, high):
        return low + (high - low) * torch.rand((), generator=generator).item()

    def randint(high):
        return int(torch.randint(high, (), generator=generator).item())

    failures = 0
    while int(mask.sum()) < num_masked and failures < 10:
        remaining = num_masked - int(mask.sum())
        area = uniform(min(min_block, remaining), remaining)
        aspect = math.exp(uniform(-math.log(max_aspect), math.log(max_aspect)))
        h = round(math.sqrt(area * aspect))
        w = round(math.sqrt(area / aspect))
        if not (0 < h <= height and 0 < w <= width):
            failures += 1
            continue
        top, left = randint(height - h + 1), randint(width - w + 1)
        block = mask[top:top + h, left:left + w]
        new = int((~block).sum())
        if 0 < new <= remaining:
            block.fill_(True)
            failures = 0
        else:
            failures += 1
    flat = mask.flatten()
    missing = num_masked - int(flat.sum())
    if missing > 0:
        free = (~flat).nonzero().squeeze(1)
        flat[free[torch.randperm(free.numel(), generator=generator)[:missing]]] = True
    return flat


def _reference_blockwise_orders(batch_size, grid, num_predict, generator, min_block, max_aspect=1 / 0.3):
    masks = torch.stack([_reference_blockwise_mask(grid, num_predict, min_block, max_aspect, generator)
                         for _ in range(batch_size)])
    tiebreak = torch.rand(batch_size, grid[0] * grid[1], generator=generator)
    return (masks.float() + tiebreak).argsort(dim=1)


def predicted_masks(orders, grid, num_predict):
    """(B, N) orders -> (B, H, W) bool, True where the patch is predicted."""
    masks = np.zeros(orders.shape, dtype=bool)
    np.put_along_axis(masks, orders[:, orders.shape[1] - num_predict:].numpy(), True, axis=1)
    return masks.reshape(-1, *grid)


def components(masks):
    """(B, H, W) bool -> (B,) number of 4-connected masked components, (B,) size of the largest."""
    batch_size, height, width = masks.shape
    none = height * width
    labels = np.where(masks, np.arange(none).reshape(height, width), none)
    while True:  # every masked patch takes the smallest label of its component
        padded = np.pad(labels, ((0, 0), (1, 1), (1, 1)), constant_values=none)
        smallest = np.minimum.reduce([labels, padded[:, :-2, 1:-1], padded[:, 2:, 1:-1],
                                      padded[:, 1:-1, :-2], padded[:, 1:-1, 2:]])
        smallest = np.where(masks, smallest, none)
        if np.array_equal(smallest, labels):
            break
        labels = smallest
    sizes = np.stack([np.bincount(row, minlength=none + 1)[:none] for row in labels.reshape(batch_size, -1)])
    return (sizes > 0).sum(axis=1), sizes.max(axis=1)


def ks_statistic(a, b):
    values = np.union1d(a, b)
    cdf = lambda x: np.searchsorted(np.sort(x), values, side="right") / len(x)  # noqa: E731
    return np.abs(cdf(a) - cdf(b)).max()


DISTRIBUTION_DRAWS = 2000
# (grid, num_predict, min_block): the paper's 14x14 with 40 % masked, the demo's 7x7, and a 4x4 grid
# so full that most rows end with random fill.
DISTRIBUTION_CASES = [((14, 14), 78, 16), ((7, 7), 20, 4), ((4, 4), 15, 4)]


@functools.cache
def new_and_reference_masks(grid, num_predict, min_block):
    new = blockwise_orders(DISTRIBUTION_DRAWS, grid, num_predict, torch.Generator().manual_seed(1),
                           min_block=min_block)
    reference = _reference_blockwise_orders(DISTRIBUTION_DRAWS, grid, num_predict,
                                            torch.Generator().manual_seed(2), min_block)
    return predicted_masks(new, grid, num_predict), predicted_masks(reference, grid, num_predict)


@pytest.mark.parametrize("grid,num_predict,min_block", [
    ((14, 14), 78, 16), ((7, 7), 20, 4), ((7, 7), 0, 4), ((7, 7), 49, 4), ((4, 4), 15, 4),
    ((2, 2), 3, 16), ((1, 20), 16, 16)])
def test_blockwise_orders_are_permutations_with_num_predict_masked_last(grid, num_predict, min_block):
    n = grid[0] * grid[1]
    orders = blockwise_orders(64, grid, num_predict, torch.Generator().manual_seed(0), min_block=min_block)
    assert orders.dtype == torch.long
    assert torch.equal(orders.sort(dim=1).values, torch.arange(n).expand(64, -1))
    masks = predicted_masks(orders, grid, num_predict)
    assert (masks.sum(axis=(1, 2)) == num_predict).all()


@pytest.mark.parametrize("grid,num_predict,min_block", [((14, 14), 75, 16), ((7, 7), 20, 4)])
def test_blockwise_orders_mask_blocks_not_scattered_patches(grid, num_predict, min_block):
    masks = predicted_masks(blockwise_orders(16, grid, num_predict, torch.Generator().manual_seed(0),
                                             min_block=min_block), grid, num_predict)
    padded = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
    neighbours = padded[:, :-2, 1:-1] | padded[:, 2:, 1:-1] | padded[:, 1:-1, :-2] | padded[:, 1:-1, 2:]
    assert ((neighbours & masks).sum(axis=(1, 2)) >= 0.8 * num_predict).all()


def test_blockwise_orders_follow_the_generator():
    a, b, c = (blockwise_orders(32, (14, 14), 78, torch.Generator().manual_seed(seed)) for seed in (5, 5, 6))
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("grid,num_predict,min_block", DISTRIBUTION_CASES)
def test_blockwise_masking_frequency_matches_reference(grid, num_predict, min_block):
    new, reference = (masks.mean(axis=0) for masks in new_and_reference_masks(grid, num_predict, min_block))
    # Each position's frequency is a binomial proportion over 2,000 draws: 4.5 standard errors of
    # the difference (plus one draw of slack for positions that are almost never masked) keeps the
    # chance that any of up to 196 positions fails by luck near 1e-3.
    pooled = (new + reference) / 2
    tolerance = 4.5 * np.sqrt(2 * pooled * (1 - pooled) / DISTRIBUTION_DRAWS) + 1 / DISTRIBUTION_DRAWS
    assert (np.abs(new - reference) <= tolerance).all()


@pytest.mark.parametrize("grid,num_predict,min_block", DISTRIBUTION_CASES)
def test_blockwise_components_match_reference(grid, num_predict, min_block):
    n = DISTRIBUTION_DRAWS
    new, reference = (components(masks) for masks in new_and_reference_masks(grid, num_predict, min_block))
    # Number of connected masked components, and the size of the largest: the means agree within 4
    # standard errors of their difference, and the whole distributions (every quantile) pass a
    # two-sample Kolmogorov-Smirnov test at 1e-4 (conservative for these discrete values).
    ks_critical = math.sqrt(-math.log(1e-4 / 2) * (2 / n) / 2)
    for a, b in zip(new, reference):
        assert abs(a.mean() - b.mean()) <= 4 * math.sqrt((a.var() + b.var()) / n)
        assert ks_statistic(a, b) <= ks_critical


def test_blockwise_prediction_order_is_independent_of_the_mask():
    # Given its masked set, a row's prediction order is a uniform permutation of it: the first and
    # the last predicted patch have as many masked neighbours as the row's masked patches on
    # average. On a nearly full 4x4 grid most rows end with random fill, whose isolated patches
    # would bunch at one end if the rectangles' patches and the fill were not shuffled together.
    grid, num_predict, n = (4, 4), 15, DISTRIBUTION_DRAWS
    orders = blockwise_orders(n, grid, num_predict, torch.Generator().manual_seed(3), min_block=4)
    padded = np.pad(predicted_masks(orders, grid, num_predict), ((0, 0), (1, 1), (1, 1))).astype(int)
    neighbours = padded[:, :-2, 1:-1] + padded[:, 2:, 1:-1] + padded[:, 1:-1, :-2] + padded[:, 1:-1, 2:]
    in_order = np.take_along_axis(neighbours.reshape(n, -1), orders[:, -num_predict:].numpy(), axis=1)
    for position in (0, num_predict - 1):
        excess = in_order[:, position] - in_order.mean(axis=1)
        assert abs(excess.mean()) <= 4 * excess.std() / math.sqrt(n)


def test_blockwise_without_room_for_a_block_masks_uniformly_at_random():
    # On a 1x20 strip no 16-patch rectangle has an aspect ratio within [0.3, 1/0.3]: every row
    # fails ten draws and masks 16 of its 20 patches uniformly at random.
    orders = blockwise_orders(DISTRIBUTION_DRAWS, (1, 20), 16, torch.Generator().manual_seed(0))
    frequency = predicted_masks(orders, (1, 20), 16).mean(axis=0)
    assert np.abs(frequency - 0.8).max() <= 4.5 * math.sqrt(0.8 * 0.2 / DISTRIBUTION_DRAWS)


def test_blockwise_orders_without_predictions_or_context():
    # Nothing to split: both are uniformly random permutations. Each patch comes first with
    # probability 1/49; 4.5 binomial standard errors over 2,000 rows.
    n, probability = DISTRIBUTION_DRAWS, 1 / 49
    for num_predict in (0, 49):
        orders = blockwise_orders(n, (7, 7), num_predict, torch.Generator().manual_seed(4), min_block=4)
        assert torch.equal(orders.sort(dim=1).values, torch.arange(49).expand(n, -1))
        first = np.bincount(orders[:, 0].numpy(), minlength=49) / n
        assert np.abs(first - probability).max() <= 4.5 * math.sqrt(probability * (1 - probability) / n)


def test_sample_orders_rejects_bad_arguments():
    with pytest.raises(ValueError, match="objective"):
        sample_orders("bert", 2, (7, 7), 10)
    with pytest.raises(ValueError, match="num_predict"):
        sample_orders("mapet", 2, (7, 7), 50)
