"""Similarity consistency between the heads of a multi-head embedder, as a PML loss."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.losses import BaseMetricLossFunction

from ..utils.consistency import (
    Mode,
    StopGradient,
    check_consistency_options,
    similarity_consistency,
)


class SimilarityConsistencyLoss(BaseMetricLossFunction):
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
        mode: ``"mse"`` (default), ``"l1"`` or ``"kl"``.
        temperature: softmax temperature of ``"kl"``.
        stop_gradient: ``None``, ``"first"`` or ``"larger"``.
        include_diagonal: keep self-similarities (default ``False``).
        **kwargs: passed to ``BaseMetricLossFunction`` (``distance``, default
            ``CosineSimilarity()``; ``reducer``; ``embedding_regularizer``;
            ``embedding_reg_weight``).
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

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: Any,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor | None,
    ) -> dict[str, dict[str, Any]]:
        value = similarity_consistency(
            embeddings,
            self.embedding_sizes,
            ref_embeddings=None if ref_emb is embeddings else ref_emb,
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
