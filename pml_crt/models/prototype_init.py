"""Prototypes (CRT) and centroids (NetVLAD) initialised from data by k-means.

NetVLAD's standard initialisation (Arandjelović et al., CVPR 2016) clusters
local descriptors of training images and starts the centroids there; the same
serves CRT's prototypes, which are directions in the projected feature space.
:func:`init_from_data` runs the trunk over a data loader, samples local
descriptors as the embedder itself computes them (after its input projection),
clusters them with :func:`kmeans` and hands the centres to the embedder::

    trunk, embedder = ..., NetVLAD(1280, num_clusters=64)  # or CRT, MultiHeadCRT
    init_from_data(embedder, trunk, train_loader, max_descriptors=50_000)

An embedder takes part by providing ``descriptors(x) -> (B, N, d)`` and
``set_centroids(centers)`` (:class:`~pml_crt.models.NetVLAD`), or
``project(x) -> (B, N, d)`` and ``set_prototypes(prototypes)``
(:class:`~pml_crt.models.CRT`), with centres of shape ``(K, d)``; or
``heads``, a sequence of such embedders (:class:`~pml_crt.models.MultiHeadCRT`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn.functional as F

from ..utils.validation import check_positive_int, check_tensor

__all__ = ["init_from_data", "kmeans", "sample_descriptors"]

_EPS = 1e-12


def _nearest(x: torch.Tensor, centers: torch.Tensor, spherical: bool) -> torch.Tensor:
    """Index ``(N,)`` of the centre nearest to each row of ``x`` (cosine or Euclidean)."""
    if spherical:
        return (x @ centers.t()).argmax(dim=1)
    return torch.cdist(x, centers).argmin(dim=1)


def _plus_plus(
    x: torch.Tensor, k: int, spherical: bool, generator: torch.Generator
) -> torch.Tensor:
    """k-means++ seeding: each next centre drawn with probability proportional to D(x)^2."""
    first = torch.randint(x.shape[0], (1,), generator=generator, device=x.device)
    centers = [x[first[0]]]
    closest = torch.full((x.shape[0],), float("inf"), dtype=x.dtype, device=x.device)
    for _ in range(1, k):
        last = centers[-1].unsqueeze(0)
        if spherical:
            distance = (1.0 - (x @ last.t()).squeeze(1)).clamp_min(0.0)
        else:
            distance = (x - last).pow(2).sum(dim=1)
        closest = torch.minimum(closest, distance)
        total = closest.sum()
        weights = closest / total if total > 0 else torch.ones_like(closest)
        index = torch.multinomial(weights, 1, generator=generator)
        centers.append(x[index[0]])
    return torch.stack(centers)


@torch.no_grad()
def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    iterations: int = 25,
    spherical: bool = True,
    seed: int = 0,
    init: torch.Tensor | None = None,
) -> torch.Tensor:
    """Lloyd's k-means with k-means++ seeding, deterministic for a given ``seed``.

    Args:
        x: ``(N, d)`` points, ``N >= num_clusters``.
        num_clusters: ``K``.
        iterations: Lloyd iterations (stops early when no assignment changes).
        spherical: cluster directions: rows are L2-normalised, points go to
            the centre of highest cosine similarity, and each centre is the
            normalised mean of its points (returned with unit norm).
            ``False``: plain Euclidean k-means.
        seed: seeds the k-means++ draws (a private generator; the global RNG
            is untouched). A centre left without points is re-seeded with the
            point farthest from its own centre.
        init: ``(K, d)`` starting centres instead of the k-means++ draws.

    Returns:
        ``(K, d)`` centres, in ``x``'s dtype and device.
    """
    x = check_tensor(x, "x")
    if x.dim() != 2:
        raise ValueError(f"x must be a 2-D (N, d) tensor, got shape {tuple(x.shape)}")
    check_positive_int(num_clusters, "num_clusters")
    check_positive_int(iterations, "iterations")
    if x.shape[0] < num_clusters:
        raise ValueError(
            f"x must hold at least num_clusters = {num_clusters} points, got {x.shape[0]}"
        )
    if spherical:
        x = F.normalize(x, dim=1, eps=_EPS)
    if init is None:
        generator = torch.Generator(device=x.device).manual_seed(int(seed))
        centers = _plus_plus(x, num_clusters, spherical, generator)
    else:
        centers = check_tensor(init, "init").to(x)
        if tuple(centers.shape) != (num_clusters, x.shape[1]):
            raise ValueError(
                f"init must have shape (num_clusters, d) = {(num_clusters, x.shape[1])}, "
                f"got {tuple(centers.shape)}"
            )
        if spherical:
            centers = F.normalize(centers, dim=1, eps=_EPS)
    labels = _nearest(x, centers, spherical)
    for _ in range(iterations):
        sums = torch.zeros_like(centers).index_add_(0, labels, x)
        counts = torch.bincount(labels, minlength=num_clusters).to(x.dtype)
        centers = sums / counts.clamp_min(1.0).unsqueeze(1)
        empty = (counts == 0).nonzero().flatten()
        if empty.numel():
            distance = (x - centers[labels]).pow(2).sum(dim=1)
            centers[empty] = x[distance.topk(empty.numel()).indices]
        if spherical:
            centers = F.normalize(centers, dim=1, eps=_EPS)
        new_labels = _nearest(x, centers, spherical)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return centers


def _images(batch: object) -> torch.Tensor:
    """The images of a loader's batch: the batch itself or its first item (PML's datasets)."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    raise TypeError(
        "loader must yield image tensors (B, ...) or (images, labels) pairs, "
        f"got a batch of type {type(batch).__name__}"
    )


class _UniformSample:
    """A uniform sample without replacement of a stream of rows, in bounded memory.

    Bottom-``k`` sampling: every row seen gets an independent uniform key, and
    the ``size`` rows with the smallest keys are kept. Any set of ``size`` rows
    is equally likely to hold the smallest keys, so the sample is exactly
    uniform whatever the order and sizes of the batches, with at most
    ``size`` plus one batch of rows in memory.
    """

    def __init__(self, size: int, generator: torch.Generator) -> None:
        self.size = size
        self.generator = generator
        self.rows: torch.Tensor | None = None  # (M, d), M <= size
        self.keys = torch.empty(0, dtype=torch.float64)  # (M,)
        self.positions = torch.empty(0, dtype=torch.long)  # (M,): index in the stream
        self.seen = 0

    def add(self, rows: torch.Tensor) -> None:
        """Offer the ``(n, d)`` rows that come next in the stream."""
        count = rows.shape[0]
        keys = torch.rand(count, generator=self.generator, dtype=torch.float64)
        positions = torch.arange(self.seen, self.seen + count)
        self.seen += count
        if self.rows is not None:
            rows = torch.cat([self.rows, rows])
            keys = torch.cat([self.keys, keys])
            positions = torch.cat([self.positions, positions])
        if rows.shape[0] > self.size:
            keep = keys.topk(self.size, largest=False).indices
            rows, keys, positions = rows[keep], keys[keep], positions[keep]
        self.rows, self.keys, self.positions = rows, keys, positions

    def sample(self) -> torch.Tensor:
        """The ``(M, d)`` sampled rows in stream order, ``M = min(size, rows seen)``."""
        if self.rows is None:
            raise ValueError("loader yielded no batches")
        return self.rows[self.positions.argsort()]


@torch.no_grad()
def sample_descriptors(
    embedders: Sequence[torch.nn.Module],
    trunk: torch.nn.Module,
    loader: Iterable,
    *,
    max_descriptors: int = 50_000,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Local descriptors of each embedder over the loader's images, sampled uniformly.

    Args:
        embedders: modules with ``descriptors(x) -> (B, N, d)`` (NetVLAD) or
            ``project(x) -> (B, N, d)`` (CRT).
        trunk: maps a batch of images to the ``(B, C, H, W)`` map (or ``(B, N, C)``
            tokens) the embedders take.
        loader: yields images ``(B, ...)`` or ``(images, labels)``.
        max_descriptors: at most this many descriptors per embedder are kept:
            a uniform sample without replacement of all positions seen (every
            position equally likely, whatever the batch it came in), drawn
            with ``seed`` and returned in the loader's order; all of them when
            there are fewer.
        seed: seeds the draw (a private generator; the global RNG is untouched).

    Returns:
        One ``(M, d)`` tensor per embedder, ``M <= max_descriptors``.
    """
    check_positive_int(max_descriptors, "max_descriptors")
    generator = torch.Generator().manual_seed(int(seed))
    device = next(trunk.parameters(), torch.empty(0)).device
    samples = [_UniformSample(max_descriptors, generator) for _ in embedders]
    modes = [module.training for module in (trunk, *embedders)]
    for module in (trunk, *embedders):
        module.eval()
    try:
        for batch in loader:
            features = trunk(_images(batch).to(device))
            for sample, embedder in zip(samples, embedders, strict=True):
                sample.add(_describe(embedder)(features).flatten(0, 1).cpu())  # (B * N, d)
    finally:
        for module, mode in zip((trunk, *embedders), modes, strict=True):
            module.train(mode)
    return [sample.sample() for sample in samples]


def _leaf_embedders(embedder: torch.nn.Module) -> list[torch.nn.Module]:
    heads = getattr(embedder, "heads", None)
    leaves = list(heads) if heads is not None else [embedder]
    for leaf in leaves:
        if _describe(leaf) is None or _setter(leaf) is None:
            raise TypeError(
                "embedder must provide descriptors(x) and set_centroids(centers) (NetVLAD), "
                "project(x) and set_prototypes(prototypes) (CRT), or heads of such modules "
                f"(MultiHeadCRT); got {type(leaf).__name__}"
            )
    return leaves


def _describe(leaf: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The leaf's local descriptors ``(B, N, d)``: NetVLAD's ``descriptors``, CRT's ``project``."""
    return getattr(leaf, "descriptors", None) or getattr(leaf, "project", None)


def _setter(leaf: torch.nn.Module) -> Callable[[torch.Tensor], None] | None:
    return getattr(leaf, "set_centroids", None) or getattr(leaf, "set_prototypes", None)


def _clusters(leaf: torch.nn.Module) -> tuple[int, bool]:
    """``(K, spherical)`` of a leaf.

    Centres are points, found by Euclidean k-means, where the leaf subtracts
    them from un-normalised descriptors: a CRT with ``residual="prototype"``
    (``x_n - p_k``) and a NetVLAD with ``normalize_input=False``. Everywhere
    else only their directions matter, and spherical k-means finds those.
    """
    k = getattr(leaf, "num_clusters", None) or leaf.num_prototypes
    points = getattr(leaf, "residual", None) == "prototype" or not getattr(
        leaf, "normalize_input", True
    )
    return int(k), not points


def init_from_data(
    embedder: torch.nn.Module,
    trunk: torch.nn.Module,
    loader: Iterable,
    *,
    max_descriptors: int = 50_000,
    iterations: int = 25,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Set an embedder's prototypes / centroids to k-means centres of its own descriptors.

    Run before training, on training images only. Each head of a
    :class:`~pml_crt.models.MultiHeadCRT` gets its own clustering, with as
    many centres as it has prototypes. Spherical k-means (cosine, unit-norm
    centres) where only the centres' directions matter: CRT's orthogonal
    residual and NetVLAD's normalised descriptors (the defaults). Euclidean
    k-means (centres at the mean of their points, with the features' scale)
    where a centre is subtracted from un-normalised features: a CRT with
    ``residual="prototype"`` and a NetVLAD with ``normalize_input=False``.

    Args:
        embedder: a ``NetVLAD``, ``CRT`` or ``MultiHeadCRT``.
        trunk: the trunk whose output the embedder takes.
        loader: training images (``(B, ...)`` or ``(images, labels)`` batches).
        max_descriptors: descriptors sampled per head for the clustering.
        iterations: Lloyd iterations.
        seed: seeds the sampling and the k-means++ draws.

    Returns:
        The centres given to each head, ``(K, d)`` each.
    """
    leaves = _leaf_embedders(embedder)
    samples = sample_descriptors(leaves, trunk, loader, max_descriptors=max_descriptors, seed=seed)
    centres = []
    for leaf, sample in zip(leaves, samples, strict=True):
        k, spherical = _clusters(leaf)
        parameter = next(leaf.parameters())
        centre = kmeans(sample, k, iterations=iterations, spherical=spherical, seed=seed)
        _setter(leaf)(centre.to(device=parameter.device, dtype=parameter.dtype))
        centres.append(centre)
    return centres
