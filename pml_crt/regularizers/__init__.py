"""Embedding regularizers for multi-head CRT embedders."""

from .similarity_consistency_regularizer import SimilarityConsistencyRegularizer

__all__: list[str] = ["SimilarityConsistencyRegularizer"]
