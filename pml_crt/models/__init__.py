"""Embedders that turn a trunk's feature map into one embedding per image."""

from .crt import CRT
from .fusion import PrototypeWiseLinear
from .global_pool_embedder import GlobalPoolEmbedder
from .multi_head_crt import MultiHeadCRT
from .netvlad import NetVLAD
from .prototype_init import init_from_data, kmeans, sample_descriptors

__all__ = [
    "CRT",
    "GlobalPoolEmbedder",
    "MultiHeadCRT",
    "NetVLAD",
    "PrototypeWiseLinear",
    "init_from_data",
    "kmeans",
    "sample_descriptors",
]
