"""Similarity consistency between the heads of a multi-head embedder, as a PML regularizer."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.regularizers import BaseRegularizer

from ..consistency import SimilarityConsistencyMixin


class SimilarityConsistencyRegularizer(SimilarityConsistencyMixin, BaseRegularizer):
    """The similarity-consistency term as an ``embedding_regularizer``.

    Use it on any PML loss that is applied to the concatenated multi-head
    embeddings, e.g.
    ``ContrastiveLoss(embedding_regularizer=SimilarityConsistencyRegularizer([16, 8]),
    embedding_reg_weight=0.5)``. It receives only the raw ``(B,
    sum(embedding_sizes))`` embeddings and returns one loss per sample,
    :func:`pml_crt.consistency.similarity_consistency_rows` (see there for the
    formula and options), with ``reduction_type="element"``, so its
    ``reducer`` acts on it as on a PML loss (the default ``MeanReducer`` gives
    :func:`pml_crt.consistency.similarity_consistency`).

    Args:
        embedding_sizes: width of every head, in concatenation order (at least two).
        mode: ``"kl"`` (default), ``"mse"`` or ``"l1"``.
        temperature: softmax temperature of ``"kl"``.
        stop_gradient: ``None``, ``"first"`` or ``"larger"``.
        include_diagonal: keep self-similarities (default ``False``).
        check_inputs: reject NaN and infinite embeddings (default ``False``:
            the check is a device synchronisation per call).
        **kwargs: passed to ``BaseRegularizer`` (``distance``, default
            ``CosineSimilarity()``; ``reducer``).
    """

    def compute_loss(self, x: torch.Tensor) -> dict[str, dict[str, Any]]:
        return self.element_loss_dict(x)
