"""Datasets read from local copies, in the layouts their official downloads unpack to.

Imported on first access, so the models and losses never pull in torchvision.
"""

from .._lazy import lazy_package

__all__ = [
    "CachedDataset",
    "OmniglotCharacters",
    "ToRGB",
    "cache_dataset",
    "cub",
    "download_omniglot",
    "select_classes",
]

lazy_package(
    __name__,
    attributes={
        "CachedDataset": "cached",
        "OmniglotCharacters": "omniglot",
        "ToRGB": "cub",
        "cache_dataset": "cached",
        "cub": "cub",
        "download_omniglot": "omniglot",
        "select_classes": "class_subset",
    },
)
