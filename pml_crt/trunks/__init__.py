"""Trunks that return feature maps: torchvision backbones and a small from-scratch convnet.

Imported on first access: ``SmallConvNet`` does not need torchvision.
"""

from .._lazy import lazy_package

__all__ = ["FeatureMapTrunk", "SmallConvNet", "available_trunks", "feature_map_trunk"]

lazy_package(
    __name__,
    attributes={
        "FeatureMapTrunk": "feature_map_trunk",
        "SmallConvNet": "small_convnet",
        "available_trunks": "feature_map_trunk",
        "feature_map_trunk": "feature_map_trunk",
    },
)
