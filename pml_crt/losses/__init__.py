"""Metric losses for multi-head CRT embedders."""

from .multi_head_loss import MultiHeadLoss
from .similarity_consistency_loss import SimilarityConsistencyLoss

__all__: list[str] = ["MultiHeadLoss", "SimilarityConsistencyLoss"]
