"""Embedders that turn a trunk's feature map into one embedding per image."""

from .crt import CRT
from .global_pool_embedder import GlobalPoolEmbedder
from .multi_head_crt import MultiHeadCRT
from .netvlad import NetVLAD

__all__ = ["CRT", "GlobalPoolEmbedder", "MultiHeadCRT", "NetVLAD"]
