"""Compute once, train many times: in-memory caches of images and frozen trunk blocks.

On a CPU most of a small benchmark's time goes to decoding and resizing the
same JPEG/PNG files every epoch, and to running the same frozen trunk blocks
on the same images. Without random augmentation both are deterministic, so
they can be computed once per process and reused by every fold, seed and
method:

- :func:`cache_dataset` runs a dataset's (deterministic) transform on every
  item once and keeps the stacked results, e.g. ``uint8`` images, in a
  :class:`CachedDataset`; a cheap ``transform`` (``uint8 -> float``,
  normalisation) can still run per item.
- :func:`cache_module_outputs` runs a frozen module (the first blocks of a
  pretrained trunk) over a dataset once and keeps its outputs;
  :class:`TrunkTail` is the rest of the trunk, which then trains on those
  features. ``TrunkTail(trunk, n)(prefix(x)) == trunk(x)`` because frozen
  blocks have no trainable parameters and always run in eval mode.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import tqdm
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "CachedDataset",
    "LabelSubset",
    "TrunkTail",
    "cache_dataset",
    "cache_module_outputs",
    "frozen_prefix",
]


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


class LabelSubset(Dataset):
    """The items ``indices`` of ``dataset``, relabelled with ``labels``.

    Args:
        dataset: any map-style dataset returning ``(x, label)``.
        indices: which items to keep, in order.
        labels: the new label of each kept item (what ``labels`` exposes and
            ``__getitem__`` returns).
    """

    def __init__(self, dataset: Dataset, indices: Sequence[int], labels: Sequence[int]) -> None:
        super().__init__()
        if len(indices) != len(labels):
            raise ValueError(f"{len(indices)} indices but {len(labels)} labels")
        self.dataset = dataset
        self.indices = [int(i) for i in indices]
        self.labels = [int(y) for y in labels]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        x, _ = self.dataset[self.indices[index]]
        return x, self.labels[index]

    @property
    def num_classes(self) -> int:
        return len(set(self.labels))


def _loader(dataset: Dataset, batch_size: int, num_workers: int) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers, drop_last=False
    )


def cache_dataset(
    dataset: Dataset,
    transform: Callable[[torch.Tensor], Any] | None = None,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    desc: str = "caching",
    progress: bool = True,
) -> CachedDataset:
    """Run ``dataset`` once and keep its stacked items in memory.

    ``dataset`` must return ``(tensor, int label)`` of one shape. ``transform``
    is the per-access transform of the result (not applied while caching).
    """
    chunks: list[torch.Tensor] = []
    labels: list[int] = []
    batches = _loader(dataset, batch_size, num_workers)
    for x, y in tqdm.tqdm(batches, desc=desc, disable=not progress, leave=False):
        chunks.append(x)
        labels.extend(int(v) for v in y)
    return CachedDataset(torch.cat(chunks), labels, transform)


@torch.no_grad()
def cache_module_outputs(
    module: torch.nn.Module,
    dataset: Dataset,
    *,
    batch_size: int = 256,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    num_workers: int = 0,
    desc: str = "caching features",
    progress: bool = True,
) -> CachedDataset:
    """``module(x)`` for every item of ``dataset``, in eval mode, kept in memory (on CPU).

    ``module`` is left in the mode it was in.
    """
    was_training = module.training
    module.eval()
    chunks: list[torch.Tensor] = []
    labels: list[int] = []
    try:
        for x, y in tqdm.tqdm(
            _loader(dataset, batch_size, num_workers), desc=desc, disable=not progress, leave=False
        ):
            chunks.append(module(x.to(device)).to("cpu", dtype))
            labels.extend(int(v) for v in y)
    finally:
        module.train(was_training)
    return CachedDataset(torch.cat(chunks), labels)


def frozen_prefix(trunk: torch.nn.Module, num_blocks: int | None = None) -> torch.nn.Sequential:
    """The first ``num_blocks`` blocks of ``trunk.body`` (default: the frozen ones).

    The returned Sequential shares the trunk's modules.
    """
    if num_blocks is None:
        num_blocks = int(trunk.frozen_blocks)
    return torch.nn.Sequential(*list(trunk.body)[:num_blocks])


class TrunkTail(torch.nn.Module):
    """The blocks ``start:`` of ``trunk.body``: a trunk that reads cached prefix features.

    It holds the whole trunk (so ``trunk.train()`` keeps frozen blocks and
    BatchNorm in eval mode as the trunk defines, and ``state_dict`` holds every
    weight), but its forward runs only ``trunk.body[start:]``.

    Attributes:
        out_channels: the trunk's ``out_channels``.
    """

    def __init__(self, trunk: torch.nn.Module, start: int) -> None:
        super().__init__()
        if not 0 <= start <= len(trunk.body):
            raise ValueError(f"start must be in [0, {len(trunk.body)}], got {start}")
        self.trunk = trunk
        self.start = int(start)
        self.out_channels = getattr(trunk, "out_channels", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in list(self.trunk.body)[self.start :]:
            x = block(x)
        return x

    def extra_repr(self) -> str:
        return f"start={self.start}"
