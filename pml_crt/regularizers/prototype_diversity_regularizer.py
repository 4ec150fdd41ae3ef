"""The prototype diversity penalty of CRT as a PML regularizer."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.regularizers import BaseRegularizer
from pytorch_metric_learning.utils import common_functions as c_f

from ..models.crt import prototype_diversity_losses


class PrototypeDiversityRegularizer(BaseRegularizer):
    """The diversity penalty of a ``(K, d)`` prototype matrix, as a PML regularizer.

    ``regularizer(prototypes)`` reduces the ``(K,)`` per-prototype terms of
    :func:`pml_crt.models.crt.prototype_diversity_losses`
    (``reduction_type="element"``, indexed by prototype) with the reducer; the
    default ``MeanReducer`` gives exactly
    :func:`pml_crt.models.crt.prototype_diversity_penalty`, i.e.
    ``CRT.diversity_penalty()``.
    The term is differentiable and is weighted and back-propagated like any
    other loss term, so it scales with a ``GradScaler``'s scale and with
    ``loss / steps`` under gradient accumulation::

        regularizer = PrototypeDiversityRegularizer()
        loss = metric_loss(model(x), labels) + 0.1 * regularizer(crt.prototypes)

    :class:`pml_crt.losses.PrototypeRegularizedLoss` adds it to a PML loss for
    every CRT head of a model, for use with PML's trainers.

    Args:
        **kwargs: passed to ``BaseRegularizer`` (``reducer``). The cosine is
            computed directly, so a ``distance`` is refused.
    """

    def __init__(self, **kwargs: Any) -> None:
        if "distance" in kwargs:
            raise ValueError(
                "PrototypeDiversityRegularizer does not use a distance: it always "
                "compares prototypes by their cosine similarity"
            )
        super().__init__(**kwargs)

    def compute_loss(self, prototypes: torch.Tensor) -> dict[str, dict[str, Any]]:
        if prototypes.dim() != 2:
            raise ValueError(
                f"prototypes must be a (K, d) matrix, got shape {tuple(prototypes.shape)}"
            )
        return {
            "loss": {
                "losses": prototype_diversity_losses(prototypes),
                "indices": c_f.torch_arange_from_size(prototypes),
                "reduction_type": "element",
            }
        }
