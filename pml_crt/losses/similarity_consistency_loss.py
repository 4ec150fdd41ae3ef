"""Similarity consistency between the heads of a multi-head embedder, as a PML loss."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction

from ..utils.consistency import SimilarityConsistencyMixin


class SimilarityConsistencyLoss(SimilarityConsistencyMixin, BaseMetricLossFunction):
    """Make the heads of a multi-head embedder agree on the batch similarity structure.

    Takes the concatenated ``(B, sum(embedding_sizes))`` output of
    :class:`pml_crt.models.MultiHeadCRT` and returns
    :func:`pml_crt.utils.consistency.similarity_consistency` (see there for the
    exact formula of every mode and option). Labels and ``indices_tuple`` are
    accepted and ignored: the term is label-free.

    With ``ref_emb`` (and ``ref_emb is not embeddings``), each head's
    similarity matrix is the ``(B, R)`` cross-matrix between ``embeddings``
    and ``ref_emb``, and ``include_diagonal`` does not apply.

    Args:
        embedding_sizes: width of every head, in concatenation order (at
            least two heads), e.g. ``MultiHeadCRT.embedding_sizes``.
        mode: ``"kl"`` (default), ``"mse"`` or ``"l1"``.
        temperature: softmax temperature of ``"kl"``.
        stop_gradient: ``None``, ``"first"`` or ``"larger"``.
        include_diagonal: keep self-similarities (default ``False``).
        **kwargs: passed to ``BaseMetricLossFunction`` (``distance``, default
            ``CosineSimilarity()``; ``reducer``; ``embedding_regularizer``;
            ``embedding_reg_weight``).
    """

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: Any,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor | None,
    ) -> dict[str, dict[str, Any]]:
        value = self.consistency(embeddings, None if ref_emb is embeddings else ref_emb)
        return {"loss": {"losses": value, "indices": None, "reduction_type": "already_reduced"}}
