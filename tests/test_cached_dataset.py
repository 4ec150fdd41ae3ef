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
    assert torch.allclose(cached[7][0], source[7][0].sum(dim=-1))


def test_length_mismatch_is_rejected():
    with pytest.raises(ValueError, match="3 rows of data but 2 labels"):
        CachedDataset(torch.zeros(3, 2), [0, 1])
