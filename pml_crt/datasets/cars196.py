"""Stanford Cars-196 through PML's ``Cars196`` class, with RGB images and 0-based labels."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from PIL import Image
from pytorch_metric_learning.datasets import Cars196

from .class_subset import ClassSubset
from .pml_dataset import pml_dataset

__all__ = ["cars196"]


def cars196(
    root: str | os.PathLike,
    split: str = "train",
    transform: Callable[[Image.Image], Any] | None = None,
    target_transform: Callable[[int], Any] | None = None,
    *,
    relabel: bool = True,
    class_subset: ClassSubset = None,
    download: bool = False,
) -> Cars196:
    """PML's ``Cars196`` dataset with RGB images, 0-based labels and optional class subsets.

    ``pytorch_metric_learning.datasets.Cars196`` returns un-converted PIL
    images and the raw 1-based class ids (99-196 for the test split). This
    returns the same object with ``ToRGB`` before ``transform`` and, with
    ``relabel``, labels ``0 .. n-1`` in class-id order.

    Args:
        root: the folder PML's ``Cars196`` reads: ``names.csv``,
            ``anno_train.csv``, ``anno_test.csv`` and
            ``car_data/car_data/{train,test}/<class name>/<file>``.
        split: ``"train"`` (class ids 1-98, MLRC's train+validation classes),
            ``"test"`` (99-196) or ``"train+test"``.
        transform: applied to each RGB PIL image.
        target_transform: applied to each label.
        relabel: map the class ids present to ``0 .. n-1`` (sorted by id).
        class_subset: keep only these classes, as indices into the split's
            sorted class ids (see :func:`select_classes`), e.g. for the MLRC
            cross-validation folds.
        download: let PML download the archive (needs a network connection).

    Returns:
        A ``Cars196`` dataset whose items are ``(image, label)``; its ``labels``
        attribute is the label list PML's ``MPerClassSampler`` needs and its
        ``class_ids`` attribute gives each label's original class id.

    Raises:
        FileNotFoundError: without ``download``, when ``root`` lacks one of
            ``names.csv``, ``anno_train.csv``, ``anno_test.csv``.
    """
    return pml_dataset(
        Cars196,
        root,
        split,
        transform,
        target_transform,
        relabel=relabel,
        class_subset=class_subset,
        download=download,
        required=["names.csv", "anno_train.csv", "anno_test.csv"],
    )
