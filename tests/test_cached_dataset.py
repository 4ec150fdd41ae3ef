"""CachedDataset / cache_dataset: the same items as the source dataset, decoded once."""

import pytest
import torch
from torch.utils.data import TensorDataset

from pml_crt.datasets import CachedDataset, cache_dataset


def _source():
    generator = torch.Generator().manual_seed(0)
    return TensorDataset(torch.randn(10, 3, 4, generator=generator), torch.arange(10) % 3)


def test_items_equal_the_source_and_transform_runs_on_access():
    source = _source()
    cached = cache_dataset(source, transform=lambda x: 2 * x, batch_size=4, progress=False)
    assert len(cached) == 10 and cached.labels == [i % 3 for i in range(10)]
    for i in range(10):
        x, y = cached[i]
        assert torch.equal(x, 2 * source[i][0]) and y == int(source[i][1])


def test_map_batch_is_applied_while_caching():
    source = _source()
    cached = cache_dataset(source, map_batch=lambda x: x.sum(dim=-1), batch_size=3, progress=False)
    assert cached.data.shape == (10, 3)
    # A batch's sum and one item's may add the 4 terms in different orders: each is
    # within 3 u of the sum of |terms| (u = eps / 2), so they are within 3 eps of it.
    item = source[7][0]
    bound = 3 * torch.finfo(item.dtype).eps * item.abs().sum(dim=-1)
    assert ((cached[7][0] - item.sum(dim=-1)).abs() <= bound).all()


def test_length_mismatch_is_rejected():
    with pytest.raises(ValueError, match="3 rows of data but 2 labels"):
        CachedDataset(torch.zeros(3, 2), [0, 1])
