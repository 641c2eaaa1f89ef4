import random

import pytest

from rerank_core.batching import plan_batches, plan_packed


def _cost(batch, lengths):
    return len(batch) * max(lengths[i] for i in batch)


@pytest.mark.parametrize("seed", range(5))
def test_every_index_once_and_budgets_respected(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 200))]
    batches = plan_batches(lengths, max_tokens=1000, max_rows=16)
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(len(lengths)))
    for batch in batches:
        assert len(batch) <= 16
        assert _cost(batch, lengths) <= 1000


def test_sorted_longest_first_so_similar_lengths_share_batches():
    lengths = [5, 100, 6, 99, 7, 98]
    batches = plan_batches(lengths, max_tokens=300, max_rows=8)
    assert batches == [[1, 3, 5], [4, 2, 0]]


def test_ties_keep_lower_index_first():
    assert plan_batches([3, 3, 3], max_tokens=100, max_rows=2) == [[0, 1], [2]]


def test_over_budget_row_runs_alone():
    lengths = [10, 5000, 10]
    batches = plan_batches(lengths, max_tokens=100, max_rows=8)
    assert batches == [[1], [0, 2]]


def test_row_cap_splits_equal_rows():
    batches = plan_batches([1] * 10, max_tokens=10_000, max_rows=4)
    assert [len(b) for b in batches] == [4, 4, 2]


def test_restoring_order_from_plan():
    lengths = [4, 1, 9, 2, 7]
    values = {}
    for batch in plan_batches(lengths, max_tokens=10, max_rows=3):
        for i in batch:
            values[i] = lengths[i] * 10
    assert [values[i] for i in range(len(lengths))] == [40, 10, 90, 20, 70]


def test_empty_input_gives_no_batches():
    assert plan_batches([], max_tokens=10, max_rows=2) == []


@pytest.mark.parametrize("tokens,rows", [(0, 1), (1, 0), (-5, 3)])
def test_bad_budget_is_an_error(tokens, rows):
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_batches([1, 2], max_tokens=tokens, max_rows=rows)


def test_padding_share_caps_each_batch():
    lengths = [100, 95, 90, 50, 48, 10]
    batches = plan_batches(lengths, max_tokens=10_000, max_rows=8, max_padding=0.1)
    assert batches == [[0, 1, 2], [3, 4], [5]]
    for batch in batches:
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded - sum(lengths[i] for i in batch) <= 0.1 * padded


def test_zero_padding_batches_only_equal_lengths():
    assert plan_batches([7, 5, 7, 5, 6], max_tokens=100, max_rows=8, max_padding=0.0) == [[0, 2], [4], [1, 3]]


@pytest.mark.parametrize("seed", range(3))
def test_padding_cap_on_random_lengths(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 500) for _ in range(300)]
    for batch in plan_batches(lengths, max_tokens=4096, max_rows=32, max_padding=0.2):
        padded = len(batch) * max(lengths[i] for i in batch)
        assert padded - sum(lengths[i] for i in batch) <= 0.2 * padded or len(batch) == 1


def test_bad_padding_share_is_an_error():
    with pytest.raises(ValueError, match="max_padding must be in"):
        plan_batches([1], max_tokens=10, max_rows=2, max_padding=1.5)


@pytest.mark.parametrize("seed", range(5))
def test_packed_every_index_once_and_budgets_respected(seed):
    rng = random.Random(seed)
    lengths = [rng.randint(1, 300) for _ in range(rng.randint(1, 200))]
    passes = plan_packed(lengths, max_tokens=1000, max_rows=16)
    assert sorted(i for p in passes for i in p) == list(range(len(lengths)))
    for members in passes:
        assert len(members) <= 16
        assert sum(lengths[i] for i in members) <= 1000
        assert [lengths[i] for i in members] == sorted((lengths[i] for i in members), reverse=True)


def test_packed_first_fit_fills_earlier_passes():
    # Longest first: 60 opens pass 0, 50 does not fit beside it and opens pass 1, 40 fills pass 0,
    # 30 and then 20 fill pass 1. (Taking rows in sorted order into one open pass would need 3.)
    assert plan_packed([20, 40, 60, 30, 50], max_tokens=100, max_rows=8) == [[2, 1], [4, 3, 0]]
    # With 99 tokens, 60 + 40 no longer fit together.
    assert plan_packed([20, 40, 60, 30, 50], max_tokens=99, max_rows=8) == [[2, 3], [4, 1], [0]]


def test_packed_row_cap_and_over_budget_row():
    assert plan_packed([1, 1, 1], max_tokens=100, max_rows=2) == [[0, 1], [2]]
    assert plan_packed([10, 5000, 10], max_tokens=100, max_rows=8) == [[1], [0, 2]]


def test_packed_rejects_bad_budgets():
    with pytest.raises(ValueError, match="must be >= 1"):
        plan_packed([1], max_tokens=0, max_rows=1)
