"""CUB-200-2011 through PML's ``CUB`` class, with RGB images and 0-based labels."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from PIL import Image
from pytorch_metric_learning.datasets import CUB

from .class_subset import ClassSubset
from .pml_dataset import ToRGB, pml_dataset

__all__ = ["ToRGB", "cub"]  # ToRGB: still importable from here, where it was defined before


def cub(
    root: str | os.PathLike,
    split: str = "train",
    transform: Callable[[Image.Image], Any] | None = None,
    target_transform: Callable[[int], Any] | None = None,
    *,
    relabel: bool = True,
    class_subset: ClassSubset = None,
    download: bool = False,
) -> CUB:
    """PML's ``CUB`` dataset with RGB images, 0-based labels and optional class subsets.

    ``pytorch_metric_learning.datasets.CUB`` opens images without converting
    them (a few CUB images are grayscale) and returns the raw 1-based class
    ids (101-200 for the test split), which classifier-style losses cannot
    use as class indices. This returns the same object with ``ToRGB`` before
    ``transform`` and, with ``relabel``, labels ``0 .. n-1`` in class-id order.

    Args:
        root: folder holding ``CUB_200_2011/`` (PML's convention).
        split: ``"train"`` (class ids 1-100), ``"test"`` (101-200) or
            ``"train+test"``.
        transform: applied to each RGB PIL image.
        target_transform: applied to each label.
        relabel: map the class ids present to ``0 .. n-1`` (sorted by id).
        class_subset: keep only these classes, as indices into the split's
            sorted class ids (see :func:`select_classes`), e.g. for the MLRC
            cross-validation folds.
        download: let PML download the archive (needs a network connection).

    Returns:
        A ``CUB`` dataset whose items are ``(image, label)``; its ``labels``
        attribute is the label list PML's ``MPerClassSampler`` needs and its
        ``class_ids`` attribute gives each label's original CUB class id.

    Raises:
        FileNotFoundError: without ``download``, when ``root`` lacks
            ``CUB_200_2011/images.txt``.
    """
    return pml_dataset(
        CUB,
        root,
        split,
        transform,
        target_transform,
        relabel=relabel,
        class_subset=class_subset,
        download=download,
        required=["CUB_200_2011/images.txt"],
    )
