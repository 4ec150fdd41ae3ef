"""Omniglot characters as a metric-learning dataset, read from torchvision's extracted tree."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PIL import Image
from torch.utils.data import Dataset

from .class_subset import ClassSubset, select_classes

__all__ = ["OmniglotCharacters", "download_omniglot"]

_FOLDER = "omniglot-py"
_BACKGROUND = "images_background"
_EVALUATION = "images_evaluation"


def download_omniglot(
    root: str | os.PathLike, background: bool = True, evaluation: bool = False
) -> Path:
    """Download and extract Omniglot with ``torchvision.datasets.Omniglot(download=True)``.

    Needs a network connection. Afterwards ``OmniglotCharacters(root)`` reads
    the same tree.

    Args:
        root: folder that will hold ``omniglot-py/``.
        background: fetch ``images_background`` (964 characters, 30 alphabets).
        evaluation: fetch ``images_evaluation`` (659 characters, 20 alphabets).

    Returns:
        ``Path(root) / "omniglot-py"``.
    """
    from torchvision.datasets import Omniglot

    if background:
        Omniglot(str(root), background=True, download=True)
    if evaluation:
        Omniglot(str(root), background=False, download=True)
    return Path(root) / _FOLDER


def _resolve_folder(root: Path) -> Path:
    """The ``omniglot-py`` folder under ``root`` (or ``root`` itself if it is that folder)."""
    if (root / _FOLDER).is_dir():
        return root / _FOLDER
    if (root / _BACKGROUND).is_dir() or (root / _EVALUATION).is_dir():
        return root
    raise FileNotFoundError(
        f"no {_FOLDER}/ folder under {root}; download it with "
        f"pml_crt.datasets.download_omniglot({str(root)!r}) (needs a network connection)"
    )


def _sorted_dirs(folder: Path) -> list[str]:
    return sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())


class OmniglotCharacters(Dataset):
    """Omniglot with one class per (alphabet, character) pair.

    Reads the tree that ``torchvision.datasets.Omniglot(root, download=True)``
    extracts: ``<root>/omniglot-py/images_background/<alphabet>/<character>/*.png``
    (and ``images_evaluation`` likewise), without torchvision's md5 check of
    the zip, so an already extracted tree is enough.

    Classes are sorted by (image set, alphabet, character), background set
    first; the selected classes (``class_subset``) are labelled ``0 .. n-1`` in
    that order, so class-disjoint splits are easy, e.g. the MLRC protocol's
    halves ``class_subset=slice(0, 482)`` and ``slice(482, 964)``.

    Items are ``(image, label)``: ``image`` is a PIL grayscale (mode ``"L"``)
    105x105 image passed through ``transform``; ``label`` an int passed
    through ``target_transform``.

    Args:
        root: folder holding ``omniglot-py/`` (as for torchvision), or the
            ``omniglot-py`` folder itself.
        background: include ``images_background`` (964 characters x 20 drawings).
        evaluation: include ``images_evaluation`` (659 characters x 20 drawings).
        transform: applied to each PIL image.
        target_transform: applied to each label.
        class_subset: which classes (indices into the sorted list of all
            classes of the chosen image sets) to keep: None (all), a slice, a
            range or a list of ints; see :func:`select_classes`.

    Attributes:
        classes: ``(alphabet, character)`` per label.
        class_indices: for each label, its index among all classes of the
            chosen image sets (before ``class_subset``).
        labels: int label per image (what PML's ``MPerClassSampler`` needs).
        paths: image path per image.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        background: bool = True,
        evaluation: bool = False,
        transform: Callable[[Image.Image], Any] | None = None,
        target_transform: Callable[[int], Any] | None = None,
        class_subset: ClassSubset = None,
    ) -> None:
        super().__init__()
        if not (background or evaluation):
            raise ValueError("select at least one of background and evaluation")
        self.root = _resolve_folder(Path(root))
        self.transform = transform
        self.target_transform = target_transform

        set_names = [
            name for name, keep in ((_BACKGROUND, background), (_EVALUATION, evaluation)) if keep
        ]
        all_classes: list[tuple[str, str]] = []
        class_dirs: list[Path] = []
        for set_name in set_names:
            set_dir = self.root / set_name
            if not set_dir.is_dir():
                raise FileNotFoundError(
                    f"{set_dir} does not exist; download it with "
                    f"pml_crt.datasets.download_omniglot(root, "
                    f"{'background' if set_name == _BACKGROUND else 'evaluation'}=True)"
                )
            for alphabet in _sorted_dirs(set_dir):
                for character in _sorted_dirs(set_dir / alphabet):
                    all_classes.append((alphabet, character))
                    class_dirs.append(set_dir / alphabet / character)
        if not all_classes:
            raise FileNotFoundError(f"no <alphabet>/<character>/ folders under {self.root}")
        if len(set(all_classes)) != len(all_classes):
            raise ValueError("the image sets share an (alphabet, character) folder name")

        self.class_indices = select_classes(len(all_classes), class_subset)
        self.classes = [all_classes[i] for i in self.class_indices]
        self.paths: list[Path] = []
        self.labels: list[int] = []
        for label, class_index in enumerate(self.class_indices):
            folder = class_dirs[class_index]
            files = sorted(
                entry.name for entry in os.scandir(folder) if entry.name.endswith(".png")
            )
            if not files:
                raise FileNotFoundError(f"no .png images in {folder}")
            self.paths.extend(folder / name for name in files)
            self.labels.extend([label] * len(files))

    @property
    def num_classes(self) -> int:
        """How many classes (labels) the dataset holds."""
        return len(self.classes)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        with Image.open(self.paths[index]) as file:
            image = file.convert("L")
        label: Any = self.labels[index]
        if self.transform is not None:
            image = self.transform(image)
        if self.target_transform is not None:
            label = self.target_transform(label)
        return image, label

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(root={str(self.root)!r}, classes={self.num_classes}, "
            f"images={len(self)})"
        )
