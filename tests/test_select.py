import doctest
import itertools

import pytest
import torch
from scipy import stats

import diffcp.select as select_module
from diffcp import checks
from diffcp.select import select_all, select_mask, select_random


def naive_valid(lengths, size):
    return torch.tensor([[i < int(n) for i in range(size)] for n in lengths])


def test_doctests():
    assert doctest.testmod(select_module).failed == 0


def test_select_all_matches_naive():
    lengths = torch.tensor([1, 4, 7, 3])
    assert torch.equal(select_all(lengths, 7), naive_valid(lengths, 7))


@pytest.mark.parametrize("num", [1, 3, 6, 50])
def test_select_random_counts_and_padding(num):
    lengths = torch.tensor([1, 2, 5, 9, 20])
    g = torch.Generator().manual_seed(1)
    mask = select_random(lengths, 20, num, generator=g)
    assert mask.dtype == torch.bool and mask.shape == (5, 20)
    expected = torch.clamp(lengths, max=num)
    assert torch.equal(mask.sum(1), expected)
    assert not (mask & ~naive_valid(lengths, 20)).any()


def test_select_random_deterministic_with_generator():
    lengths = torch.tensor([30, 17, 25])
    a = select_random(lengths, 30, 8, generator=torch.Generator().manual_seed(7))
    b = select_random(lengths, 30, 8, generator=torch.Generator().manual_seed(7))
    c = select_random(lengths, 30, 8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_select_random_rows_are_independent():
    lengths = torch.full((50,), 40)
    mask = select_random(lengths, 40, 5, generator=torch.Generator().manual_seed(3))
    assert len({tuple(row.tolist()) for row in mask}) > 45  # identical rows would betray a shared draw


def test_select_random_uniform_over_subsets():
    # every 2-subset of 5 valid points (in a cloud padded to 8) is equally likely: chi-square test
    rows = 20000
    lengths = torch.full((rows,), 5)
    mask = select_random(lengths, 8, 2, generator=torch.Generator().manual_seed(0))
    assert not mask[:, 5:].any()
    subsets = list(itertools.combinations(range(5), 2))
    code = (mask[:, :5].long() * (2 ** torch.arange(5))).sum(1)
    counts = [int((code == (1 << i) + (1 << j)).sum()) for i, j in subsets]
    assert sum(counts) == rows
    assert stats.chisquare(counts).pvalue > 1e-4


def test_select_random_inclusion_probability_per_length():
    # mixed lengths in one batch: each valid point is chosen with probability num / length
    reps = 4000
    lengths = torch.tensor([4, 10, 16]).repeat(reps)
    mask = select_random(lengths, 16, 3, generator=torch.Generator().manual_seed(5))
    for k, n in enumerate([4, 10, 16]):
        freq = mask[k::3, :n].double().mean(0)
        se = (3 / n * (1 - 3 / n) / reps) ** 0.5
        assert torch.allclose(freq, torch.full_like(freq, 3 / n), atol=5 * se)


def test_select_mask_clears_padding_and_validates():
    m = torch.tensor([[True, False, True, True], [False, True, True, True]])
    out = select_mask(m, torch.tensor([3, 2]))
    assert torch.equal(out, torch.tensor([[True, False, True, False], [False, True, False, False]]))
    assert torch.equal(select_mask(m), m)
    with pytest.raises(TypeError, match="mask"):
        select_mask(m.float())
    with pytest.raises(ValueError, match="mask"):
        select_mask(m[0])
    with pytest.raises(ValueError, match="lengths"):
        select_mask(m, torch.tensor([3, 2, 1]))
    with pytest.raises(ValueError, match="at least one valid point"):
        select_mask(m, torch.tensor([1, 1]))


def test_select_mask_empty_row_allowed_when_checks_disabled(monkeypatch):
    monkeypatch.setattr(checks, "ENABLED", False)
    m = torch.tensor([[False, False], [True, False]])
    assert torch.equal(select_mask(m), m)


def test_bad_arguments():
    with pytest.raises(TypeError, match="lengths"):
        select_all(torch.tensor([2.0]), 3)
    with pytest.raises(TypeError, match="lengths"):
        select_all([2], 3)
    with pytest.raises(ValueError, match="lengths"):
        select_all(torch.tensor([4]), 3)
    with pytest.raises(ValueError, match="lengths"):
        select_all(torch.tensor([[2]]), 3)
    with pytest.raises(ValueError, match="size"):
        select_all(torch.tensor([2]), 0)
    with pytest.raises(ValueError, match="num"):
        select_random(torch.tensor([2]), 3, 0)
    with pytest.raises(TypeError, match="num"):
        select_random(torch.tensor([2]), 3, 1.5)
