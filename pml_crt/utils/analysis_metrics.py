"""Roth et al.'s embedding-space analysis metrics as ``AccuracyCalculator`` metrics.

Roth, Milbich, Sinha, Gupta, Ommer, Cohen, "Revisiting Training Strategies and
Generalization Performance in Deep Metric Learning", ICML 2020, Section 5:

* ``spectral_decay`` (their rho): how evenly the embedding matrix spreads its
  energy over its singular directions. Lower means a flatter spectrum.
* ``embedding_density`` (their pi_ratio): mean intra-class distance over mean
  distance between class centres. Lower means denser classes.

Both are plain functions of a ``(N, D)`` embedding tensor (and labels), and
:class:`AnalysisAccuracyCalculator` exposes them as ``calculate_*`` metrics so
that PML's stock testers report them next to P@1 and MAP@R. Both work in
float64 internally and never build an ``N x N`` matrix: memory stays bounded by
``block_elements`` float64 entries (plus the ``D x D`` Gram matrix), so they run
on e.g. 120k x 512 test sets.
"""

from __future__ import annotations

import math

import torch
from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

from .validation import check_finite

__all__ = ["AnalysisAccuracyCalculator", "embedding_density", "spectral_decay"]

#: Default largest number of float64 entries in one working block (128 MiB).
BLOCK_ELEMENTS = 2**24


def _check_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    if not isinstance(embeddings, torch.Tensor):
        embeddings = torch.as_tensor(embeddings)
    if embeddings.dim() != 2:
        raise ValueError(
            f"embeddings must be a 2-D (N, D) tensor, got shape {tuple(embeddings.shape)}"
        )
    if embeddings.shape[0] == 0 or embeddings.shape[1] == 0:
        raise ValueError(f"embeddings must be non-empty, got shape {tuple(embeddings.shape)}")
    if not embeddings.is_floating_point():
        embeddings = embeddings.double()
    check_finite(embeddings, "embeddings")
    return embeddings


def _check_block_elements(block_elements: int) -> int:
    if int(block_elements) < 1:
        raise ValueError(f"block_elements must be a positive integer, got {block_elements}")
    return int(block_elements)


def _singular_values(x: torch.Tensor, block_elements: int) -> torch.Tensor:
    """The ``min(N, D)`` singular values of ``x``, descending, in float64.

    Eigenvalues of the smaller Gram matrix (``X^T X`` or ``X X^T``), accumulated
    in float64 over row blocks so that ``x`` is never copied whole.
    """
    n, d = x.shape
    if n >= d:
        gram = torch.zeros(d, d, dtype=torch.float64, device=x.device)
        rows = max(1, block_elements // d)
        for start in range(0, n, rows):
            block = x[start : start + rows].to(torch.float64)
            gram += block.T @ block
    else:
        x64 = x.to(torch.float64)  # n < d, so the n x n Gram and x64 are small
        gram = x64 @ x64.T
    eigenvalues = torch.linalg.eigvalsh(gram)  # ascending
    return eigenvalues.flip(0).clamp_min(0).sqrt()


def spectral_decay(
    embeddings: torch.Tensor, eps: float = 1e-12, block_elements: int = BLOCK_ELEMENTS
) -> float:
    """Roth et al.'s spectral decay ``rho`` of an embedding matrix.

    Definition: ``s`` are the ``n = min(N, D)`` singular values of the
    ``(N, D)`` matrix *as given* (not centred, as in Roth et al., who apply it
    to the L2-normalised embeddings that the tester also uses), normalised to
    sum 1; ``rho = KL(uniform || s) = sum_i (1/n) log((1/n) / s_i)
    = -log(n) - mean_i log(s_i)``. It is 0 for a perfectly flat spectrum and
    grows as the energy concentrates in fewer directions.

    Normalised singular values below ``eps`` are raised to ``eps``, so a
    rank-deficient matrix gives a large finite ``rho`` (at most
    ``-log(n * eps)``) instead of ``inf``. Through the Gram matrix, singular
    values below about ``1e-8`` of the largest are float64 rounding noise, so
    for a (numerically) rank-deficient input the exact large value is not
    meaningful, only that it is large.

    The singular values come from the eigenvalues of the float64 Gram matrix
    (``D x D``, or ``N x N`` when ``N < D``), built over row blocks of at most
    ``block_elements`` entries: memory ``O(D^2)``, no copy of the whole input.

    Raises:
        ValueError: ``embeddings`` is not a finite, non-empty 2-D tensor or is
            all zeros.
    """
    x = _check_embeddings(embeddings)
    block_elements = _check_block_elements(block_elements)
    s = _singular_values(x, block_elements)
    total = s.sum()
    if not bool(total > 0):
        raise ValueError("embeddings are all zero: their spectrum is undefined")
    s = (s / total).clamp_min(eps)
    n = s.numel()
    return float(-math.log(n) - torch.log(s).mean())


def _mean_pairwise_distance(x: torch.Tensor, block_elements: int) -> torch.Tensor:
    """Mean Euclidean distance over the ordered pairs ``i != j`` of rows of ``x``.

    ``x`` is float64 and has at least 2 rows. Distances are computed for row
    blocks against all rows (``rows * len(x) <= block_elements`` entries), the
    diagonal is zeroed explicitly, so memory never reaches ``len(x) ** 2``.
    ``x`` is centred first (distances do not change) so that the matrix-product
    form of ``cdist`` loses little precision.
    """
    n = x.shape[0]
    x = x - x.mean(dim=0, keepdim=True)
    rows = max(1, block_elements // n)
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    for start in range(0, n, rows):
        block = x[start : start + rows]
        dist = torch.cdist(block, x, compute_mode="use_mm_for_euclid_dist")
        idx = torch.arange(block.shape[0], device=x.device)
        dist[idx, idx + start] = 0.0
        total += dist.sum()
    return total / (n * (n - 1))


def embedding_density(
    embeddings: torch.Tensor, labels: torch.Tensor, block_elements: int = BLOCK_ELEMENTS
) -> float:
    """Roth et al.'s embedding density ``pi_ratio = pi_intra / pi_inter``.

    Definition (Euclidean distance on the embeddings as given; the tester
    passes L2-normalised ones):

    * ``pi_intra``: for every class with at least 2 samples, the mean distance
      over its pairs of distinct samples; then the unweighted mean over those
      classes (every class counts once, whatever its size). Singleton classes
      have no pairs and are left out of ``pi_intra``.
    * ``pi_inter``: the mean distance over the pairs of distinct classes
      between their centres (the mean embedding of each class, singletons
      included).

    ``0`` means every class is collapsed to a point. If all class centres
    coincide (``pi_inter == 0``) the result is ``inf``, or ``nan`` when
    ``pi_intra`` is 0 too.

    Memory: no ``N x N`` (or ``C x C``) matrix; distances are summed over blocks
    of at most ``block_elements`` float64 entries.

    Raises:
        ValueError: ``embeddings`` is not a finite, non-empty 2-D tensor;
            ``labels`` is not of shape ``(N,)`` (``(N, 1)`` is accepted), has
            fewer than 2 classes, or no class with 2 or more samples.
    """
    x = _check_embeddings(embeddings)
    block_elements = _check_block_elements(block_elements)
    if not isinstance(labels, torch.Tensor):
        labels = torch.as_tensor(labels)
    if labels.dim() == 2 and labels.shape[1] == 1:
        labels = labels[:, 0]
    if labels.dim() != 1 or labels.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels must have shape (N,) = ({x.shape[0]},) to match embeddings "
            f"of shape {tuple(x.shape)}, got {tuple(labels.shape)}"
        )
    labels = labels.to(x.device)
    unique, inverse, counts = torch.unique(labels, return_inverse=True, return_counts=True)
    num_classes = unique.numel()
    if num_classes < 2:
        raise ValueError(
            f"labels must contain at least 2 classes for embedding_density, got {num_classes}"
        )
    if not bool((counts >= 2).any()):
        raise ValueError(
            "labels must contain at least one class with 2 or more samples for "
            "embedding_density (every class is a singleton)"
        )

    order = torch.argsort(inverse, stable=True)
    ends = torch.cumsum(counts, 0).tolist()
    starts = [0] + ends[:-1]
    centres = torch.empty(num_classes, x.shape[1], dtype=torch.float64, device=x.device)
    intra = []
    for c, (start, end) in enumerate(zip(starts, ends, strict=True)):
        members = x[order[start:end]].to(torch.float64)
        centres[c] = members.mean(dim=0)
        if end - start >= 2:
            intra.append(_mean_pairwise_distance(members, block_elements))
    pi_intra = float(torch.stack(intra).mean())
    pi_inter = float(_mean_pairwise_distance(centres, block_elements))
    if pi_inter == 0.0:
        return float("nan") if pi_intra == 0.0 else float("inf")
    return pi_intra / pi_inter


class AnalysisAccuracyCalculator(AccuracyCalculator):
    """PML's ``AccuracyCalculator`` plus Roth et al.'s analysis metrics.

    Adds the metrics ``"spectral_decay"`` and ``"embedding_density"``, computed
    on the query embeddings (and query labels) that ``get_accuracy`` receives,
    i.e. on the evaluated split as the tester gives it (L2-normalised by
    default). They are whole-set scalars: ``avg_of_avgs`` and
    ``return_per_class`` do not apply to them. They are not in
    ``requires_knn()`` or ``requires_clustering()``, so asking only for them
    runs no k-NN search and no k-means.

    Example::

        AnalysisAccuracyCalculator(
            include=("precision_at_1", "mean_average_precision_at_r",
                     "spectral_decay", "embedding_density"),
            k="max_bin_count", knn_func=make_knn_func())
    """

    def calculate_spectral_decay(self, query, **kwargs):
        return spectral_decay(query)

    def calculate_embedding_density(self, query, query_labels, **kwargs):
        # A split with one class, or only singletons, has no density: report NaN as PML
        # does for other undefined metrics, instead of failing the whole evaluation.
        classes, counts = torch.unique(
            query_labels.reshape(len(query_labels), -1)[:, 0], return_counts=True
        )
        if len(classes) < 2 or not bool((counts > 1).any()):
            return float("nan")
        return embedding_density(query, query_labels)
