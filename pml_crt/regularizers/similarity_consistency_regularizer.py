"""Similarity consistency between the heads of a multi-head embedder, as a PML regularizer."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.regularizers import BaseRegularizer

from ..utils.consistency import (
    Mode,
    StopGradient,
    check_consistency_options,
    similarity_consistency,
)


class SimilarityConsistencyRegularizer(BaseRegularizer):
    """The similarity-consistency term as an ``embedding_regularizer``.

    Use it on any PML loss that is applied to the concatenated multi-head
    embeddings, e.g.
    ``ContrastiveLoss(embedding_regularizer=SimilarityConsistencyRegularizer([16, 8]),
    embedding_reg_weight=0.5)``. It receives only the raw ``(B,
    sum(embedding_sizes))`` embeddings and returns
    :func:`pml_crt.utils.consistency.similarity_consistency` (see there for the
    formula and options).

    Args:
        embedding_sizes: width of every head, in concatenation order (at least two).
        mode: ``"mse"`` (default), ``"l1"`` or ``"kl"``.
        temperature: softmax temperature of ``"kl"``.
        stop_gradient: ``None``, ``"first"`` or ``"larger"``.
        include_diagonal: keep self-similarities (default ``False``).
        **kwargs: passed to ``BaseRegularizer`` (``distance``, default
            ``CosineSimilarity()``; ``reducer``).
    """

    def __init__(
        self,
        embedding_sizes: Sequence[int],
        mode: Mode = "mse",
        temperature: float = 0.1,
        stop_gradient: StopGradient = None,
        include_diagonal: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.embedding_sizes = check_consistency_options(
            embedding_sizes, mode, temperature, stop_gradient, self.distance
        )
        self.num_heads = len(self.embedding_sizes)
        self.mode = mode
        self.temperature = float(temperature)
        self.stop_gradient = stop_gradient
        self.include_diagonal = bool(include_diagonal)
        self.add_to_recordable_attributes(
            list_of_names=["num_heads", "temperature", "include_diagonal"], is_stat=False
        )

    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()

    def compute_loss(self, x: torch.Tensor) -> dict[str, dict[str, Any]]:
        value = similarity_consistency(
            x,
            self.embedding_sizes,
            mode=self.mode,
            distance=self.distance,
            temperature=self.temperature,
            stop_gradient=self.stop_gradient,
            include_diagonal=self.include_diagonal,
        )
        return {"loss": {"losses": value, "indices": None, "reduction_type": "already_reduced"}}

    def extra_repr(self) -> str:
        return (
            f"embedding_sizes={self.embedding_sizes}, mode={self.mode!r}, "
            f"temperature={self.temperature}, stop_gradient={self.stop_gradient!r}, "
            f"include_diagonal={self.include_diagonal}"
        )
