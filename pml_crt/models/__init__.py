"""Embedders that turn a trunk's feature map into one embedding per image."""

from .crt import CRT
from .multi_head_crt import MultiHeadCRT

__all__ = ["CRT", "MultiHeadCRT"]
