"""Decode once, train many times: a dataset held in memory as one tensor."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import tqdm
from torch.utils.data import DataLoader, Dataset

__all__ = ["CachedDataset", "cache_dataset"]


class CachedDataset(Dataset):
    """Items ``(transform(data[i]), labels[i])`` from an in-memory tensor.

    Args:
        data: ``(N, ...)`` tensor, one row per item.
        labels: ``N`` int labels (kept as the ``labels`` list PML's
            ``MPerClassSampler`` reads).
        transform: applied to each row on access (or None).
    """

    def __init__(
        self,
        data: torch.Tensor,
        labels: Sequence[int],
        transform: Callable[[torch.Tensor], Any] | None = None,
    ) -> None:
        super().__init__()
        if len(data) != len(labels):
            raise ValueError(f"{len(data)} rows of data but {len(labels)} labels")
        self.data = data
        self.labels = [int(y) for y in labels]
        self.transform = transform

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        x = self.data[index]
        if self.transform is not None:
            x = self.transform(x)
        return x, self.labels[index]

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(items={len(self)}, shape={tuple(self.data.shape[1:])}, "
            f"dtype={self.data.dtype})"
        )


def cache_dataset(
    dataset: Dataset,
    transform: Callable[[torch.Tensor], Any] | None = None,
    *,
    map_batch: Callable[[torch.Tensor], torch.Tensor] | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    desc: str = "caching",
    progress: bool = True,
) -> CachedDataset:
    """Run ``dataset`` once and keep its stacked items in memory.

    Use it when the dataset's transform is deterministic (no random
    augmentation): decoding and resizing then happen once instead of every
    epoch.

    Args:
        dataset: returns ``(tensor, int label)``, every tensor of one shape.
        transform: the per-access transform of the cached rows (not applied
            while caching), e.g. ``uint8 -> float`` and normalisation.
        map_batch: applied to each ``(b, ...)`` batch while caching (e.g. the
            frozen blocks of a trunk); the cache holds its outputs.
        batch_size: the caching ``DataLoader``'s batch size.
        num_workers: the caching ``DataLoader``'s worker processes.
        desc: the progress bar's label.
        progress: show the progress bar.
    """
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    chunks: list[torch.Tensor] = []
    labels: list[int] = []
    for x, y in tqdm.tqdm(loader, desc=desc, disable=not progress, leave=False):
        chunks.append(x if map_batch is None else map_batch(x))
        labels.extend(int(v) for v in y)
    return CachedDataset(torch.cat(chunks), labels, transform)
