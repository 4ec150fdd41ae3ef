"""GlobalPoolEmbedder against an explicit-loop reference, gradients, invariances, bad input."""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch.func import functional_call

from pml_crt.models import GlobalPoolEmbedder

POOLINGS = ("avg", "max", "gem")


@pytest.fixture(autouse=True, scope="module")
def _single_thread():
    """The tensors here are tiny: one thread avoids OpenMP contention on a busy 2-core runner."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def reference_embedding(module: GlobalPoolEmbedder, x: torch.Tensor) -> torch.Tensor:
    """Slow, obviously correct: Python floats, one loop per batch item, channel, position."""
    batch, channels, height, width = x.shape
    values = x.detach().double().tolist()
    p = None
    if module.pooling == "gem":
        raw = float(module.raw_gem_p.detach())
        p = 1.0 + math.log1p(math.exp(raw))
    if module.linear is not None:
        weight = module.linear.weight.detach().double().tolist()
        bias = module.linear.bias.detach().double().tolist()
    out = []
    for b in range(batch):
        pooled = []
        for c in range(channels):
            positions = [values[b][c][i][j] for i in range(height) for j in range(width)]
            if module.pooling == "avg":
                total = 0.0
                for v in positions:
                    total += v
                pooled.append(total / len(positions))
            elif module.pooling == "max":
                best = positions[0]
                for v in positions[1:]:
                    if v > best:
                        best = v
                pooled.append(best)
            else:
                total = 0.0
                for v in positions:
                    total += max(v, module.gem_eps) ** p
                pooled.append((total / len(positions)) ** (1.0 / p))
        if module.linear is None:
            out.append(pooled)
            continue
        row = []
        for d in range(len(weight)):
            acc = bias[d]
            for c in range(channels):
                acc += weight[d][c] * pooled[c]
            row.append(acc)
        out.append(row)
    return torch.tensor(out, dtype=torch.float64)


def make_module(pooling: str, embedding_size: int | None, learn_gem_p: bool = True, **kwargs):
    torch.manual_seed(0)
    module = GlobalPoolEmbedder(
        5, embedding_size, pooling=pooling, learn_gem_p=learn_gem_p, gem_p=2.5, **kwargs
    )
    return module


OPTIONS = [
    (pooling, embedding_size, learn)
    for pooling, embedding_size, learn in itertools.product(POOLINGS, (3, None), (True, False))
    if pooling == "gem" or learn
]


def rounding_bound(module: GlobalPoolEmbedder, x: torch.Tensor) -> torch.Tensor:
    """Elementwise bound on ``module(x)``'s rounding error in ``x``'s dtype.

    A sum of n terms is off by at most n eps/2 of the sum of |terms| (Higham,
    "Accuracy and Stability of Numerical Algorithms", 3.1). The same
    computation on |x| with |W| and |b| gives the sum of |terms| of every sum
    (for max pooling and GeM an upper bound). The sums: N positions, then C
    channels and the bias; the GeM powers, p = 1 + softplus(raw) and the mean's
    division add a few eps: k = N + C + 1 + 8, counted in eps, not eps/2.
    """
    absolute = copy.deepcopy(module)
    if absolute.linear is not None:
        with torch.no_grad():
            for parameter in absolute.linear.parameters():
                parameter.abs_()
    positions = x[0, 0].numel()
    k = positions + module.in_channels + 1 + 8
    return k * torch.finfo(x.dtype).eps * reference_embedding(absolute, x.abs())


def assert_within(actual: torch.Tensor, expected: torch.Tensor, bound: torch.Tensor) -> None:
    error = (actual.double() - expected.double()).abs().flatten()
    bound = bound.flatten()
    worst = int((error / bound).argmax())
    assert (error <= bound).all(), f"element {worst}: {error[worst]:.3g} > {bound[worst]:.3g}"


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pooling,embedding_size,learn_gem_p", OPTIONS)
def test_matches_loop_reference(pooling, embedding_size, learn_gem_p, dtype):
    module = make_module(pooling, embedding_size, learn_gem_p).to(dtype)
    gen = torch.Generator().manual_seed(1)
    # Mixed signs so GeM's clamp is exercised; shifted so most values are positive.
    x = (torch.randn(3, 5, 2, 3, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    with torch.no_grad():
        out = module(x)
    assert out.dtype == dtype
    assert out.shape == (3, 3 if embedding_size else 5)
    assert_within(out, reference_embedding(module, x), rounding_bound(module, x))


def test_hand_computed_values():
    x = torch.tensor([[[1.0, 3.0]], [[4.0, 0.0]]]).view(2, 1, 1, 2)  # B=2, C=1, H=1, W=2
    avg = GlobalPoolEmbedder(1, None, pooling="avg")(x)
    mx = GlobalPoolEmbedder(1, None, pooling="max")(x)
    gem = GlobalPoolEmbedder(1, None, pooling="gem", gem_p=2.0, gem_eps=1e-6)(x)
    torch.testing.assert_close(avg, torch.tensor([[2.0], [2.0]]))
    torch.testing.assert_close(mx, torch.tensor([[3.0], [4.0]]))
    # sqrt((1 + 9) / 2) and sqrt((16 + 1e-12) / 2)
    torch.testing.assert_close(gem, torch.tensor([[math.sqrt(5.0)], [math.sqrt(8.0)]]))


def test_gem_limits_and_parametrisation():
    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 4, 3, 3, generator=gen, dtype=torch.float64) + 0.1
    near_avg = GlobalPoolEmbedder(4, None, pooling="gem", gem_p=1.0 + 1e-7).double()
    torch.testing.assert_close(near_avg(x), x.mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    near_max = GlobalPoolEmbedder(4, None, pooling="gem", gem_p=400.0).double()
    torch.testing.assert_close(near_max(x), x.amax(dim=(2, 3)), rtol=1e-2, atol=0)
    module = GlobalPoolEmbedder(4, 2, pooling="gem", gem_p=3.0)
    assert module.gem_p_value == pytest.approx(3.0, rel=1e-6)
    with torch.no_grad():
        module.raw_gem_p.fill_(-1e4)  # p = 1 + softplus(raw) tends to 1, never below
    assert module.gem_p_value == pytest.approx(1.0, abs=torch.finfo(torch.float32).eps)


def test_gem_p_learned_or_fixed():
    x = torch.rand(2, 4, 3, 3) + 0.1
    learned = GlobalPoolEmbedder(4, 2, pooling="gem", learn_gem_p=True)
    assert any(p is learned.raw_gem_p for p in learned.parameters())
    learned(x).sum().backward()
    assert learned.raw_gem_p.grad is not None and learned.raw_gem_p.grad.abs() > 0
    fixed = GlobalPoolEmbedder(4, 2, pooling="gem", learn_gem_p=False)
    assert all(p is not fixed.raw_gem_p for p in fixed.parameters())
    assert "raw_gem_p" in dict(fixed.named_buffers())
    assert not fixed.raw_gem_p.requires_grad


def test_recordable_attributes_and_no_linear():
    module = GlobalPoolEmbedder(6, 4, pooling="gem", gem_p=3.0)
    assert set(module._record_these) == {"embedding_size", "gem_p_value"}
    assert module.embedding_size == 4
    plain = GlobalPoolEmbedder(6, None, pooling="max")
    assert plain._record_these == ["embedding_size"]
    assert plain.embedding_size == 6 and plain.linear is None
    assert len(list(plain.parameters())) == 0
    with pytest.raises(AttributeError, match="gem_p"):
        _ = plain.gem_p


@pytest.mark.parametrize("pooling,embedding_size,learn_gem_p", OPTIONS)
def test_gradcheck(pooling, embedding_size, learn_gem_p):
    module = make_module(pooling, embedding_size, learn_gem_p).double()
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 2, 2, generator=gen, dtype=torch.float64) + 0.5
    x.requires_grad_(True)
    named = list(module.named_parameters())  # the Linear's and a learned GeM p
    names = [name for name, _ in named]
    params = [p.detach().clone().requires_grad_(True) for _, p in named]
    assert (pooling == "gem" and learn_gem_p) == ("raw_gem_p" in names)

    def fn(inp, *ps):
        return functional_call(module, dict(zip(names, ps, strict=True)), (inp,))

    assert torch.autograd.gradcheck(fn, (x, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("pooling", POOLINGS)
def test_permutation_layout_and_batch_invariance(pooling, dtype):
    module = make_module(pooling, 3).eval().to(dtype)
    gen = torch.Generator().manual_seed(4)
    x = (torch.randn(4, 5, 3, 2, generator=gen, dtype=torch.float64) + 0.5).to(dtype)
    # Each layout sums in its own order; both are within rounding_bound of the exact value.
    bound = 2 * rounding_bound(module, x)
    with torch.no_grad():
        out = module(x)
        tokens = x.flatten(2).transpose(1, 2)  # (B, N, C)
        assert_within(module(tokens), out, bound)
        assert_within(module(tokens.contiguous()), out, bound)
        perm = torch.randperm(6, generator=gen)
        assert_within(module(tokens[:, perm]), out, bound)
        for i in range(4):
            assert_within(module(x[i : i + 1]), out[i : i + 1], bound[i : i + 1])
    # The output really depends on the input (the invariances are not vacuous).
    assert not torch.allclose(out[0], out[1], atol=1e-3)


@pytest.mark.parametrize("pooling", POOLINGS)
def test_bad_input(pooling):
    module = GlobalPoolEmbedder(4, 2, pooling=pooling)
    with pytest.raises(ValueError, match=r"x must be a \(B, C, H, W\)"):
        module(torch.randn(2, 4))
    with pytest.raises(ValueError, match=r"x must be a \(B, C, H, W\)"):
        module(torch.randn(2, 4, 2, 2, 2))
    with pytest.raises(ValueError, match="in_channels=4"):
        module(torch.randn(2, 3, 2, 2))
    with pytest.raises(ValueError, match="in_channels=4"):
        module(torch.randn(2, 6, 3))  # (B, N, C) with C = 3
    with pytest.raises(ValueError, match="x is empty"):
        module(torch.randn(0, 4, 2, 2))
    with pytest.raises(ValueError, match="x is empty"):
        module(torch.randn(2, 0, 4))  # no positions
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.rand(2, 4, 2, 2)
        x[1, 2, 0, 1] = bad
        with pytest.raises(ValueError, match="x contains NaN or infinite"):
            module(x)
    with pytest.raises(TypeError, match="x must be a floating-point"):
        module(torch.ones(2, 4, 2, 2, dtype=torch.long))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        module([[1.0]])


def test_check_inputs_off_lets_nan_through():
    module = GlobalPoolEmbedder(4, 2, pooling="avg", check_inputs=False)
    x = torch.rand(2, 4, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    out = module(x)
    assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(in_channels=0), "in_channels"),
        (dict(in_channels=-3), "in_channels"),
        (dict(in_channels=2.0), "in_channels"),
        (dict(in_channels=True), "in_channels"),
        (dict(embedding_size=0), "embedding_size"),
        (dict(embedding_size=1.5), "embedding_size"),
        (dict(pooling="sum"), "pooling"),
        (dict(pooling="gem", gem_p=1.0), "gem_p"),
        (dict(pooling="gem", gem_p=0.5), "gem_p"),
        (dict(pooling="gem", gem_p=float("inf")), "gem_p"),
        (dict(pooling="gem", gem_p=float("nan")), "gem_p"),
        (dict(pooling="gem", gem_p="3"), "gem_p"),
        (dict(pooling="gem", gem_eps=0.0), "gem_eps"),
        (dict(pooling="gem", gem_eps=-1e-6), "gem_eps"),
    ],
)
def test_bad_constructor_args(kwargs, match):
    args = dict(in_channels=4, embedding_size=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        GlobalPoolEmbedder(**args)
