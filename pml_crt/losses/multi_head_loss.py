"""Apply a PML loss to every head of a multi-head embedder, plus the consistency term."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.miners import BaseMiner

from ..utils.layout import split_heads
from ..utils.validation import check_embedding_sizes, check_embeddings, check_number
from .per_head import (
    ConsistencySpec,
    LossSpec,
    build_consistency,
    build_head_losses,
    build_head_miners,
    build_head_weights,
    check_pairs_possible,
)


class MultiHeadLoss(BaseMetricLossFunction):
    """A PML loss on every head's slice of the concatenated embeddings, plus consistency.

    ``total = sum_h head_weights[h] * loss_h(z_h) + consistency_weight * consistency(z)``
    where ``z = [z_0, ..., z_{H-1}]`` is the ``(B, sum(embedding_sizes))``
    training output of :class:`pml_crt.models.MultiHeadCRT`. It is itself a
    ``BaseMetricLossFunction``, so it sits under the trainer's
    ``loss_funcs["metric_loss"]``; its ``parameters()`` hold every sub-loss's
    parameters (proxies, class weights), so a ``metric_loss_optimizer``
    trains them.

    Args:
        loss: the per-head loss, one of

            - a PML loss instance without parameters (``MultiSimilarityLoss()``,
              ``ContrastiveLoss()``...): deep-copied once per head, so heads never
              share state;
            - a callable ``embedding_size -> loss``, called once per head, e.g.
              ``lambda d: ProxyAnchorLoss(num_classes, d)``. Required for losses
              whose parameters or buffers depend on the embedding size
              (``ProxyAnchorLoss``, ``ArcFaceLoss``, ``SoftTripleLoss``,
              ``NormalizedSoftmaxLoss``, ``CrossBatchMemory``...): a single such
              instance raises ``ValueError``;
            - a list of distinct loss instances, one per head.

            A :class:`~pml_crt.losses.PrototypeRegularizedLoss` is refused here
            (``ValueError``): wrap this loss in it instead,
            ``PrototypeRegularizedLoss(MultiHeadLoss(loss, sizes), embedder)``.
            A loss class (``MultiSimilarityLoss`` rather than
            ``MultiSimilarityLoss()``) raises ``TypeError``: it is callable, but
            as a factory it would receive the embedding size as its first
            argument. The same holds for ``miner`` and ``consistency``.

        embedding_sizes: width of every head, in concatenation order
            (``MultiHeadCRT.embedding_sizes``).
        consistency_weight: ``lambda`` of the consistency term; ``0`` disables
            it. With a single head there are no pairs and the term is left out.
            The default 1 was chosen on Omniglot validation classes with
            Multi-Similarity (and beat weight 0 on CUB); with PML's
            ``ContrastiveLoss`` weight 1 cost validation accuracy, while 0.1
            and 0 did better: tune it per loss.
        consistency: ``None`` (a default :class:`SimilarityConsistencyLoss`), a
            dict of its keyword options, or an instance built for the same
            ``embedding_sizes``.
        miner: ``None``, a PML miner (deep-copied per head; each copy mines its
            own head's slice), or a list with one miner or ``None`` per head.
            Without it, an ``indices_tuple`` given to ``forward`` (for example
            the trainer's ``tuple_miner`` output, mined on the concatenation) is
            used unchanged for every head. Giving both raises ``ValueError``.
        head_weights: one float per head (default all 1).
        check_inputs: reject NaN and infinite embeddings
            (:class:`~pml_crt.utils.validation.NonFiniteError`), and batches
            of a single class (see below) also when the labels are on an
            accelerator. Default ``False``: each check reads a value back to
            the host, a device synchronisation per step. (The embedders'
            ``check_inputs``, on by default, already reject non-finite trunk
            outputs.)
        **kwargs: passed to ``BaseMetricLossFunction`` (``reducer``,
            ``embedding_regularizer`` applied to the concatenation,
            ``embedding_reg_weight``, ``collect_stats``). ``distance`` is
            refused: set it on the per-head loss or on the consistency loss.

    Sub-losses (``sub_loss_names()``): ``head0_loss``, ..., ``head{H-1}_loss``
    and ``consistency_loss``, each already weighted and "already_reduced", so
    the default reducer sums them into the total.

    Statistics: with ``collect_stats`` (PML's ``c_f.COLLECT_STATS``, default
    off, or ``collect_stats=True``), each forward also stores the *unweighted*
    value of every sub-loss as a detached 0-dim tensor attribute of the same
    name, listed in ``_record_these_stats`` (record-keeper reads it with
    ``.item()`` when it logs; nothing is read back to the host before then).
    Without ``collect_stats`` these attributes do not exist, as PML's own
    statistics.

    A batch whose ``labels`` hold a single class is rejected (``ValueError``)
    when a head's loss can only compare batch samples with each other; the
    check runs when ``labels`` are on the CPU (no synchronisation) or with
    ``check_inputs``.
    """

    def __init__(
        self,
        loss: LossSpec,
        embedding_sizes: Sequence[int],
        consistency_weight: float = 1.0,
        consistency: ConsistencySpec = None,
        miner: BaseMiner | Sequence[BaseMiner | None] | None = None,
        head_weights: Sequence[float] | None = None,
        check_inputs: bool = False,
        **kwargs: Any,
    ) -> None:
        if "distance" in kwargs:
            raise ValueError(
                "MultiHeadLoss does not use a distance: pass it to the per-head loss "
                "or to the consistency loss (consistency={'distance': ...})"
            )
        sizes = check_embedding_sizes(embedding_sizes)
        check_number(consistency_weight, "consistency_weight", at_least=0.0)
        # _sub_loss_names() is needed by the reducer set up in super().__init__.
        self.num_heads = len(sizes)
        self.has_consistency = self.num_heads >= 2 and consistency_weight > 0
        super().__init__(**kwargs)
        self.embedding_sizes = sizes
        self.check_inputs = bool(check_inputs)
        self.consistency_weight = float(consistency_weight)
        self.head_weights = build_head_weights(head_weights, sizes)
        # Keys, not list indices: record-keeper names its sqlite tables after them,
        # and a table name may not start with a digit.
        self.losses = torch.nn.ModuleDict(
            {f"head{i}": head_loss for i, head_loss in enumerate(build_head_losses(loss, sizes))}
        )
        self.miners = build_head_miners(miner, sizes)
        self.consistency = build_consistency(consistency, sizes, self.has_consistency)
        for i, weight in enumerate(self.head_weights):
            setattr(self, f"head{i}_weight", weight)
        self.add_to_recordable_attributes(
            list_of_names=["num_heads", "consistency_weight"]
            + [f"head{i}_weight" for i in range(self.num_heads)],
            is_stat=False,
        )
        self.add_to_recordable_attributes(list_of_names=self._sub_loss_names(), is_stat=True)

    def _sub_loss_names(self) -> list[str]:
        names = [f"head{i}_loss" for i in range(self.num_heads)]
        if self.has_consistency:
            names.append("consistency_loss")
        return names

    def _head_miner(self, index: int) -> BaseMiner | None:
        if self.miners is None:
            return None
        return self.miners[f"head{index}"] if f"head{index}" in self.miners else None

    def compute_loss(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: Any,
        ref_emb: torch.Tensor,
        ref_labels: torch.Tensor | None,
    ) -> dict[str, dict[str, Any]]:
        check_embeddings(embeddings, self.embedding_sizes, "embeddings", self.check_inputs)
        if indices_tuple is not None and self.miners is not None:
            raise ValueError(
                "MultiHeadLoss got an indices_tuple and has its own miner: use one or the "
                "other (drop the trainer's tuple_miner or MultiHeadLoss(miner=...))"
            )
        has_ref = ref_emb is not embeddings
        if has_ref:
            check_embeddings(ref_emb, self.embedding_sizes, "ref_emb", self.check_inputs)
            ref_heads: Sequence[torch.Tensor | None] = split_heads(ref_emb, self.embedding_sizes)
        else:
            ref_heads = [None] * self.num_heads
            ref_labels = None

        loss_dict = {}
        heads = split_heads(embeddings, self.embedding_sizes)
        for i, (head, ref_head) in enumerate(zip(heads, ref_heads, strict=True)):
            head_indices = indices_tuple
            miner = self._head_miner(i)
            if miner is not None:
                head_indices = miner(head, labels, ref_head, ref_labels)
            arguments = {
                "labels": labels,
                "indices_tuple": head_indices,
                "ref_emb": ref_head,
                "ref_labels": ref_labels,
            }
            value = self.losses[f"head{i}"](
                head, **{k: v for k, v in arguments.items() if v is not None}
            )
            self._record(f"head{i}_loss", value)
            loss_dict[f"head{i}_loss"] = _already_reduced(value * self.head_weights[i])
        if self.consistency is not None:
            value = self.consistency(embeddings, ref_emb=ref_emb if has_ref else None)
            self._record("consistency_loss", value)
            loss_dict["consistency_loss"] = _already_reduced(value * self.consistency_weight)
        return loss_dict

    def forward(
        self,
        embeddings: torch.Tensor,
        labels: torch.Tensor | None = None,
        indices_tuple: Any = None,
        ref_emb: torch.Tensor | None = None,
        ref_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """PML's forward, after the single-class check on ``labels`` where they were given.

        The check looks at ``labels`` before PML moves them to the embeddings'
        device, so labels kept on the CPU are checked without a synchronisation.
        """
        has_ref = ref_emb is not None and ref_emb is not embeddings
        check_pairs_possible(
            self.losses.values(), labels, indices_tuple, has_ref, self.check_inputs
        )
        return super().forward(embeddings, labels, indices_tuple, ref_emb, ref_labels)

    def _record(self, name: str, value: torch.Tensor | float) -> None:
        """Keep the unweighted value as a statistic (only with ``collect_stats``), unread."""
        if self.collect_stats:
            setattr(self, name, value.detach() if torch.is_tensor(value) else value)

    def extra_repr(self) -> str:
        return (
            f"embedding_sizes={self.embedding_sizes}, consistency_weight="
            f"{self.consistency_weight}, head_weights={self.head_weights}"
        )


def _already_reduced(value: torch.Tensor) -> dict[str, Any]:
    return {"losses": value, "indices": None, "reduction_type": "already_reduced"}
