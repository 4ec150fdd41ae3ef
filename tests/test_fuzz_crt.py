"""Property-based fuzzing of the CRT forward (hypothesis).

Shapes: ``B`` 1-4, ``C`` 1-16, a ``(B, C, H, W)`` map with ``H, W`` 1-5 or a
``(B, N, C)`` token sequence with ``N`` 1-25, ``K`` 1-8, ``D`` 1-8, every
option (assignment, residual, fusion, projection_dim ``None``/``0``/positive,
prototype_init, temperature, global branch ``None``/avg/max/GeM; a head with a
branch gets a random fusion, which otherwise starts at zero). Values: normal,
norms up to 1e4, tiny (1e-6), constant maps, one token repeated over all
positions, zeros, sparse, and a different scale per sample.

Invariants: output ``(B, D)`` and finite (float32 and float64, gradients too);
in eval mode each row is independent of the rest of the batch, and the output
does not change when the positions are permuted; NaN/inf input raises
``ValueError`` naming ``x``; ``MultiHeadCRT`` equals its heads run one by one.

The invariance checks run in float64 with ``atol=1e-9``: the coded residuals are
L2-normalised, so when one is small its float32 round-off (about 1e-7 of the
feature scale) is magnified, and float32 results of a permuted input differ by
up to ~1e-4 on such draws. ``d = 1`` with ``residual="orthogonal"`` is not drawn:
there the orthogonal residual ``x - <x, p̂> p̂`` is identically zero, so CRT's
constructor rejects it (tested in ``test_crt.py``).

``PML_CRT_FUZZ_EXAMPLES`` (default 60) sets the number of examples per test.
"""

import os

import pytest
import torch
from crt_heads import live_fusion
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from pml_crt.models import CRT, MultiHeadCRT

EXAMPLES = int(os.environ.get("PML_CRT_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,  # the same examples on every run (CI); raise EXAMPLES to explore
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
INVARIANCE_TOLERANCE = {"atol": 1e-9, "rtol": 1e-9}
VALUE_KINDS = ("normal", "large", "tiny", "constant", "repeated", "zeros", "sparse", "mixed")


@st.composite
def crt_options(draw, in_channels):
    """Keyword arguments of one CRT head (without ``in_channels``)."""
    return dict(
        embedding_size=draw(st.integers(1, 8)),
        num_prototypes=draw(st.integers(1, 8)),
        projection_dim=draw(st.sampled_from([None, 0, 1, 2, 3, 8])),
        assignment=draw(st.sampled_from(["prototypes", "positions"])),
        residual=draw(st.sampled_from(["orthogonal", "prototype"])),
        fusion=draw(st.sampled_from(["flatten", "sum"])),
        prototype_init=draw(st.sampled_from(["orthogonal", "normal"])),
        temperature=draw(st.sampled_from([0.02, 0.1, 0.5, 0.95])),
        learn_temperature=draw(st.booleans()),
        global_pooling=draw(st.sampled_from([None, "avg", "max", "gem"])),
    )


@st.composite
def inputs(draw):
    """``(shape, kind, seed)`` of a feature map or token sequence."""
    batch = draw(st.integers(1, 4))
    channels = draw(st.integers(1, 16))
    height, width = draw(st.integers(1, 5)), draw(st.integers(1, 5))
    if draw(st.booleans()):
        shape = (batch, channels, height, width)
    else:
        shape = (batch, height * width, channels)
    return shape, draw(st.sampled_from(VALUE_KINDS)), draw(st.integers(0, 2**16))


def channels_of(shape):
    return shape[1] if len(shape) == 4 else shape[2]


def make_input(shape, kind, seed):
    """A float32 tensor of ``shape`` whose values follow ``kind``."""
    generator = torch.Generator().manual_seed(seed)

    def normal(*size):
        return torch.randn(size or shape, generator=generator)

    if kind == "normal":
        return normal()
    if kind == "large":  # entries ~1e4, token norms up to ~4e4
        return 1e4 * normal()
    if kind == "tiny":
        return 1e-6 * normal()
    if kind == "constant":
        return torch.full(shape, 100.0 * float(normal(1)))
    if kind == "repeated":  # one token at every position
        if len(shape) == 4:
            return normal(shape[0], shape[1], 1, 1).expand(shape).contiguous()
        return normal(shape[0], 1, shape[2]).expand(shape).contiguous()
    if kind == "zeros":
        return torch.zeros(shape)
    if kind == "sparse":
        return normal() * (torch.rand(shape, generator=generator) < 0.1)
    # "mixed": each sample has its own scale, 1e-6 ... 1e4
    exponents = torch.randint(-6, 5, (shape[0],) + (1,) * (len(shape) - 1), generator=generator)
    return normal() * 10.0**exponents


def feature_dim(options, in_channels):
    """``d``, the width of the projected features."""
    if options["projection_dim"] == 0:
        return in_channels
    if options["projection_dim"] is None:
        return min(in_channels, 512)
    return options["projection_dim"]


def is_degenerate(options, in_channels):
    """``d = 1`` with orthogonal residuals, which CRT rejects (see module doc)."""
    return feature_dim(options, in_channels) == 1 and options["residual"] == "orthogonal"


def build_crt(options, in_channels, seed):
    assume(not is_degenerate(options, in_channels))
    torch.manual_seed(seed)
    return live_fusion(CRT(in_channels, **options)).eval()


def permute_positions(x, seed):
    """``x`` with its positions (``H * W`` of a map, ``N`` of tokens) shuffled."""
    generator = torch.Generator().manual_seed(seed + 1)
    if x.dim() == 3:
        return x[:, torch.randperm(x.shape[1], generator=generator)]
    batch, channels, height, width = x.shape
    order = torch.randperm(height * width, generator=generator)
    return x.flatten(2)[:, :, order].reshape(batch, channels, height, width)


@st.composite
def crt_cases(draw):
    shape, kind, seed = draw(inputs())
    options = draw(crt_options(channels_of(shape)))
    return options, shape, kind, seed


@FUZZ
@given(crt_cases())
def test_output_shape_and_finite(case):
    options, shape, kind, seed = case
    module = build_crt(options, channels_of(shape), seed)
    x = make_input(shape, kind, seed)
    with torch.no_grad():
        for dtype in (torch.float32, torch.float64):
            y = module.to(dtype)(x.to(dtype))
            assert y.shape == (shape[0], options["embedding_size"])
            assert y.dtype == dtype
            assert torch.isfinite(y).all(), y


@FUZZ
@given(crt_cases(), st.sampled_from([0.0, 0.1]))
def test_gradients_finite_in_training(case, diversity_weight):
    options, shape, kind, seed = case
    torch.manual_seed(seed)
    assume(not is_degenerate(options, channels_of(shape)))
    module = live_fusion(CRT(channels_of(shape), **options)).train()
    x = make_input(shape, kind, seed).requires_grad_(True)
    loss = module(x).square().sum() + diversity_weight * module.diversity_penalty()
    loss.backward()
    assert torch.isfinite(x.grad).all()
    for name, parameter in module.named_parameters():
        assert parameter.grad is not None, name
        assert torch.isfinite(parameter.grad).all(), name


@FUZZ
@given(crt_cases())
def test_batch_independence_in_eval(case):
    options, shape, kind, seed = case
    module = build_crt(options, channels_of(shape), seed).double()
    x = make_input(shape, kind, seed).double()
    with torch.no_grad():
        y = module(x)
        for i in range(shape[0]):
            torch.testing.assert_close(module(x[i : i + 1])[0], y[i], **INVARIANCE_TOLERANCE)


@FUZZ
@given(crt_cases())
def test_spatial_permutation_invariance(case):
    options, shape, kind, seed = case
    module = build_crt(options, channels_of(shape), seed).double()
    x = make_input(shape, kind, seed).double()
    with torch.no_grad():
        torch.testing.assert_close(
            module(permute_positions(x, seed)), module(x), **INVARIANCE_TOLERANCE
        )


@FUZZ
@given(
    crt_cases(),
    st.sampled_from([float("nan"), float("inf"), float("-inf")]),
    st.integers(0, 10_000),
    st.booleans(),
)
def test_non_finite_input_raises_naming_x(case, bad_value, position, train):
    options, shape, kind, seed = case
    module = build_crt(options, channels_of(shape), seed).train(train)
    x = make_input(shape, kind, seed)
    x.view(-1)[position % x.numel()] = bad_value
    with pytest.raises(ValueError, match=r"^x contains NaN or infinite values"):
        module(x)
    unchecked = build_crt({**options}, channels_of(shape), seed).train(train)
    unchecked.check_inputs = False
    with torch.no_grad():
        assert unchecked(x).shape == (shape[0], options["embedding_size"])  # no check, no raise


@st.composite
def multi_head_cases(draw):
    shape, kind, seed = draw(inputs())
    heads = draw(st.lists(crt_options(channels_of(shape)), min_size=1, max_size=3))
    return heads, shape, kind, seed


@FUZZ
@given(multi_head_cases(), st.booleans())
def test_multi_head_equals_heads_run_alone(case, check_inputs):
    heads, shape, kind, seed = case
    in_channels = channels_of(shape)
    assume(not any(is_degenerate(options, in_channels) for options in heads))
    torch.manual_seed(seed)
    module = MultiHeadCRT(in_channels, heads=heads, check_inputs=check_inputs).double()
    x = make_input(shape, kind, seed).double()
    with torch.no_grad():
        concatenated = module.train()(x)
        expected = torch.cat([head(x) for head in module.heads], dim=1)
        assert concatenated.shape == (shape[0], sum(h["embedding_size"] for h in heads))
        torch.testing.assert_close(concatenated, expected, **INVARIANCE_TOLERANCE)
        primary = module.eval()(x)
        torch.testing.assert_close(primary, module.heads[0](x), **INVARIANCE_TOLERANCE)
        assert torch.isfinite(concatenated).all()
    bad = make_input(shape, kind, seed)
    bad.view(-1)[seed % bad.numel()] = float("nan")
    for mode in (True, False):
        module.train(mode).float()
        if check_inputs:
            with pytest.raises(ValueError, match=r"^x contains NaN or infinite values"):
                module(bad)
