"""Multi-process training (``torch.distributed`` / DDP) with pml-crt's losses.

**What PML already gives.** Wrap the loss in PML's
``pytorch_metric_learning.utils.distributed.DistributedLossWrapper`` (with the
default ``efficient=False``) and the loss on every rank is computed on the
embeddings of *all* ranks: ``[local, rank 0, ..., rank W-1 without local]``,
labels included. Only the local slice carries gradients (the others come from
a plain ``all_gather``), so PML returns ``world_size * loss``; after DDP's
averaging the gradient of every *model* parameter equals the single-process
gradient on the concatenated batch. For :class:`~pml_crt.losses.MultiHeadLoss`
this covers everything it computes, since all of it happens inside
``compute_loss`` on the gathered batch: every head's loss, its per-head
``miner`` (mines the full batch), the ``(B_total, B_total)`` similarity
matrices of the consistency term, and an ``embedding_regularizer`` such as
:class:`~pml_crt.regularizers.SimilarityConsistencyRegularizer` (also on any
other PML loss). An external tuple miner must be wrapped in PML's
``DistributedMinerWrapper`` (``efficient=False``) so its indices refer to the
same gathered order.

**What it does not.** (1) The returned value is ``world_size`` times the
full-batch loss. (2) Parameters of the loss itself (``ProxyAnchorLoss``'s
proxies, ``ArcFaceLoss``'s weights, ...) are not under DDP and get
``world_size`` times their single-process gradient on every rank (wrapping the
loss in DDP does not help: it averages ``W * g`` to ``W * g``). (3)
``efficient=True`` computes a different loss (local rows against all columns)
whose gradients do not match, and conflicts with a ``MultiHeadLoss(miner=...)``.

:class:`AllGatherLossWrapper` fixes (1) and (2): it gathers with gradients
(:func:`all_gather_with_grad`) and returns the unscaled full-batch loss.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from pytorch_metric_learning.losses import BaseMetricLossFunction, CrossBatchMemory
from pytorch_metric_learning.utils import common_functions as pml_cf
from pytorch_metric_learning.utils.distributed import (
    DistributedLossWrapper,
    DistributedMinerWrapper,
    all_gather,
    is_distributed,
)
from torch.utils.data import Sampler

__all__ = [
    "AllGatherLossWrapper",
    "DistributedLossWrapper",
    "DistributedMinerWrapper",
    "RankShardSampler",
    "all_gather_with_grad",
    "get_world_size",
    "is_distributed",
]


def get_world_size() -> int:
    """The number of processes of the default group, 1 outside ``torch.distributed``."""
    return dist.get_world_size() if is_distributed() else 1


class _AllGatherWithGrad(torch.autograd.Function):
    """``[x_local, x_0, ..., x_{W-1} without x_local]``, differentiable w.r.t. ``x_local``.

    Backward: every rank's gradient w.r.t. the gathered tensor is brought back
    to rank order and summed over ranks (``all_reduce``); each rank keeps the
    sum over its own rows. This is the exact gradient of the sum of all ranks'
    losses, whatever each rank computes.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        world_size, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.order = rank, [rank] + [r for r in range(world_size) if r != rank]
        return torch.cat([x] + [parts[r] for r in ctx.order[1:]], dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        chunks = grad.chunk(len(ctx.order), dim=0)
        by_rank = [None] * len(ctx.order)
        for position, r in enumerate(ctx.order):
            by_rank[r] = chunks[position]
        total = torch.cat(by_rank, dim=0).contiguous()
        dist.all_reduce(total)
        return total.chunk(len(ctx.order), dim=0)[ctx.rank]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` of every rank, local rows first, keeping gradients.

    The order is PML's (``DistributedLossWrapper``, ``DistributedMinerWrapper``):
    the local ``x`` first, then the other ranks in rank order. Every rank must
    pass a tensor of the same shape. Outside ``torch.distributed`` (or with one
    process) it returns ``x``.
    """
    if get_world_size() <= 1:
        return x
    return _AllGatherWithGrad.apply(x)


class AllGatherLossWrapper(DistributedLossWrapper):
    """PML's ``DistributedLossWrapper`` whose loss is the true full-batch loss.

    The embeddings (and ``ref_emb``) of all ranks are gathered *with*
    gradients, labels without, and the wrapped loss is computed on them, so:

    - the returned value equals the single-process loss on the concatenated
      batch (PML's wrapper returns ``world_size`` times it);
    - the gradient of every parameter of the wrapped loss equals its
      single-process gradient, on every rank, without DDP on the loss;
    - after DDP's averaging, the gradient of every model parameter equals its
      single-process gradient (the backward of the gather sums the gradients
      of all ranks' identical losses, i.e. ``world_size`` times the local one,
      which DDP's mean divides back).

    "Equals" means up to float rounding: each rank sums over the same rows in
    a different order. An ``indices_tuple`` refers to the gathered order, as
    made by PML's ``DistributedMinerWrapper`` (``efficient=False``).
    ``CrossBatchMemory`` keeps PML's behaviour; there is no ``efficient`` mode.
    Every rank must use the same local batch size.

    Args:
        loss: a ``BaseMetricLossFunction`` such as
            :class:`~pml_crt.losses.MultiHeadLoss` or
            :class:`~pml_crt.losses.SimilarityConsistencyLoss`.
    """

    def __init__(self, loss: BaseMetricLossFunction | CrossBatchMemory) -> None:
        super().__init__(loss, efficient=False)

    def forward_regular_loss(
        self,
        emb: torch.Tensor,
        labels: torch.Tensor | None,
        indices_tuple: Any,
        ref_emb: torch.Tensor | None,
        ref_labels: torch.Tensor | None,
        world_size: int,
    ) -> torch.Tensor:
        if world_size <= 1:
            return self.loss(emb, labels, indices_tuple, ref_emb, ref_labels)
        all_emb, all_labels = _gather(emb, labels)
        all_ref_emb, all_ref_labels = None, None
        if ref_emb is not None:
            all_ref_emb, all_ref_labels = _gather(ref_emb, ref_labels)
        return self.loss(all_emb, all_labels, indices_tuple, all_ref_emb, all_ref_labels)


def _gather(
    emb: torch.Tensor, labels: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    all_emb = all_gather_with_grad(emb)
    if labels is None:
        return all_emb, None
    labels = labels.to(emb.device)
    return all_emb, torch.cat([labels, all_gather(labels)], dim=0)


class RankShardSampler(Sampler):
    """This rank's contiguous share of every global batch drawn by ``sampler``.

    ``sampler`` (e.g. ``MPerClassSampler(..., batch_size=global_batch_size)``)
    is iterated under a numpy generator seeded with ``seed + epoch`` (PML's
    samplers draw from ``common_functions.NUMPY_RANDOM``), so every rank sees
    the same global batches whatever else used the random generators, and a
    resumed run draws what it would have drawn (:meth:`set_epoch`, as with
    torch's ``DistributedSampler``). Each iteration advances the epoch by one.
    Use ``global_batch_size // world_size`` as the DataLoader's batch size.

    Args:
        sampler: draws global batches of ``global_batch_size`` indices in a row.
        global_batch_size: the batch of all ranks together; a multiple of ``world_size``.
        rank: this process's rank, in ``[0, world_size)``.
        world_size: the number of processes.
        seed: the same on every rank.
    """

    def __init__(
        self, sampler: Sampler, global_batch_size: int, rank: int, world_size: int, seed: int = 0
    ) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if global_batch_size < 1 or global_batch_size % world_size:
            raise ValueError(
                f"global_batch_size must be a positive multiple of the world size {world_size}, "
                f"got {global_batch_size}"
            )
        self.sampler, self.global_batch_size = sampler, global_batch_size
        self.local_batch_size = global_batch_size // world_size
        self.rank, self.seed, self.epoch = rank, seed, 0

    def set_epoch(self, epoch: int) -> None:
        """Draw the batches of ``epoch`` (0-based) next."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.global_batch_size * self.local_batch_size

    def __iter__(self) -> Iterator[int]:
        saved = pml_cf.NUMPY_RANDOM
        pml_cf.NUMPY_RANDOM = np.random.RandomState(self.seed + self.epoch)
        try:
            indices = list(self.sampler)
        finally:
            pml_cf.NUMPY_RANDOM = saved
        self.epoch += 1
        start = self.rank * self.local_batch_size
        for batch in range(len(indices) // self.global_batch_size):
            offset = batch * self.global_batch_size + start
            yield from indices[offset : offset + self.local_batch_size]
