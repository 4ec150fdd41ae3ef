"""Datasets read from local copies, in the layouts their official downloads unpack to."""

from .class_subset import select_classes
from .cub import ToRGB, cub
from .omniglot import OmniglotCharacters, download_omniglot

__all__ = ["OmniglotCharacters", "ToRGB", "cub", "download_omniglot", "select_classes"]
