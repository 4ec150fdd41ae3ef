"""Building and checking the per-head parts of :class:`~pml_crt.losses.MultiHeadLoss`.

Its arguments accept several forms (an instance, a factory ``embedding_size -> loss``,
a list per head); these functions turn each into one object per head, and refuse what
would silently go wrong, with errors that name the argument and the fix.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from pytorch_metric_learning.miners import BaseMiner

from .prototype_regularized_loss import PrototypeRegularizedLoss
from .similarity_consistency_loss import SimilarityConsistencyLoss

__all__ = [
    "check_pairs_possible",
    "build_consistency",
    "build_head_losses",
    "build_head_miners",
    "build_head_weights",
    "holds_references",
    "is_size_dependent",
    "reject_class",
    "reject_prototype_regularized",
]

LossSpec = torch.nn.Module | Callable[[int], torch.nn.Module] | Sequence[torch.nn.Module]
ConsistencySpec = SimilarityConsistencyLoss | Mapping[str, Any] | None


def is_size_dependent(module: torch.nn.Module) -> bool:
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


def reject_class(value: object, name: str, *, factory: bool = False) -> None:
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


def reject_prototype_regularized(module: torch.nn.Module, name: str) -> None:
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


def holds_references(module: torch.nn.Module) -> bool:
    """True if ``module`` (or a wrapped loss) compares the batch with state of its own.

    That is: it has parameters (proxies, class weights) or buffers (a memory
    bank, as ``CrossBatchMemory``'s ``embedding_memory``, or any stored
    reference set), so it does not need pairs within the batch. A stock PML
    loss without either only compares the batch's samples with each other.
    """
    return any(True for _ in itertools.chain(module.parameters(), module.buffers()))


def build_head_weights(head_weights: Sequence[float] | None, sizes: Sequence[int]) -> list[float]:
    """One non-negative float per head (default all 1)."""
    num_heads = len(sizes)
    if head_weights is None:
        return [1.0] * num_heads
    weights = list(head_weights)
    if len(weights) != num_heads or not all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w) and w >= 0
        for w in weights
    ):
        raise ValueError(
            f"head_weights must hold {num_heads} non-negative numbers (one per "
            f"head of embedding_sizes={list(sizes)}), got {weights}"
        )
    return [float(w) for w in weights]


def check_pairs_possible(
    losses: Iterable[torch.nn.Module],
    labels: torch.Tensor | None,
    indices_tuple: Any,
    has_ref: bool,
    check_inputs: bool,
) -> None:
    """Reject a single-class batch when a head's loss only compares batch samples.

    A loss with no state of its own (contrastive, triplet, multi-similarity,
    ...) can only pair the batch's samples with each other, so a batch of one
    class gives it no negative pair: its loss loses the negative term or is
    0, silently. Losses that compare the batch with references of their own
    (see :func:`holds_references`: proxy losses, ``CrossBatchMemory`` and
    other memory banks) are fine with it, and so are calls without labels
    (label-free losses) or with ``ref_emb`` or an ``indices_tuple`` (the
    caller chose the comparisons).
    """
    if labels is None or indices_tuple is not None or has_ref or len(labels) == 0:
        return
    if not torch.is_tensor(labels) or (labels.device.type != "cpu" and not check_inputs):
        return  # PML's forward checks the type; a device read would synchronise
    pair_losses = [
        type(head_loss).__name__ for head_loss in losses if not holds_references(head_loss)
    ]
    if pair_losses and bool((labels == labels.reshape(-1)[0]).all()):
        raise ValueError(
            f"labels holds a single class ({labels.reshape(-1)[0].item()}) for the whole "
            f"batch, so {pair_losses[0]} has no negative pair and would silently lose its "
            "negative term: sample batches with at least 2 classes (e.g. MPerClassSampler), "
            "or use a loss with references of its own (a proxy loss, CrossBatchMemory)"
        )


def build_head_losses(loss: LossSpec, sizes: Sequence[int]) -> list[torch.nn.Module]:
    """One loss per head from ``loss`` (see :class:`MultiHeadLoss`'s ``loss``)."""
    sizes = list(sizes)
    num_heads = len(sizes)
    reject_class(loss, "loss", factory=True)
    if isinstance(loss, torch.nn.Module):
        reject_prototype_regularized(loss, "loss")
        if is_size_dependent(loss):
            name = type(loss).__name__
            raise ValueError(
                f"{name} has parameters or an embedding_size, so one instance cannot "
                "serve heads of different widths: pass a factory such as "
                f"`lambda embedding_size: {name}(..., embedding_size=embedding_size)` "
                f"or a list of {num_heads} losses, one per head "
                f"(embedding_sizes={sizes})"
            )
        losses = [copy.deepcopy(loss) for _ in sizes]
    elif isinstance(loss, Sequence) and not isinstance(loss, (str, bytes)):
        losses = list(loss)
        if len(losses) != num_heads:
            raise ValueError(
                f"loss is a list of {len(losses)} losses, but embedding_sizes={sizes} "
                f"has {num_heads} heads"
            )
        for i, item in enumerate(losses):
            reject_class(item, f"loss[{i}]")
            if not isinstance(item, torch.nn.Module):
                raise TypeError(
                    f"loss[{i}] must be a torch.nn.Module loss, got {type(item).__name__}"
                )
            reject_prototype_regularized(item, f"loss[{i}]")
        for i, item in enumerate(losses):
            if any(item is other for other in losses[:i]):
                if is_size_dependent(item):
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
            reject_prototype_regularized(item, f"the loss factory's loss for head {i}")
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


def build_head_miners(
    miner: BaseMiner | Sequence[BaseMiner | None] | None, sizes: Sequence[int]
) -> torch.nn.ModuleDict | None:
    """``{"head<i>": miner}`` for the heads that mine their own slice, or ``None``."""
    num_heads = len(sizes)
    if miner is None:
        return None
    reject_class(miner, "miner")
    if isinstance(miner, torch.nn.Module):
        miners = [copy.deepcopy(miner) for _ in range(num_heads)]
    elif isinstance(miner, Sequence) and not isinstance(miner, (str, bytes)):
        miners = list(miner)
        if len(miners) != num_heads:
            raise ValueError(
                f"miner is a list of {len(miners)} entries, but embedding_sizes="
                f"{list(sizes)} has {num_heads} heads"
            )
    else:
        raise TypeError(
            f"miner must be a PML miner or a list of miners, got {type(miner).__name__}"
        )
    for i, item in enumerate(miners):
        reject_class(item, f"miner[{i}]")
        if item is not None and not isinstance(item, torch.nn.Module):
            raise TypeError(f"miner[{i}] must be a PML miner or None, got {type(item).__name__}")
        if item is not None and any(item is other for other in miners[:i]):
            miners[i] = copy.deepcopy(item)
    return torch.nn.ModuleDict({f"head{i}": m for i, m in enumerate(miners) if m is not None})


def build_consistency(
    consistency: ConsistencySpec, sizes: Sequence[int], enabled: bool
) -> SimilarityConsistencyLoss | None:
    """The consistency module for ``sizes``, or ``None`` when the term is off (``enabled``)."""
    sizes = list(sizes)
    reject_class(consistency, "consistency")
    if len(sizes) < 2:
        if consistency is not None:
            raise ValueError(
                "consistency was given, but embedding_sizes="
                f"{sizes} has a single head: there is nothing to compare"
            )
        return None
    if consistency is None:
        module = SimilarityConsistencyLoss(sizes)
    elif isinstance(consistency, SimilarityConsistencyLoss):
        if consistency.embedding_sizes != sizes:
            raise ValueError(
                f"consistency was built for embedding_sizes={consistency.embedding_sizes}, "
                f"but this loss has embedding_sizes={sizes}"
            )
        module = consistency
    elif isinstance(consistency, Mapping):
        module = SimilarityConsistencyLoss(sizes, **consistency)
    else:
        raise TypeError(
            "consistency must be None, a dict of SimilarityConsistencyLoss options or a "
            f"SimilarityConsistencyLoss, got {type(consistency).__name__}"
        )
    return module if enabled else None
