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


@pytest.mark.parametrize("grid,num_predict,min_block", [((14, 14), 75, 16), ((7, 7), 20, 4), ((7, 7), 49, 4)])
def test_blockwise_orders_mask_exactly_num_predict_in_blocks(grid, num_predict, min_block):
    generator = torch.Generator().manual_seed(0)
    orders = blockwise_orders(16, grid, num_predict, generator, min_block=min_block)
    n = grid[0] * grid[1]
    assert torch.equal(orders.sort(dim=1).values, torch.arange(n).expand(16, -1))
    for row in orders:
        masked = torch.zeros(n, dtype=torch.bool)
        masked[row[n - num_predict:]] = True
        assert int(masked.sum()) == num_predict
        if num_predict < n:
            # block-wise, not scattered: most masked patches have a masked 4-neighbour
            image = masked.view(grid)
            padded = torch.nn.functional.pad(image[None, None].float(), (1, 1, 1, 1))[0, 0].bool()
            neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
            assert (neighbours & image).sum() >= 0.8 * num_predict


def test_sample_orders_rejects_bad_arguments():
    with pytest.raises(ValueError, match="objective"):
        sample_orders("bert", 2, (7, 7), 10)
    with pytest.raises(ValueError, match="num_predict"):
        sample_orders("mapet", 2, (7, 7), 50)
