"""k-means initialisation of prototypes / centroids (pml_crt.models.prototype_init)."""

from __future__ import annotations

import math

import pytest
import torch

from pml_crt.models import CRT, MultiHeadCRT, NetVLAD
from pml_crt.models.prototype_init import init_from_data, kmeans, sample_descriptors


def _blobs(dtype: torch.dtype, per_blob: int = 20, seed: int = 0) -> torch.Tensor:
    """Three well-separated directions in 4-D, with noise: assignment margins are wide."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.tensor(
        [[5.0, 0.0, 0.0, 0.0], [0.0, 5.0, 0.0, 0.0], [0.0, 0.0, 5.0, 5.0]], dtype=torch.float64
    )
    noise = torch.randn(3, per_blob, 4, generator=generator, dtype=torch.float64)
    points = (directions.unsqueeze(1) + noise).reshape(-1, 4)
    return points[torch.randperm(points.shape[0], generator=generator)].to(dtype)


def _lloyd_reference(points, centers, iterations, spherical):
    """Lloyd's iterations in plain Python floats."""

    def unit(v):
        norm = math.sqrt(sum(c * c for c in v))
        return [c / norm for c in v]

    def nearest(p, cs):
        if spherical:
            scores = [sum(a * b for a, b in zip(p, c, strict=True)) for c in cs]
            return max(range(len(cs)), key=lambda k: scores[k])
        distances = [sum((a - b) ** 2 for a, b in zip(p, c, strict=True)) for c in cs]
        return min(range(len(cs)), key=lambda k: distances[k])

    pts = [[float(c) for c in p] for p in points.tolist()]
    cs = [[float(c) for c in p] for p in centers.tolist()]
    if spherical:
        pts, cs = [unit(p) for p in pts], [unit(c) for c in cs]
    labels = [nearest(p, cs) for p in pts]
    for _ in range(iterations):
        new_centers = []
        for k in range(len(cs)):
            members = [p for p, label in zip(pts, labels, strict=True) if label == k]
            assert members, "the reference does not handle empty clusters"
            mean = [sum(column) / len(members) for column in zip(*members, strict=True)]
            new_centers.append(unit(mean) if spherical else mean)
        cs = new_centers
        new_labels = [nearest(p, cs) for p in pts]
        if new_labels == labels:
            break
        labels = new_labels
    return torch.tensor(cs, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("spherical", [True, False])
def test_lloyd_iterations_match_a_loop_reference(dtype, spherical):
    points = _blobs(dtype)
    init = points[:3].clone()  # a poor start: several iterations are needed
    got = kmeans(points, 3, iterations=10, spherical=spherical, init=init)
    expected = _lloyd_reference(points, init, 10, spherical)
    assert got.dtype == dtype and got.shape == (3, 4)
    # A mean of n <= 60 points, normalised: rounding below (n + 8) u max|x| per entry.
    unit = torch.finfo(dtype).eps / 2
    scale = float(points.abs().max()) if not spherical else 1.0
    tolerance = (points.shape[0] + 8) * unit * scale
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_plus_plus_finds_separated_clusters_and_is_seeded(spherical):
    points = _blobs(torch.float64, per_blob=30)
    state = torch.get_rng_state()
    first = kmeans(points, 3, spherical=spherical, seed=3)
    assert torch.equal(torch.get_rng_state(), state), "the global RNG was used"
    assert torch.equal(first, kmeans(points, 3, spherical=spherical, seed=3))
    truth = torch.tensor([[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 1 / 2**0.5, 1 / 2**0.5]])
    if not spherical:
        truth = truth * torch.tensor([[5.0], [5.0], [5.0 * 2**0.5]])
    order = (first @ truth.double().t()).argmax(dim=0)
    assert sorted(order.tolist()) == [0, 1, 2], "two centres in one blob"
    # 30 points with unit noise per coordinate: a centre is within ~3/sqrt(30) of its blob.
    error = (first[order] - truth.double()).norm(dim=1)
    assert float(error.max()) < (0.4 if spherical else 1.0)
    if spherical:
        torch.testing.assert_close(first.norm(dim=1), torch.ones(3, dtype=torch.float64))


def test_an_empty_cluster_is_reseeded_with_the_farthest_point():
    points = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.0, 0.2]], dtype=torch.float64)
    init = torch.tensor([[0.0, 0.0], [100.0, 100.0]], dtype=torch.float64)  # 2nd gets nothing
    got = kmeans(points, 2, spherical=False, init=init, iterations=5)
    torch.testing.assert_close(
        got[got[:, 0].argsort()], torch.tensor([[0.05, 0.0], [10.0, 0.1]], dtype=torch.float64)
    )


def test_bad_arguments_are_named():
    points = torch.randn(5, 3)
    with pytest.raises(ValueError, match=r"x must be a 2-D \(N, d\) tensor"):
        kmeans(torch.randn(5), 2)
    with pytest.raises(ValueError, match="at least num_clusters = 6 points, got 5"):
        kmeans(points, 6)
    with pytest.raises(ValueError, match=r"init must have shape \(num_clusters, d\) = \(2, 3\)"):
        kmeans(points, 2, init=torch.randn(3, 3))
    with pytest.raises(ValueError, match="num_clusters must be a positive int"):
        kmeans(points, 0)
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        kmeans(torch.ones(5, 3, dtype=torch.long), 2)


class _Trunk(torch.nn.Module):
    """A fixed 1x1 convolution: images (B, 3, 4, 4) -> (B, 6, 4, 4)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 6, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


def _loader(batches: int = 3, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(5, 3, 4, 4, generator=generator), torch.arange(5)) for _ in range(batches)]


def test_netvlad_centroids_are_kmeans_of_its_own_descriptors():
    torch.manual_seed(0)
    trunk, vlad = _Trunk(), NetVLAD(6, num_clusters=4, projection_dim=5, alpha=10.0)
    loader = _loader()
    vlad.train()
    centres = init_from_data(vlad, trunk, loader, max_descriptors=1000, seed=1)
    assert vlad.training and trunk.training, "training modes were not restored"
    with torch.no_grad():
        descriptors = torch.cat([vlad.descriptors(trunk(x)).flatten(0, 1) for x, _ in loader])
    expected = kmeans(descriptors, 4, seed=1)
    torch.testing.assert_close(centres[0], expected)
    torch.testing.assert_close(vlad.centroids.detach(), expected)
    torch.testing.assert_close(vlad.assign.weight.detach(), 20.0 * expected)


def test_sample_descriptors_keeps_at_most_the_budget_from_every_batch():
    trunk, vlad = _Trunk(), NetVLAD(6, num_clusters=2, projection_dim=5)
    loader = _loader(batches=8)  # 8 batches x 5 images x 16 positions = 640 descriptors
    (sample,) = sample_descriptors([vlad], trunk, loader, max_descriptors=100, seed=0)
    assert sample.shape == (100, 5)
    with torch.no_grad():
        every = torch.cat([vlad.descriptors(trunk(x)).flatten(0, 1) for x, _ in loader])
    exact = "donot_use_mm_for_euclid_dist"  # the matrix-product form rounds near 0
    matches = (torch.cdist(sample, every, compute_mode=exact) == 0).any(dim=1)
    assert bool(matches.all()), "a sampled descriptor is not one of the loader's"
    late = (torch.cdist(sample, every[320:], compute_mode=exact) == 0).any(dim=1)
    assert int(late.sum()) > 20, "the sample ignores the later batches"


def test_an_embedder_without_descriptors_is_refused():
    with pytest.raises(TypeError, match="must provide descriptors"):
        init_from_data(torch.nn.Linear(6, 2), _Trunk(), _loader())
    with pytest.raises(TypeError, match="loader must yield image tensors"):
        init_from_data(NetVLAD(6, num_clusters=2), _Trunk(), [["a"]])


def test_crt_and_multihead_prototypes_are_kmeans_of_their_projected_features():
    torch.manual_seed(0)
    trunk = _Trunk()
    loader = _loader()
    crt = CRT(6, embedding_size=8, num_prototypes=3, projection_dim=5)
    multi = MultiHeadCRT(6, heads=[(4, 8), (2, 6)], projection_dim=5)
    init_from_data(crt, trunk, loader, seed=2)
    centres = init_from_data(multi, trunk, loader, seed=2)
    for head, k, got in [(crt, 3, crt.prototypes), *zip(multi.heads, (4, 2), centres, strict=True)]:
        with torch.no_grad():
            features = torch.cat([head.project(trunk(x)).flatten(0, 1) for x, _ in loader])
        expected = kmeans(features, k, seed=2)
        torch.testing.assert_close(got.detach(), expected)
        torch.testing.assert_close(head.prototypes.detach(), expected)


def test_set_prototypes_checks_shape_and_values():
    crt = CRT(6, embedding_size=8, num_prototypes=3, projection_dim=5)
    with pytest.raises(ValueError, match=r"\(num_prototypes, projection_dim\) = \(3, 5\)"):
        crt.set_prototypes(torch.randn(3, 6))
    with pytest.raises(ValueError, match="prototypes contains NaN"):
        crt.set_prototypes(torch.full((3, 5), float("nan")))
    new = torch.randn(3, 5)
    crt.set_prototypes(new)
    assert torch.equal(crt.prototypes.detach(), new) and crt.prototypes.requires_grad
