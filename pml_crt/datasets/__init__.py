"""Datasets read from local copies, in the layouts their official downloads unpack to."""

from .cached import CachedDataset, cache_dataset
from .class_subset import select_classes
from .cub import ToRGB, cub
from .omniglot import OmniglotCharacters, download_omniglot

__all__ = [
    "CachedDataset",
    "OmniglotCharacters",
    "ToRGB",
    "cache_dataset",
    "cub",
    "download_omniglot",
    "select_classes",
]
