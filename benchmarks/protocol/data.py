"""Datasets for the benchmark: every class of a dataset as one sorted list, plus transforms.

:func:`load_source` returns all images of a dataset with labels ``0 .. C-1``
in sorted class order (by class id, or by (alphabet, character) for
Omniglot); the MLRC split (:mod:`benchmarks.protocol.splits`) then picks classes by
position. For CUB this is the union of PML's "train" and "test" splits: on the
full dataset the first half is exactly MLRC's 100 train+val classes; on the
local 100-species subset (58 species with ids 1-100, 42 with ids 101-200) it
is the 50 lowest ids (train+val) and the 50 highest (test), so 8 species of
the official "train" half land in our test half.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from pytorch_metric_learning import datasets as pml_datasets
from torch.utils.data import Dataset
from torchvision import transforms as T

from pml_crt.datasets import OmniglotCharacters, ToRGB, cars196, cub

from .cache import LabelSubset
from .config import ConfigError, MissingFileError

__all__ = [
    "DATASETS",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "Source",
    "ToFloat",
    "TransformedDataset",
    "class_subset",
    "load_source",
    "pil_transform",
]

DATASETS = ("omniglot", "cub", "cars196", "sop")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Source:
    """All images of the selected classes of one dataset.

    Attributes:
        name: the dataset name.
        dataset: items ``(PIL image, label)``; labels are class positions.
        labels: label per image, ``0 .. num_classes - 1`` in sorted class order.
        class_ids: the original class id (or name) of each label.
        channels: image channels after loading (1 for Omniglot, else 3).
    """

    name: str
    dataset: Dataset
    labels: list[int]
    class_ids: list[Any]
    channels: int

    @property
    def num_classes(self) -> int:
        return len(self.class_ids)


class _Relabelled(Dataset):
    """A PML ``BaseDataset`` (paths + raw ids) with labels = sorted-id positions, RGB images."""

    def __init__(self, paths: Sequence[str], labels: Sequence[int]) -> None:
        self.paths = list(paths)
        self.labels = list(labels)
        self.to_rgb = ToRGB()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Image.Image, int]:
        with Image.open(self.paths[index]) as file:
            image = self.to_rgb(file)
            image.load()
        return image, self.labels[index]


def _relabel(paths, ids, max_classes):
    all_ids = sorted(set(ids))
    keep = all_ids if max_classes is None else all_ids[:max_classes]
    position = {class_id: i for i, class_id in enumerate(keep)}
    pairs = [(p, position[y]) for p, y in zip(paths, ids, strict=True) if y in position]
    return [p for p, _ in pairs], [y for _, y in pairs], keep


def _require(path: Path, what: str, name: str, root: Path) -> None:
    if not path.exists():
        raise MissingFileError(
            f"{what} not found: {path} does not exist. Point dataset.root at the folder "
            f"holding it (now {str(root)!r}), or set dataset.download=true to let PML's "
            f"{name} class download it (needs a network connection)."
        )


def load_source(config: Mapping[str, Any]) -> Source:
    """Every image of the ``dataset`` config section's dataset, labelled by class position.

    Keys: ``name`` (``omniglot``, ``cub``, ``cars196``, ``sop``), ``root``,
    ``download`` (PML's datasets only; default False), ``max_classes`` (keep
    the first N sorted classes).
    """
    name = config["name"]
    root = Path(os.path.expanduser(str(config["root"])))
    download = bool(config.get("download", False))
    max_classes = config.get("max_classes")
    subset = None if max_classes is None else slice(0, int(max_classes))
    if name == "omniglot":
        try:
            dataset = OmniglotCharacters(root, class_subset=subset)
        except FileNotFoundError as error:
            raise MissingFileError(
                f"Omniglot not found under dataset.root {str(root)!r}: {error}"
            ) from error
        return Source(name, dataset, list(dataset.labels), list(dataset.classes), 1)
    if name == "cub":
        if not download:
            _require(root / "CUB_200_2011" / "images.txt", "CUB-200-2011", "CUB", root)
        dataset = cub(
            root, split="train+test", relabel=True, class_subset=subset, download=download
        )
        return Source(name, dataset, list(dataset.labels), list(dataset.class_ids), 3)
    if name == "cars196":
        if not download:
            _require(root / "names.csv", "Cars196", "Cars196", root)
        dataset = cars196(
            root, split="train+test", relabel=True, class_subset=subset, download=download
        )
        return Source(name, dataset, list(dataset.labels), list(dataset.class_ids), 3)
    if name == "sop":
        if not download:
            _require(
                root / "Stanford_Online_Products" / "Ebay_train.txt",
                "Stanford Online Products",
                "StanfordOnlineProducts",
                root,
            )
        raw = pml_datasets.StanfordOnlineProducts(str(root), split="train+test", download=download)
    else:
        raise ConfigError(f"dataset.name must be one of {DATASETS}, got {name!r}")
    paths, labels, class_ids = _relabel(raw.paths, raw.labels, max_classes)
    return Source(name, _Relabelled(paths, labels), labels, class_ids, 3)


class TransformedDataset(Dataset):
    """``(transform(x), label)`` for the items ``(x, label)`` of ``dataset``; keeps ``labels``."""

    def __init__(self, dataset: Dataset, transform: Callable[[Any], Any]) -> None:
        self.dataset = dataset
        self.transform = transform
        self.labels = list(dataset.labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        x, y = self.dataset[index]
        return self.transform(x), y


class ToFloat:
    """``uint8 (C, H, W) -> float (C, H, W)`` in ``[0, 1]``, then a normalisation.

    ``normalize``: ``"imagenet"`` (ImageNet mean/std, repeated for 3 channels),
    ``"invert"`` (``1 - x``: Omniglot strokes 1 on a 0 background), ``"none"``.
    """

    def __init__(self, normalize: str = "imagenet") -> None:
        if normalize not in ("imagenet", "invert", "none"):
            raise ConfigError(
                f"images.normalize must be imagenet, invert or none, got {normalize!r}"
            )
        self.normalize = normalize
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0)
        if self.normalize == "imagenet":
            return (x - self.mean) / self.std
        if self.normalize == "invert":
            return 1.0 - x
        return x

    def __repr__(self) -> str:
        return f"{type(self).__name__}(normalize={self.normalize!r})"


def pil_transform(images: Mapping[str, Any], train: bool) -> T.Compose:
    """``PIL image -> uint8 tensor (C, H, W)`` for the ``images`` config section.

    Eval (and train without augmentation): ``Resize(resize)``, ``CenterCrop(crop)``
    (each skipped when None). Train with ``augmentation: mlrc``: ``Resize(resize)``,
    ``RandomResizedCrop(crop, scale=rrc_scale)``, ``RandomHorizontalFlip`` (MLRC).
    """
    augmentation = images.get("augmentation", "none")
    if augmentation not in ("none", "mlrc"):
        raise ConfigError(f"images.augmentation must be none or mlrc, got {augmentation!r}")
    ops: list[Callable[[Any], Any]] = []
    if images.get("resize"):
        ops.append(T.Resize(int(images["resize"])))
    if train and augmentation == "mlrc":
        if not images.get("crop"):
            raise ConfigError("images.augmentation=mlrc needs images.crop (the crop size)")
        ops.append(T.RandomResizedCrop(int(images["crop"]), scale=tuple(images["rrc_scale"])))
        if images.get("hflip", True):
            ops.append(T.RandomHorizontalFlip())
    elif images.get("crop"):
        ops.append(T.CenterCrop(int(images["crop"])))
    ops.append(T.PILToTensor())
    return T.Compose(ops)


def class_subset(dataset: Dataset, classes: Sequence[int]) -> LabelSubset:
    """The items of ``dataset`` (with a ``labels`` list) whose label is in ``classes``.

    Labels become ``0 .. len(classes) - 1`` in sorted class order; the items keep
    their order in ``dataset``.
    """
    new_label = {c: i for i, c in enumerate(sorted(classes))}
    if len(new_label) != len(classes):
        raise ValueError("classes repeats a class")
    indices = [i for i, y in enumerate(dataset.labels) if y in new_label]
    if len({dataset.labels[i] for i in indices}) != len(new_label):
        raise ValueError("some of classes have no images")
    return LabelSubset(dataset, indices, [new_label[dataset.labels[i]] for i in indices])
