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

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from pml_crt.datasets import CachedDataset, cache_dataset

__all__ = [
    "CachedDataset",
    "LabelSubset",
    "TrunkTail",
    "cache_dataset",
    "cache_module_outputs",
    "frozen_prefix",
]


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
    try:
        return cache_dataset(
            dataset,
            map_batch=lambda x: module(x.to(device)).to("cpu", dtype),
            batch_size=batch_size,
            num_workers=num_workers,
            desc=desc,
            progress=progress,
        )
    finally:
        module.train(was_training)


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
