"""k-means initialisation of prototypes / centroids (pml_crt.models.prototype_init)."""

from __future__ import annotations

import math

import pytest
import torch

from pml_crt.models import CRT, MultiHeadCRT, NetVLAD
from pml_crt.models.prototype_init import _plus_plus, init_from_data, kmeans, sample_descriptors


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
        means = {}
        for k in range(len(cs)):
            members = [p for p, label in zip(pts, labels, strict=True) if label == k]
            if members:
                means[k] = [sum(column) / len(members) for column in zip(*members, strict=True)]
        # An empty cluster takes the point farthest from its own cluster's mean (the
        # farthest for the first empty cluster, the next farthest for the second, ...).
        distances = [
            sum((a - b) ** 2 for a, b in zip(p, means[label], strict=True))
            for p, label in zip(pts, labels, strict=True)
        ]
        farthest = sorted(range(len(pts)), key=lambda i: -distances[i])
        empty = [k for k in range(len(cs)) if k not in means]
        for k, i in zip(empty, farthest, strict=False):
            means[k] = list(pts[i])
        cs = [unit(means[k]) if spherical else means[k] for k in range(len(cs))]
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


@pytest.mark.parametrize("iterations", [1, 2, 3])
@pytest.mark.parametrize("spherical", [True, False])
def test_exactly_the_given_number_of_lloyd_iterations(spherical, iterations):
    # Unclustered points: Lloyd's iterations keep moving the centres for a while.
    points = torch.randn(300, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    init = points[:8].clone()
    got = kmeans(points, 8, iterations=iterations, spherical=spherical, init=init)
    expected = _lloyd_reference(points, init, iterations, spherical)
    unconverged = _lloyd_reference(points, init, iterations + 1, spherical)
    assert not torch.allclose(expected, unconverged), "the start converges too fast to test"
    tolerance = (points.shape[0] + 8) * torch.finfo(torch.float64).eps * float(points.abs().max())
    torch.testing.assert_close(got, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("spherical", [True, False])
def test_empty_clusters_take_the_points_farthest_from_their_centres(spherical):
    # Every point is nearest the first start, so after one iteration clusters 1 and 2
    # are empty and take the farthest and the next-farthest point from the first mean.
    points = torch.tensor(
        [[1.0, 1.0], [1.2, 1.0], [5.0, 1.0], [5.0, 1.3], [9.0, 1.0], [8.0, 1.2]],
        dtype=torch.float64,
    )
    init = torch.tensor([[4.0, 1.0], [-50.0, -60.0], [-60.0, -50.0]], dtype=torch.float64)
    got = kmeans(points, 3, iterations=1, spherical=spherical, init=init)
    expected = _lloyd_reference(points, init, 1, spherical)
    source = torch.nn.functional.normalize(points, dim=1) if spherical else points
    nearest_to_mean = (source - source.mean(dim=0)).norm(dim=1).argmin()
    assert not torch.allclose(expected[1:], source[nearest_to_mean].expand(2, 2))
    assert float(expected[1:].norm(dim=1).min()) > 0.5, "an empty cluster kept a zero centre"
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)


@pytest.mark.parametrize("spherical", [True, False])
def test_kmeans_plus_plus_never_draws_a_point_that_is_already_a_centre(spherical):
    # Four distinct points, five copies each: D(x) = 0 for every copy of a chosen
    # point (its distance to the nearest centre so far), so k-means++ draws the four
    # distinct points. Distance to the last centre only, or uniform draws, repeat one.
    distinct = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.2], [0.3, -1.0]])
    points = distinct.repeat(5, 1).double()
    if spherical:
        points = torch.nn.functional.normalize(points, dim=1)
    for seed in range(40):
        generator = torch.Generator().manual_seed(seed)
        centres = _plus_plus(points, 4, spherical, generator)
        assert len({tuple(c) for c in centres.tolist()}) == 4, f"seed {seed}: {centres}"


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


class _Identity(torch.nn.Module):
    """A trunk that returns its input, with one parameter (for the device lookup)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class _Positions(torch.nn.Module):
    """``project`` of ``(B, N, 1)`` tokens: the tokens themselves (each its own id)."""

    def project(self, x: torch.Tensor) -> torch.Tensor:
        return x


def test_sample_descriptors_is_uniform_over_batches():
    # 8 batches of 100 descriptors, each descriptor its position in the stream. A
    # uniform sample of 100 holds 12.5 of each batch in expectation (hypergeometric, sd
    # 3.1); the mean over 200 seeds has sd 0.22, so [11.5, 13.5] is 4.5 sd wide.
    # Cutting back to the budget whenever twice the budget was read gave the last
    # batch 44.
    loader = [torch.arange(b * 100, (b + 1) * 100).double().view(10, 10, 1) for b in range(8)]
    per_batch = torch.zeros(8, dtype=torch.float64)
    for seed in range(200):
        (sample,) = sample_descriptors(
            [_Positions()], _Identity(), loader, max_descriptors=100, seed=seed
        )
        positions = sample.flatten().long()
        assert positions.shape == (100,) and len(set(positions.tolist())) == 100
        assert bool((positions[1:] > positions[:-1]).all()), "not in the loader's order"
        per_batch += torch.bincount(positions // 100, minlength=8)
    mean = per_batch / 200
    assert bool(((mean > 11.5) & (mean < 13.5)).all()), mean.tolist()


def test_sample_descriptors_keeps_everything_under_the_budget():
    loader = [torch.arange(b * 6, (b + 1) * 6).double().view(2, 3, 1) for b in range(3)]
    (sample,) = sample_descriptors([_Positions()], _Identity(), loader, max_descriptors=18)
    assert torch.equal(sample.flatten(), torch.arange(18).double())
    with pytest.raises(ValueError, match="loader yielded no batches"):
        sample_descriptors([_Positions()], _Identity(), [], max_descriptors=5)


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


def test_prototype_residual_gets_euclidean_centres_at_the_features_scale():
    # r_nk = x_n - p_k: the prototypes are points, so they are Euclidean k-means centres
    # of the projected features (LayerNorm output: norm about sqrt(d)), not unit vectors.
    torch.manual_seed(0)
    trunk, loader = _Trunk(), _loader()
    crt = CRT(6, embedding_size=8, num_prototypes=3, projection_dim=5, residual="prototype")
    init_from_data(crt, trunk, loader, seed=2)
    with torch.no_grad():
        features = torch.cat([crt.project(trunk(x)).flatten(0, 1) for x, _ in loader])
    expected = kmeans(features, 3, spherical=False, seed=2)
    torch.testing.assert_close(crt.prototypes.detach(), expected)
    mean_norm = float(features.norm(dim=1).mean())
    assert float(crt.prototypes.detach().norm(dim=1).max()) > 0.3 * mean_norm > 0.5


def test_set_prototypes_checks_shape_and_values():
    crt = CRT(6, embedding_size=8, num_prototypes=3, projection_dim=5)
    with pytest.raises(ValueError, match=r"\(num_prototypes, projection_dim\) = \(3, 5\)"):
        crt.set_prototypes(torch.randn(3, 6))
    with pytest.raises(ValueError, match="prototypes contains NaN"):
        crt.set_prototypes(torch.full((3, 5), float("nan")))
    new = torch.randn(3, 5)
    crt.set_prototypes(new)
    assert torch.equal(crt.prototypes.detach(), new) and crt.prototypes.requires_grad
