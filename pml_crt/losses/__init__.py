"""Metric losses for CRT embedders."""

from .multi_head_loss import MultiHeadLoss
from .prototype_regularized_loss import PrototypeRegularizedLoss
from .similarity_consistency_loss import SimilarityConsistencyLoss

__all__: list[str] = ["MultiHeadLoss", "PrototypeRegularizedLoss", "SimilarityConsistencyLoss"]
