"""Similarity consistency between the heads of a multi-head embedder, as a PML regularizer."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.regularizers import BaseRegularizer

from ..utils.consistency import SimilarityConsistencyMixin


class SimilarityConsistencyRegularizer(SimilarityConsistencyMixin, BaseRegularizer):
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
        mode: ``"kl"`` (default), ``"mse"`` or ``"l1"``.
        temperature: softmax temperature of ``"kl"``.
        stop_gradient: ``None``, ``"first"`` or ``"larger"``.
        include_diagonal: keep self-similarities (default ``False``).
        **kwargs: passed to ``BaseRegularizer`` (``distance``, default
            ``CosineSimilarity()``; ``reducer``).
    """

    def compute_loss(self, x: torch.Tensor) -> dict[str, dict[str, Any]]:
        value = self.consistency(x)
        return {"loss": {"losses": value, "indices": None, "reduction_type": "already_reduced"}}
