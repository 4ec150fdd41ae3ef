"""Trunks that return feature maps: torchvision backbones and a small from-scratch convnet."""

from .feature_map_trunk import FeatureMapTrunk, available_trunks, feature_map_trunk
from .small_convnet import SmallConvNet

__all__ = ["FeatureMapTrunk", "SmallConvNet", "available_trunks", "feature_map_trunk"]
