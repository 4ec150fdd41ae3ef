"""The similarity-consistency term between the heads of a multi-head embedder.

The paper enforces consistency between the feature similarity matrices of CRT
heads with different numbers of prototypes and embedding sizes. This module
holds the one implementation of that term;
:class:`pml_crt.losses.SimilarityConsistencyLoss`,
:class:`pml_crt.regularizers.SimilarityConsistencyRegularizer` (and through the
former :class:`pml_crt.losses.MultiHeadLoss`) all use
:func:`similarity_consistency_rows`, the per-sample form that PML reducers
reduce; :func:`similarity_consistency` is its mean.

(It lived in ``pml_crt.utils.consistency``, which still re-exports it with a
``DeprecationWarning``.)
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import combinations
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import BaseDistance, CosineSimilarity

from .utils.layout import split_heads
from .utils.validation import (
    check_choice,
    check_embedding_sizes,
    check_embeddings,
    check_number,
)

__all__ = [
    "MODES",
    "STOP_GRADIENTS",
    "SimilarityConsistencyMixin",
    "check_consistency_options",
    "similarity_consistency",
    "similarity_consistency_rows",
]

Mode = Literal["mse", "l1", "kl"]
StopGradient = Literal["first", "larger"] | None

MODES: tuple[str, ...] = ("mse", "l1", "kl")
STOP_GRADIENTS: tuple[str | None, ...] = (None, "first", "larger")


def check_consistency_options(
    embedding_sizes: Sequence[int],
    mode: str = "mse",
    temperature: float = 0.1,
    stop_gradient: str | None = None,
    distance: object = None,
) -> list[int]:
    """Validate the options of :func:`similarity_consistency`; return the sizes as a list.

    Raises ``ValueError`` (fewer than two heads, unknown ``mode`` or
    ``stop_gradient``, non-positive ``temperature``) or ``TypeError``
    (``distance`` not a PML distance).
    """
    sizes = check_embedding_sizes(embedding_sizes)
    if len(sizes) < 2:
        raise ValueError(
            f"similarity consistency needs at least 2 heads, got embedding_sizes={sizes}"
        )
    check_choice(mode, "mode", MODES)
    check_choice(stop_gradient, "stop_gradient", STOP_GRADIENTS)
    check_number(temperature, "temperature", greater_than=0.0)
    if distance is not None and not isinstance(distance, BaseDistance):
        raise TypeError(
            "distance must be a pytorch_metric_learning.distances.BaseDistance, "
            f"got {type(distance).__name__}"
        )
    return sizes


def _teacher(a: int, b: int, sizes: Sequence[int], stop_gradient: str | None) -> int | None:
    """The head of pair ``(a, b)``, ``a < b``, whose matrix is detached (``None``: neither)."""
    if stop_gradient == "first":
        return a if a == 0 else None
    if stop_gradient == "larger":
        return b if sizes[b] > sizes[a] else a
    return None


def _off_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """The ``(B, B - 1)`` off-diagonal entries of a ``(B, B)`` matrix, row by row.

    Shape arithmetic only (no boolean mask), so no host synchronisation: the
    flattened matrix without its first entry, cut into rows of ``B + 1``,
    starts each row just after a diagonal entry and ends on the next one.
    """
    batch = matrix.shape[0]
    return matrix.flatten()[1:].view(batch - 1, batch + 1)[:, :-1].reshape(batch, batch - 1)


def similarity_consistency_rows(
    embeddings: torch.Tensor,
    embedding_sizes: Sequence[int],
    *,
    ref_embeddings: torch.Tensor | None = None,
    mode: Mode = "kl",
    distance: BaseDistance | None = None,
    temperature: float = 0.1,
    stop_gradient: StopGradient = None,
    include_diagonal: bool = False,
    check_inputs: bool = False,
) -> torch.Tensor:
    """Per-sample disagreement between the batch similarity matrices of every pair of heads.

    For each head ``h``, ``S_h = distance(z_h)`` is the ``(B, B)`` similarity
    matrix of that head's slice ``z_h`` over the batch (with the default
    :class:`~pytorch_metric_learning.distances.CosineSimilarity`,
    ``S_h = ẑ_h ẑ_h^T``). With ``ref_embeddings`` it is the ``(B, R)``
    cross-matrix ``distance(z_h, r_h)``. Row ``i`` of the result is, averaged
    over the ``H (H - 1) / 2`` head pairs ``a < b``:

    - ``"mse"``: ``mean_j (S_a[i, j] - S_b[i, j])^2``;
    - ``"l1"``: ``mean_j |S_a[i, j] - S_b[i, j]|``;
    - ``"kl"``: ``KL(P_a[i] || P_b[i])`` with ``P_h = softmax(S_h / T)``
      row-wise (``softmax(-S_h / T)`` when ``distance`` is a distance rather
      than a similarity, i.e. ``distance.is_inverted`` is false). The first
      argument of the KL is the *teacher* (the target distribution): head
      ``a`` unless ``stop_gradient`` makes ``b`` the teacher.

    Every row has the same number of columns, so the mean of the rows is the
    mean over pairs of each pair's mean over all entries
    (:func:`similarity_consistency`); PML reducers act on the rows.

    Args:
        embeddings: ``(B, sum(embedding_sizes))``, the heads concatenated on dim 1.
        embedding_sizes: the width of every head, at least two heads.
        ref_embeddings: optional ``(R, sum(embedding_sizes))``; compare
            ``embeddings`` against it instead of against themselves.
        mode: ``"kl"`` (default: on Omniglot validation classes with
            Multi-Similarity it did better than ``"mse"``, by a narrow margin,
            and ``"l1"`` made no difference), ``"mse"`` or ``"l1"``.
        distance: a PML distance; ``None`` means ``CosineSimilarity()``.
        temperature: ``T`` of ``"kl"`` (ignored otherwise). The default 0.1
            makes the softmax of cosine similarities in ``[-1, 1]`` peaked
            enough to carry the neighbour ranking.
        stop_gradient: ``None`` (both sides get gradients); ``"first"`` (the
            primary head 0 is the teacher: its matrix is detached, so it only
            pulls the other heads; pairs between two other heads keep both
            gradients); ``"larger"`` (in each pair the head with the larger
            embedding size is the detached teacher; on a tie, the lower index).
        include_diagonal: keep the self-similarities ``S_h[i, i]``. Default
            ``False``: they carry no relation between samples (always 1 for
            cosine similarity), dilute the mean and dominate the ``"kl"``
            softmax. Only applies without ``ref_embeddings`` (a
            cross-matrix has no self-pairs).
        check_inputs: also reject NaN and infinite values
            (:class:`~pml_crt.utils.validation.NonFiniteError`). Off by
            default: the check reads a value back to the host, a device
            synchronisation on every call.

    Returns:
        A ``(B,)`` tensor.

    Raises:
        ValueError: fewer than 2 heads, a bad shape (``embeddings`` must be
            ``(B, sum(embedding_sizes))``), fewer than 2 samples without
            ``ref_embeddings``, or a bad option.
    """
    sizes = check_consistency_options(embedding_sizes, mode, temperature, stop_gradient, distance)
    embeddings = check_embeddings(embeddings, sizes, "embeddings", check_values=check_inputs)
    if distance is None:
        distance = CosineSimilarity()
    if ref_embeddings is None:
        if embeddings.shape[0] < 2:
            raise ValueError(
                "similarity consistency compares samples within the batch, so embeddings "
                f"needs at least 2 rows, got shape {tuple(embeddings.shape)}"
            )
        ref_heads: tuple[torch.Tensor | None, ...] = (None,) * len(sizes)
        drop_diagonal = not include_diagonal
    else:
        ref_embeddings = check_embeddings(
            ref_embeddings, sizes, "ref_embeddings", check_values=check_inputs
        )
        if embeddings.shape[0] == 0 or ref_embeddings.shape[0] == 0:
            raise ValueError(
                f"embeddings {tuple(embeddings.shape)} and ref_embeddings "
                f"{tuple(ref_embeddings.shape)} must both have at least 1 row"
            )
        ref_heads = split_heads(ref_embeddings, sizes)
        drop_diagonal = False

    matrices = []
    for head, ref_head in zip(split_heads(embeddings, sizes), ref_heads, strict=True):
        matrix = distance(head, ref_head)
        if drop_diagonal:
            matrix = _off_diagonal(matrix)
        if mode == "kl":
            sign = 1.0 if distance.is_inverted else -1.0
            matrix = F.log_softmax(matrix * (sign / temperature), dim=1)
        matrices.append(matrix)

    pair_rows = []
    for a, b in combinations(range(len(sizes)), 2):
        teacher = _teacher(a, b, sizes, stop_gradient)
        target, student = (matrices[b], matrices[a]) if teacher == b else (matrices[a], matrices[b])
        if teacher is not None:
            target = target.detach()
        if mode == "mse":
            rows = (target - student).pow(2).mean(1)
        elif mode == "l1":
            rows = (target - student).abs().mean(1)
        else:
            rows = F.kl_div(student, target, reduction="none", log_target=True).sum(1)
        pair_rows.append(rows)
    return torch.stack(pair_rows).mean(0)


def similarity_consistency(
    embeddings: torch.Tensor,
    embedding_sizes: Sequence[int],
    *,
    ref_embeddings: torch.Tensor | None = None,
    mode: Mode = "kl",
    distance: BaseDistance | None = None,
    temperature: float = 0.1,
    stop_gradient: StopGradient = None,
    include_diagonal: bool = False,
    check_inputs: bool = False,
) -> torch.Tensor:
    """Mean disagreement between the batch similarity matrices of every pair of heads.

    The mean over samples of :func:`similarity_consistency_rows` (see there for
    the formula and every argument): for each pair of heads ``a < b``,
    ``"mse"`` is ``mean((S_a - S_b)^2)``, ``"l1"`` ``mean(|S_a - S_b|)`` and
    ``"kl"`` ``mean_i KL(P_a[i] || P_b[i])``, averaged over the
    ``H (H - 1) / 2`` pairs. This is what the loss and the regularizer give
    with PML's default ``MeanReducer``.

    Returns:
        A scalar tensor.
    """
    return similarity_consistency_rows(
        embeddings,
        embedding_sizes,
        ref_embeddings=ref_embeddings,
        mode=mode,
        distance=distance,
        temperature=temperature,
        stop_gradient=stop_gradient,
        include_diagonal=include_diagonal,
        check_inputs=check_inputs,
    ).mean()


class SimilarityConsistencyMixin:
    """Options and evaluation shared by the loss and the regularizer forms of the term.

    Mixed in before a PML base class (``BaseMetricLossFunction`` or
    ``BaseRegularizer``), which receives ``**kwargs`` (``distance``,
    ``reducer``, ...). The default distance is ``CosineSimilarity()``.
    """

    def __init__(
        self,
        embedding_sizes: Sequence[int],
        mode: Mode = "kl",
        temperature: float = 0.1,
        stop_gradient: StopGradient = None,
        include_diagonal: bool = False,
        check_inputs: bool = False,
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
        self.check_inputs = bool(check_inputs)
        self.add_to_recordable_attributes(
            list_of_names=["num_heads", "temperature", "include_diagonal"], is_stat=False
        )

    def get_default_distance(self) -> CosineSimilarity:
        return CosineSimilarity()

    def consistency_rows(
        self, embeddings: torch.Tensor, ref_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The ``(B,)`` per-sample term of ``(B, sum(embedding_sizes))`` embeddings."""
        return similarity_consistency_rows(
            embeddings,
            self.embedding_sizes,
            ref_embeddings=ref_embeddings,
            mode=self.mode,
            distance=self.distance,
            temperature=self.temperature,
            stop_gradient=self.stop_gradient,
            include_diagonal=self.include_diagonal,
            check_inputs=self.check_inputs,
        )

    def consistency(
        self, embeddings: torch.Tensor, ref_embeddings: torch.Tensor | None = None
    ) -> torch.Tensor:
        """The mean term (what the default ``MeanReducer`` gives), a scalar."""
        return self.consistency_rows(embeddings, ref_embeddings).mean()

    def element_loss_dict(
        self, embeddings: torch.Tensor, ref_embeddings: torch.Tensor | None = None
    ) -> dict[str, dict[str, Any]]:
        """PML's ``{"loss": ...}`` of per-sample losses, ``reduction_type="element"``.

        The indices are the rows of ``embeddings``; ``divisor`` (for
        ``DivisorReducer``) is their number, so every stock reducer that
        averages gives the mean, and ``ThresholdReducer`` filters samples.
        """
        rows = self.consistency_rows(embeddings, ref_embeddings)
        indices = torch.arange(rows.shape[0], device=rows.device)
        return {
            "loss": {
                "losses": rows,
                "indices": indices,
                "reduction_type": "element",
                "divisor": rows.shape[0],
            }
        }

    def extra_repr(self) -> str:
        return (
            f"embedding_sizes={self.embedding_sizes}, mode={self.mode!r}, "
            f"temperature={self.temperature}, stop_gradient={self.stop_gradient!r}, "
            f"include_diagonal={self.include_diagonal}, check_inputs={self.check_inputs}"
        )
