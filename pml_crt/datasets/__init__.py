"""Datasets read from local copies, in the layouts their official downloads unpack to.

Imported on first access, so the models and losses never pull in torchvision.
"""

from .._lazy import lazy_package

__all__ = [
    "CachedDataset",
    "OmniglotCharacters",
    "ToRGB",
    "cache_dataset",
    "cars196",
    "cub",
    "download_omniglot",
    "select_classes",
]

lazy_package(
    __name__,
    attributes={
        "CachedDataset": "cached",
        "OmniglotCharacters": "omniglot",
        "ToRGB": "pml_dataset",
        "cache_dataset": "cached",
        "cars196": "cars196",
        "cub": "cub",
        "download_omniglot": "omniglot",
        "select_classes": "class_subset",
    },
)
