"""PML regularizers for CRT embedders: prototype diversity and multi-head consistency."""

from .prototype_diversity_regularizer import PrototypeDiversityRegularizer
from .similarity_consistency_regularizer import SimilarityConsistencyRegularizer

__all__: list[str] = ["PrototypeDiversityRegularizer", "SimilarityConsistencyRegularizer"]
