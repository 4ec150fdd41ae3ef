"""A PML loss plus a regularizer of a model's CRT prototypes (e.g. their diversity)."""

from __future__ import annotations

from typing import Any

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.regularizers import BaseRegularizer

from ..models.crt import CRT
from ..regularizers.prototype_diversity_regularizer import PrototypeDiversityRegularizer
from ..utils.validation import check_number


class PrototypeRegularizedLoss(BaseMetricLossFunction):
    """``loss(...) + prototype_reg_weight * sum_h prototype_regularizer(P_h)``.

    ``P_h`` is the ``(K_h, d_h)`` prototype matrix of every :class:`~pml_crt.models.CRT`
    in ``model`` (the module itself, the heads of a
    :class:`~pml_crt.models.MultiHeadCRT`, or a CRT anywhere inside a larger
    model). With the default :class:`~pml_crt.regularizers.PrototypeDiversityRegularizer`
    the added term is ``prototype_reg_weight * model.diversity_penalty()``.

    Why a loss wrapper: PML's trainers back-propagate the weighted sum of their
    ``loss_funcs``, each called on the embeddings. A term on model parameters
    fits neither of PML's regularizer slots (``embedding_regularizer`` sees the
    embeddings, ``weight_regularizer`` a loss's own weights), and a trainer
    subclass would not be stock. Wrapping the metric loss puts the term into the
    one loss the trainer back-propagates, so it is visible in the loss value
    and sub-losses, takes the trainer's ``loss_weights``, a ``GradScaler``'s
    scale and the ``1 / steps`` of gradient accumulation like the rest of the
    loss, and works with stock trainers. Under DDP every rank adds the same
    term, which DDP's gradient mean leaves unchanged; PML's
    ``DistributedLossWrapper`` multiplies the loss it wraps by the world size,
    so with it wrap the other way round,
    ``PrototypeRegularizedLoss(DistributedLossWrapper(loss), model)``
    (:class:`~pml_crt.utils.distributed.AllGatherLossWrapper` may wrap this
    loss whole).

    ``model`` is referenced, not registered as a submodule: the wrapper's
    ``parameters()`` and ``state_dict()`` hold only the wrapped loss's (and the
    regularizer's), so a ``metric_loss_optimizer`` does not step the model's
    parameters a second time and checkpoints do not store them twice.

    Args:
        loss: the PML loss to wrap, called as
            ``loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)``
            with the arguments unchanged (e.g. a
            :class:`~pml_crt.losses.MultiHeadLoss`).
        model: a module containing at least one :class:`~pml_crt.models.CRT`.
        prototype_regularizer: a PML regularizer applied to each ``(K, d)``
            prototype matrix; default ``PrototypeDiversityRegularizer()``.
        prototype_reg_weight: the term's weight (finite, ``>= 0``).
        **kwargs: passed to ``BaseMetricLossFunction`` (``embedding_regularizer``,
            ``embedding_reg_weight``, ``reducer``).

    Sub-losses (``sub_loss_names()``): ``loss`` (the wrapped loss's value) and
    ``prototype_reg_loss`` (the weighted term), both "already_reduced", summed
    by the default reducer.
    """

    def __init__(
        self,
        loss: torch.nn.Module,
        model: torch.nn.Module,
        prototype_regularizer: BaseRegularizer | None = None,
        prototype_reg_weight: float = 1.0,
        **kwargs: Any,
    ) -> None:
        if isinstance(loss, type) or not isinstance(loss, torch.nn.Module):
            raise TypeError(f"loss must be a loss instance (a torch.nn.Module), got {loss!r}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not any(isinstance(m, CRT) for m in model.modules()):
            raise ValueError(
                f"model ({type(model).__name__}) contains no pml_crt.models.CRT: there are "
                "no prototypes to regularize"
            )
        check_number(prototype_reg_weight, "prototype_reg_weight", at_least=0.0)
        super().__init__(**kwargs)
        self.loss = loss
        self.prototype_regularizer = (
            PrototypeDiversityRegularizer()
            if prototype_regularizer is None
            else prototype_regularizer
        )
        self.prototype_reg_weight = float(prototype_reg_weight)
        self._model = (model,)  # a tuple: not registered as a submodule
        self.add_to_recordable_attributes(list_of_names=["prototype_reg_weight"], is_stat=False)

    @property
    def model(self) -> torch.nn.Module:
        """The module whose CRT prototypes are regularized."""
        return self._model[0]

    def _sub_loss_names(self) -> list[str]:
        return ["loss", "prototype_reg_loss"]

    def prototype_regularization(self) -> torch.Tensor:
        """The unweighted term: ``sum_h prototype_regularizer(P_h)``, a scalar tensor."""
        heads = [m for m in self.model.modules() if isinstance(m, CRT)]
        return torch.stack([self.prototype_regularizer(head.prototypes) for head in heads]).sum()

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: Any = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The wrapped loss on exactly these arguments, plus the weighted term; a scalar."""
        self.reset_stats()
        loss_dict = self.compute_loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        self.add_embedding_regularization_to_loss_dict(loss_dict, embeddings)
        return self.reducer(loss_dict, embeddings, labels)

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: Any,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
    ) -> dict[str, dict[str, Any]]:
        value = self.loss(embeddings, labels, indices_tuple, ref_emb, ref_labels)
        term = self.prototype_reg_weight * self.prototype_regularization()
        return {
            "loss": {"losses": value, "indices": None, "reduction_type": "already_reduced"},
            "prototype_reg_loss": {
                "losses": term,
                "indices": None,
                "reduction_type": "already_reduced",
            },
        }
