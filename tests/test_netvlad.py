"""NetVLAD against an explicit-loop reference, gradients, invariances, memory, bad input."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from pml_crt.models import NetVLAD

TOLERANCES = {torch.float64: dict(rtol=1e-9, atol=1e-11), torch.float32: dict(rtol=1e-4, atol=1e-5)}
C, K, D = 5, 3, 4


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are tiny: one thread avoids OpenMP contention on a busy 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _normalise(v: list[float]) -> list[float]:
    norm = math.sqrt(sum(a * a for a in v))
    return [a / max(norm, 1e-12) for a in v]


def reference_embedding(module: NetVLAD, x: torch.Tensor) -> torch.Tensor:
    """Slow, obviously correct NetVLAD in Python floats.

    Loops over batch items, positions, clusters and coordinates, and builds
    every per-position residual ``x_n - c_k`` explicitly.
    """
    batch, channels, height, width = x.shape
    values = x.detach().double().tolist()

    def tolist(t):
        return t.detach().double().tolist()

    projection = None
    if not isinstance(module.projection, torch.nn.Identity):
        linear, norm = module.projection[0], module.projection[1]
        projection = (tolist(linear.weight), tolist(linear.bias), tolist(norm.weight))
        projection += (tolist(norm.bias), norm.eps)
    centroids = tolist(module.centroids)
    assign_w, assign_b = tolist(module.assign.weight), tolist(module.assign.bias)
    num_clusters, dim = len(centroids), len(centroids[0])

    out = []
    for b in range(batch):
        descriptors = []
        for i in range(height):
            for j in range(width):
                feature = [values[b][c][i][j] for c in range(channels)]
                if projection is not None:
                    weight, bias, gamma, beta, eps = projection
                    y = [
                        bias[o] + sum(weight[o][c] * feature[c] for c in range(channels))
                        for o in range(dim)
                    ]
                    mean = sum(y) / dim
                    var = sum((a - mean) ** 2 for a in y) / dim
                    feature = [
                        (y[o] - mean) / math.sqrt(var + eps) * gamma[o] + beta[o]
                        for o in range(dim)
                    ]
                if module.normalize_input:
                    feature = _normalise(feature)
                descriptors.append(feature)
        # Soft assignment, one position at a time.
        assignment = []
        for feature in descriptors:
            logits = [
                assign_b[k] + sum(assign_w[k][e] * feature[e] for e in range(dim))
                for k in range(num_clusters)
            ]
            top = max(logits)
            exps = [math.exp(v - top) for v in logits]
            assignment.append([v / sum(exps) for v in exps])
        # Materialised residuals r[n][k] = x_n - c_k.
        residuals = [
            [[feature[e] - centroids[k][e] for e in range(dim)] for k in range(num_clusters)]
            for feature in descriptors
        ]
        vlad = []
        for k in range(num_clusters):
            v = [0.0] * dim
            for n in range(len(descriptors)):
                for e in range(dim):
                    v[e] += assignment[n][k] * residuals[n][k][e]
            vlad.extend(_normalise(v))
        vlad = _normalise(vlad)
        if module.fuse is None:
            out.append(vlad)
            continue
        weight, bias = tolist(module.fuse.weight), tolist(module.fuse.bias)
        out.append(
            [
                bias[o] + sum(weight[o][f] * vlad[f] for f in range(len(vlad)))
                for o in range(len(weight))
            ]
        )
    return torch.tensor(out, dtype=torch.float64)


def make_module(projection_dim, normalize_input, alpha, embedding_size, **kwargs) -> NetVLAD:
    torch.manual_seed(0)
    module = NetVLAD(
        C,
        embedding_size,
        K,
        projection_dim=projection_dim,
        alpha=alpha,
        normalize_input=normalize_input,
        **kwargs,
    )
    # Make LayerNorm's affine part non-trivial so the reference really checks it.
    if not isinstance(module.projection, torch.nn.Identity):
        with torch.no_grad():
            module.projection[1].weight.uniform_(0.5, 1.5)
            module.projection[1].bias.uniform_(-0.3, 0.3)
    return module


# projection_dim: None (-> min(C, 512) = 5, Linear + LayerNorm), 0 (identity), 4.
OPTIONS = list(itertools.product((None, 0, 4), (True, False), (5.0, None), (D, None)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("projection_dim,normalize_input,alpha,embedding_size", OPTIONS)
def test_matches_loop_reference(projection_dim, normalize_input, alpha, embedding_size, dtype):
    module = make_module(projection_dim, normalize_input, alpha, embedding_size).to(dtype)
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2, C, 2, 3, generator=gen, dtype=torch.float64).to(dtype)
    out = module(x)
    d = {None: C, 0: C, 4: 4}[projection_dim]
    assert module.projection_dim == d
    assert out.dtype == dtype
    assert out.shape == (2, D if embedding_size else K * d)
    torch.testing.assert_close(out.double(), reference_embedding(module, x), **TOLERANCES[dtype])


def test_intra_and_global_normalisation():
    module = make_module(4, True, 5.0, None)
    x = torch.randn(3, C, 3, 3)
    vlad = module.vlad(x)
    assert vlad.shape == (3, K, 4)
    torch.testing.assert_close(vlad.norm(dim=-1), torch.ones(3, K))
    out = module(x)
    torch.testing.assert_close(out.norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out, vlad.flatten(1) / math.sqrt(K))


def test_single_cluster_is_normalised_sum_of_residuals():
    module = NetVLAD(3, None, 1, projection_dim=0, normalize_input=False)
    with torch.no_grad():
        module.centroids.copy_(torch.tensor([[1.0, 0.0, -1.0]]))
    x = torch.tensor([[[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]]])  # (B, N, C) = (1, 2, 3)
    # sum_n (x_n - c) = (1 + 0 - 2, 2 + 1, 3 + 0 + 2) = (-1, 3, 5)
    expected = torch.tensor([[-1.0, 3.0, 5.0]]) / math.sqrt(35.0)
    torch.testing.assert_close(module(x), expected)


def test_alpha_initialisation_is_distance_softmax():
    module = NetVLAD(6, 4, 5, projection_dim=0, alpha=2.0)
    x = F.normalize(torch.randn(2, 7, 6), dim=-1)
    weights = module.soft_assignment(x)
    distances = torch.cdist(x, module.centroids.unsqueeze(0).expand(2, -1, -1)).pow(2)
    torch.testing.assert_close(weights, torch.softmax(-2.0 * distances, dim=-1), atol=1e-5, rtol=0)
    torch.testing.assert_close(module.centroids.norm(dim=1), torch.ones(5))
    # set_centroids re-derives the assignment with a new alpha.
    new = F.normalize(torch.randn(5, 6), dim=1)
    module.set_centroids(new, alpha=7.0)
    torch.testing.assert_close(module.centroids.detach(), new)
    torch.testing.assert_close(module.assign.weight.detach(), 14.0 * new)
    torch.testing.assert_close(module.assign.bias.detach(), -7.0 * new.pow(2).sum(dim=1))
    # alpha=None keeps PyTorch's default Linear init, independent of the centroids.
    torch.manual_seed(0)
    free = NetVLAD(6, 4, 5, projection_dim=0, alpha=None)
    weight_before = free.assign.weight.detach().clone()
    free.set_centroids(new)
    torch.testing.assert_close(free.assign.weight.detach(), weight_before)
    assert not torch.allclose(weight_before, 2.0 * free.centroids.detach(), atol=1e-2)


def _reference_distance_softmax(x: torch.Tensor, centroids: torch.Tensor, alpha: float):
    """``softmax_k(-alpha ||x_n - c_k||^2)`` written out in Python floats, ``(B, N, K)``."""
    rows = []
    for sample in x.double().tolist():
        sample_rows = []
        for feature in sample:
            logits = [
                -alpha * sum((a - c) ** 2 for a, c in zip(feature, centroid, strict=True))
                for centroid in centroids.double().tolist()
            ]
            top = max(logits)
            exps = [math.exp(v - top) for v in logits]
            sample_rows.append([e / sum(exps) for e in exps])
        rows.append(sample_rows)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_set_centroids_uses_the_module_alpha(dtype):
    """Without an alpha argument the assignment is re-derived with the module's alpha
    (2.5 here, not the default 5); an explicit alpha applies to that call only."""
    module = NetVLAD(6, 4, 5, projection_dim=0, alpha=2.5, normalize_input=False).to(dtype)
    generator = torch.Generator().manual_seed(5)
    # Not unit vectors: the bias -alpha ||c_k||^2 matters too.
    first, second = torch.randn(2, 5, 6, generator=generator, dtype=dtype).unbind(0)
    x = torch.randn(2, 7, 6, generator=generator, dtype=dtype)

    def check(centroids: torch.Tensor, alpha: float) -> None:
        # The logits 2 alpha <x, c> - alpha ||c||^2 are rounded to a few eps of their
        # terms' magnitude; a softmax output moves by at most twice its logits' error.
        norms = centroids.norm(dim=1)
        scale = (2 * alpha * x.norm(dim=-1).max() * norms + alpha * norms.pow(2)).max().item()
        tolerance = 16 * torch.finfo(dtype).eps * scale
        torch.testing.assert_close(
            module.soft_assignment(x).double(),
            _reference_distance_softmax(x, centroids, alpha),
            rtol=0,
            atol=tolerance,
        )

    module.set_centroids(first)
    check(first, 2.5)
    module.set_centroids(first, alpha=7.0)
    check(first, 7.0)
    module.set_centroids(second)
    assert module.alpha == 2.5
    check(second, 2.5)


def test_recordable_attributes():
    module = NetVLAD(8, 16, 4, projection_dim=6)
    assert set(module._record_these) == {"num_clusters", "embedding_size", "projection_dim"}
    assert (module.num_clusters, module.embedding_size, module.projection_dim) == (4, 16, 6)
    default = NetVLAD(1024, None, 8)
    assert default.projection_dim == 512 and default.embedding_size == 8 * 512


@pytest.mark.parametrize("projection_dim,normalize_input,alpha,embedding_size", OPTIONS)
def test_gradcheck(projection_dim, normalize_input, alpha, embedding_size):
    module = make_module(projection_dim, normalize_input, alpha, embedding_size).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, C, 2, 2, generator=gen, dtype=torch.float64, requires_grad=True)
    named = list(module.named_parameters())
    names = [name for name, _ in named]
    params = [p.detach().clone().requires_grad_(True) for _, p in named]
    assert "centroids" in names and "assign.weight" in names

    def fn(inp, *ps):
        return functional_call(module, dict(zip(names, ps, strict=True)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("projection_dim,normalize_input", [(None, True), (0, False), (4, True)])
def test_permutation_layout_and_batch_invariance(projection_dim, normalize_input):
    module = make_module(projection_dim, normalize_input, 5.0, D).eval()
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(4, C, 3, 2, generator=gen)
    out = module(x)
    tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
    torch.testing.assert_close(module(tokens), out, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(module(tokens.contiguous()), out, rtol=1e-5, atol=1e-6)
    perm = torch.randperm(6, generator=gen)
    torch.testing.assert_close(module(tokens[:, perm]), out, rtol=1e-5, atol=1e-6)
    for i in range(4):
        torch.testing.assert_close(module(x[i : i + 1]), out[i : i + 1], rtol=1e-5, atol=1e-6)
    assert not torch.allclose(out[0], out[1], atol=1e-3)


class _LargestTensor(TorchDispatchMode):
    """Record the largest tensor any ATen op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        result = func(*args, **(kwargs or {}))
        for leaf in tree_leaves(result):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.numel())
        return result


def test_never_materialises_per_position_residuals():
    batch, positions, clusters, dim = 2, 64, 16, 32
    module = NetVLAD(dim, 8, clusters, projection_dim=0)
    x = torch.randn(batch, positions, dim, requires_grad=True)
    with _LargestTensor() as mode:
        module(x).pow(2).sum().backward()
    # O(B*N*K + B*K*d + B*N*C + parameters); the residual tensor would be B*N*K*d = 65,536.
    bound = max(batch * positions * clusters, batch * clusters * dim, batch * positions * dim)
    bound = max(bound, clusters * dim * 8)
    assert mode.largest <= bound < batch * positions * clusters * dim // 8


def test_bad_input():
    module = NetVLAD(4, 2, 3, projection_dim=2)
    with pytest.raises(ValueError, match=r"x must be a \(B, C, H, W\)"):
        module(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"x must be a \(B, C, H, W\)"):
        module(torch.randn(2, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="in_channels=4"):
        module(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="in_channels=4"):
        module(torch.randn(2, 6, 3))
    with pytest.raises(ValueError, match="x is empty"):
        module(torch.randn(0, 4, 2, 2))
    with pytest.raises(ValueError, match="x is empty"):
        module(torch.randn(2, 0, 4))
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.rand(2, 4, 2, 2)
        x[0, 3, 1, 1] = bad
        with pytest.raises(ValueError, match="x contains NaN or infinite"):
            module(x)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        module(torch.ones(2, 4, 2, 2, dtype=torch.int32))
    with pytest.raises(
        ValueError, match=r"centroids must have shape \(num_clusters, projection_dim"
    ):
        module.set_centroids(torch.randn(3, 4))
    with pytest.raises(ValueError, match="centroids contains NaN"):
        module.set_centroids(torch.full((3, 2), float("nan")))
    with pytest.raises(ValueError, match="alpha"):
        module.set_centroids(torch.randn(3, 2), alpha=-1.0)


def test_check_inputs_off_lets_nan_through():
    module = NetVLAD(4, 2, 3, projection_dim=0, check_inputs=False)
    x = torch.rand(2, 4, 2, 2)
    x[1, 0, 0, 0] = float("nan")
    out = module(x)
    assert torch.isfinite(out[0]).all() and torch.isnan(out[1]).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(in_channels=0), "in_channels"),
        (dict(in_channels=4.0), "in_channels"),
        (dict(embedding_size=-1), "embedding_size"),
        (dict(embedding_size=True), "embedding_size"),
        (dict(num_clusters=0), "num_clusters"),
        (dict(num_clusters=2.5), "num_clusters"),
        (dict(projection_dim=-2), "projection_dim"),
        (dict(projection_dim=False), "projection_dim"),
        (dict(projection_dim=3.0), "projection_dim"),
        (dict(alpha=0.0), "alpha"),
        (dict(alpha=-5.0), "alpha"),
        (dict(alpha=float("inf")), "alpha"),
        (dict(alpha=float("nan")), "alpha"),
        (dict(alpha="5"), "alpha"),
    ],
)
def test_bad_constructor_args(kwargs, match):
    args = dict(in_channels=4, embedding_size=2, num_clusters=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        NetVLAD(**args)
