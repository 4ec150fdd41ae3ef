"""Similarity consistency between the heads of a multi-head embedder, as a PML loss."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction

from ..consistency import SimilarityConsistencyMixin


class SimilarityConsistencyLoss(SimilarityConsistencyMixin, BaseMetricLossFunction):
    """Make the heads of a multi-head embedder agree on the batch similarity structure.

    Takes the concatenated ``(B, sum(embedding_sizes))`` output of
    :class:`pml_crt.models.MultiHeadCRT`. ``compute_loss`` returns one loss
    per sample, :func:`pml_crt.consistency.similarity_consistency_rows` (see
    there for the exact formula of every mode and option), with
    ``reduction_type="element"``, the sample indices and ``divisor`` = the
    number of samples, so PML's reducers act on it: the default
    ``MeanReducer`` gives :func:`pml_crt.consistency.similarity_consistency`,
    ``ThresholdReducer`` averages the samples inside its bounds,
    ``DivisorReducer`` divides the sum by the number of samples. Labels and
    ``indices_tuple`` are accepted and ignored: the term is label-free.

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
        check_inputs: reject NaN and infinite embeddings with
            :class:`~pml_crt.utils.validation.NonFiniteError` (default
            ``False``: the check reads a value back to the host, a device
            synchronisation per call).
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
        return self.element_loss_dict(embeddings, None if ref_emb is embeddings else ref_emb)
