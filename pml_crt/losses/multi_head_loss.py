"""Apply a PML loss to every head of a multi-head embedder, plus the consistency term."""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.miners import BaseMiner

from ..utils.layout import split_heads
from ..utils.validation import check_embedding_sizes, check_embeddings, check_number
from .prototype_regularized_loss import PrototypeRegularizedLoss
from .similarity_consistency_loss import SimilarityConsistencyLoss

LossSpec = torch.nn.Module | Callable[[int], torch.nn.Module] | Sequence[torch.nn.Module]
ConsistencySpec = SimilarityConsistencyLoss | Mapping[str, Any] | None


def _is_size_dependent(module: torch.nn.Module) -> bool:
    """True if a copy of ``module`` could not serve a head of another width.

    That is: it (or a wrapped loss) has parameters, or an int ``embedding_size``
    attribute (``CrossBatchMemory``'s memory).
    """
    if any(True for _ in module.parameters()):
        return True
    for sub in module.modules():
        size = getattr(sub, "embedding_size", None)
        if isinstance(size, int) and not isinstance(size, bool):
            return True
    return False


def _reject_class(value: object, name: str, *, factory: bool = False) -> None:
    """Raise ``TypeError`` if ``value`` is a class rather than an instance.

    A class is callable, so where a factory ``embedding_size -> loss`` is
    accepted, ``MultiSimilarityLoss`` would pass for one and build
    ``MultiSimilarityLoss(embedding_size)``, i.e. ``alpha=embedding_size``.
    """
    if isinstance(value, type):
        cls = value.__name__
        expected = f"an instance ({cls}(...))"
        if factory:
            expected += f" or a factory `lambda embedding_size: {cls}(...)`"
        raise TypeError(f"{name} is the class {cls}, not an instance: pass {expected}")


def _reject_prototype_regularized(module: torch.nn.Module, name: str) -> None:
    """Raise ``ValueError`` if ``module`` holds a :class:`PrototypeRegularizedLoss`.

    A per-head copy of it would copy the model it references, so the term
    would regularize copies and never reach the live prototypes (and each
    copy would hold a whole model); shared, it would be added once per head.
    """
    if any(isinstance(sub, PrototypeRegularizedLoss) for sub in module.modules()):
        raise ValueError(
            f"{name} is (or wraps) a PrototypeRegularizedLoss: as a per-head loss its "
            "prototype term would not reach the model's prototypes once. Wrap the other way "
            "round: PrototypeRegularizedLoss(MultiHeadLoss(loss, embedding_sizes), embedder)"
        )


def _holds_references(module: torch.nn.Module) -> bool:
    """True if ``module`` (or a wrapped loss) compares the batch with state of its own.

    That is: it has parameters (proxies, class weights) or buffers (a memory
    bank, as ``CrossBatchMemory``'s ``embedding_memory``, or any stored
    reference set), so it does not need pairs within the batch. A stock PML
    loss without either only compares the batch's samples with each other.
    """
    return any(True for _ in itertools.chain(module.parameters(), module.buffers()))


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
        self.head_weights = self._build_head_weights(head_weights)
        # Keys, not list indices: record-keeper names its sqlite tables after them,
        # and a table name may not start with a digit.
        self.losses = torch.nn.ModuleDict(
            {f"head{i}": head_loss for i, head_loss in enumerate(self._build_losses(loss))}
        )
        self.miners = self._build_miners(miner)
        self.consistency = self._build_consistency(consistency)
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

    def _build_head_weights(self, head_weights: Sequence[float] | None) -> list[float]:
        if head_weights is None:
            return [1.0] * self.num_heads
        weights = list(head_weights)
        if len(weights) != self.num_heads or not all(
            isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
            for w in weights
        ):
            raise ValueError(
                f"head_weights must hold {self.num_heads} non-negative numbers (one per "
                f"head of embedding_sizes={self.embedding_sizes}), got {weights}"
            )
        return [float(w) for w in weights]

    def _check_pairs_possible(
        self, labels: torch.Tensor | None, indices_tuple: Any, has_ref: bool
    ) -> None:
        """Reject a single-class batch when a head's loss only compares batch samples.

        A loss with no state of its own (contrastive, triplet, multi-similarity,
        ...) can only pair the batch's samples with each other, so a batch of one
        class gives it no negative pair: its loss loses the negative term or is
        0, silently. Losses that compare the batch with references of their own
        (see :func:`_holds_references`: proxy losses, ``CrossBatchMemory`` and
        other memory banks) are fine with it, and so are calls without labels
        (label-free losses) or with ``ref_emb`` or an ``indices_tuple`` (the
        caller chose the comparisons).
        """
        if labels is None or indices_tuple is not None or has_ref or len(labels) == 0:
            return
        if not torch.is_tensor(labels) or (labels.device.type != "cpu" and not self.check_inputs):
            return  # PML's forward checks the type; a device read would synchronise
        pair_losses = [
            type(head_loss).__name__
            for head_loss in self.losses.values()
            if not _holds_references(head_loss)
        ]
        if pair_losses and bool((labels == labels.reshape(-1)[0]).all()):
            raise ValueError(
                f"labels holds a single class ({labels.reshape(-1)[0].item()}) for the whole "
                f"batch, so {pair_losses[0]} has no negative pair and would silently lose its "
                "negative term: sample batches with at least 2 classes (e.g. MPerClassSampler), "
                "or use a loss with references of its own (a proxy loss, CrossBatchMemory)"
            )

    def _build_losses(self, loss: LossSpec) -> list[torch.nn.Module]:
        sizes = self.embedding_sizes
        _reject_class(loss, "loss", factory=True)
        if isinstance(loss, torch.nn.Module):
            _reject_prototype_regularized(loss, "loss")
            if _is_size_dependent(loss):
                name = type(loss).__name__
                raise ValueError(
                    f"{name} has parameters or an embedding_size, so one instance cannot "
                    "serve heads of different widths: pass a factory such as "
                    f"`lambda embedding_size: {name}(..., embedding_size=embedding_size)` "
                    f"or a list of {self.num_heads} losses, one per head "
                    f"(embedding_sizes={sizes})"
                )
            losses = [copy.deepcopy(loss) for _ in sizes]
        elif isinstance(loss, Sequence) and not isinstance(loss, (str, bytes)):
            losses = list(loss)
            if len(losses) != self.num_heads:
                raise ValueError(
                    f"loss is a list of {len(losses)} losses, but embedding_sizes={sizes} "
                    f"has {self.num_heads} heads"
                )
            for i, item in enumerate(losses):
                _reject_class(item, f"loss[{i}]")
                if not isinstance(item, torch.nn.Module):
                    raise TypeError(
                        f"loss[{i}] must be a torch.nn.Module loss, got {type(item).__name__}"
                    )
                _reject_prototype_regularized(item, f"loss[{i}]")
            for i, item in enumerate(losses):
                if any(item is other for other in losses[:i]):
                    if _is_size_dependent(item):
                        raise ValueError(
                            f"loss[{i}] is the same {type(item).__name__} instance as an "
                            "earlier entry and has parameters: give each head its own instance"
                        )
                    losses[i] = copy.deepcopy(item)
        elif callable(loss):
            losses = []
            for i, size in enumerate(sizes):
                item = loss(size)
                if not isinstance(item, torch.nn.Module):
                    raise TypeError(
                        f"the loss factory returned {type(item).__name__} for head {i} "
                        f"(embedding_size={size}); it must return a torch.nn.Module loss"
                    )
                _reject_prototype_regularized(item, f"the loss factory's loss for head {i}")
                if any(item is other for other in losses):
                    raise ValueError(
                        "the loss factory returned the same instance for two heads; it must "
                        "build a new loss on every call"
                    )
                losses.append(item)
        else:
            raise TypeError(
                "loss must be a PML loss instance, a callable embedding_size -> loss, or a "
                f"list of losses, got {type(loss).__name__}"
            )
        return losses

    def _build_miners(
        self, miner: BaseMiner | Sequence[BaseMiner | None] | None
    ) -> torch.nn.ModuleDict | None:
        if miner is None:
            return None
        _reject_class(miner, "miner")
        if isinstance(miner, torch.nn.Module):
            miners = [copy.deepcopy(miner) for _ in range(self.num_heads)]
        elif isinstance(miner, Sequence) and not isinstance(miner, (str, bytes)):
            miners = list(miner)
            if len(miners) != self.num_heads:
                raise ValueError(
                    f"miner is a list of {len(miners)} entries, but embedding_sizes="
                    f"{self.embedding_sizes} has {self.num_heads} heads"
                )
        else:
            raise TypeError(
                f"miner must be a PML miner or a list of miners, got {type(miner).__name__}"
            )
        for i, item in enumerate(miners):
            _reject_class(item, f"miner[{i}]")
            if item is not None and not isinstance(item, torch.nn.Module):
                raise TypeError(
                    f"miner[{i}] must be a PML miner or None, got {type(item).__name__}"
                )
            if item is not None and any(item is other for other in miners[:i]):
                miners[i] = copy.deepcopy(item)
        return torch.nn.ModuleDict({f"head{i}": m for i, m in enumerate(miners) if m is not None})

    def _build_consistency(self, consistency: ConsistencySpec) -> SimilarityConsistencyLoss | None:
        _reject_class(consistency, "consistency")
        if self.num_heads < 2:
            if consistency is not None:
                raise ValueError(
                    "consistency was given, but embedding_sizes="
                    f"{self.embedding_sizes} has a single head: there is nothing to compare"
                )
            return None
        if consistency is None:
            module = SimilarityConsistencyLoss(self.embedding_sizes)
        elif isinstance(consistency, SimilarityConsistencyLoss):
            if consistency.embedding_sizes != self.embedding_sizes:
                raise ValueError(
                    f"consistency was built for embedding_sizes={consistency.embedding_sizes}, "
                    f"but this loss has embedding_sizes={self.embedding_sizes}"
                )
            module = consistency
        elif isinstance(consistency, Mapping):
            module = SimilarityConsistencyLoss(self.embedding_sizes, **consistency)
        else:
            raise TypeError(
                "consistency must be None, a dict of SimilarityConsistencyLoss options or a "
                f"SimilarityConsistencyLoss, got {type(consistency).__name__}"
            )
        return module if self.has_consistency else None

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
        self._check_pairs_possible(labels, indices_tuple, has_ref)
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
