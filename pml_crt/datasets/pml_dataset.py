"""PML's datasets with RGB images, 0-based labels and class subsets (``cub``, ``cars196``)."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from PIL import Image
from pytorch_metric_learning.datasets.base_dataset import BaseDataset
from torchvision.transforms import Compose

from .class_subset import ClassSubset, select_classes

__all__ = ["ToRGB", "pml_dataset"]

Dataset = TypeVar("Dataset", bound=BaseDataset)


class ToRGB:
    """Transform: ``PIL.Image -> PIL.Image`` in mode ``"RGB"`` (PML's datasets skip this)."""

    def __call__(self, image: Image.Image) -> Image.Image:
        return image if image.mode == "RGB" else image.convert("RGB")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def pml_dataset(
    cls: type[Dataset],
    root: str | os.PathLike,
    split: str,
    transform: Callable[[Image.Image], Any] | None,
    target_transform: Callable[[int], Any] | None,
    *,
    relabel: bool,
    class_subset: ClassSubset,
    download: bool,
    required: Sequence[str],
) -> Dataset:
    """A PML dataset ``cls`` with ``ToRGB`` before ``transform``, class subsets and relabelling.

    Args:
        cls: a ``pytorch_metric_learning.datasets`` class (``CUB``, ``Cars196``).
        root, split, transform, target_transform, download: as PML's.
        relabel: map the class ids kept to ``0 .. n-1`` (sorted by id).
        class_subset: keep only these classes, as indices into the split's
            sorted class ids (:func:`select_classes`).
        required: paths under ``root`` that PML reads; without ``download``, a
            missing one raises ``FileNotFoundError`` naming it, before PML reads.

    Returns:
        The ``cls`` instance, its ``paths`` and ``labels`` filtered and relabelled,
        with ``class_ids``: each label's original class id.
    """
    missing = [name for name in required if not (Path(root) / name).exists()]
    if missing and not download:
        raise FileNotFoundError(
            f"root={str(root)!r} does not hold {', '.join(missing)}: pass the folder laid out "
            f"as pytorch_metric_learning.datasets.{cls.__name__} reads it, or download=True "
            "(needs a network connection)"
        )
    rgb_transform: Callable[[Image.Image], Any] = (
        ToRGB() if transform is None else Compose([ToRGB(), transform])
    )
    dataset = cls(
        root=str(root),
        split=split,
        transform=rgb_transform,
        target_transform=target_transform,
        download=download,
    )
    all_ids = sorted(set(dataset.labels))
    keep_ids = [all_ids[i] for i in select_classes(len(all_ids), class_subset)]
    keep = set(keep_ids)
    pairs = [(p, y) for p, y in zip(dataset.paths, dataset.labels, strict=True) if y in keep]
    mapping = {class_id: i for i, class_id in enumerate(keep_ids)} if relabel else None
    dataset.paths = [p for p, _ in pairs]
    dataset.labels = [mapping[y] if mapping else y for _, y in pairs]
    dataset.class_ids = keep_ids
    return dataset
