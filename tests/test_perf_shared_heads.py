"""MultiHeadCRT's shared work (one token view, one check, one stacked projection GEMM)
gives what running every head on its own gives, forward and backward.

The two paths differ only in the order of float operations (one stacked GEMM or
one per head), so they are compared in float64, where they agree to ~1e-13 on
any machine. Each path is also run in float32 and compared with the float64
result, within a tolerance derived from the computation (``_tolerance``).
"""

import pytest
import torch
from rounding import output_and_gradient_scales

from pml_crt.models import MultiHeadCRT


def _separate(module, x):
    return torch.cat([head(x) for head in module.heads], dim=1)


def _run(module, x, weights, separate):
    """The output and the gradients of ``(output * weights).sum()`` (parameters, then x)."""
    module.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = _separate(module, x) if separate else module(x)
    (out * weights).sum().backward()
    return [out.detach()] + [p.grad for p in module.parameters()] + [x.grad]


def _tolerance(module, x, dtype):
    """``k * eps(dtype)``, relative to ``output_and_gradient_scales``.

    Every stage contributes at most its reduction length times eps (relative to
    its sum of |terms|): the projection (C) and LayerNorm (2 d), <x, p> (d), the
    weighted sum over positions (N), the fusion (K d), and the loss's sum over
    the B x sum(D) outputs; the softmax of cos / T multiplies the error before
    it by up to 1 / T. k is the whole length times 1 / T (~800 here; float32
    runs measure <= 80, float64 shared vs separate far less).
    """
    batch, channels = x.shape[:2]
    positions = x[0, 0].numel()
    per_head = max(
        channels + 3 * head.projection_dim + positions + head.num_prototypes * head.projection_dim
        for head in module.heads
    )
    length = per_head + batch * sum(module.embedding_sizes)
    temperature = min(head.temperature_value for head in module.heads)
    return length / temperature * torch.finfo(dtype).eps


def _assert_within(got, want, scales, tolerance):
    for i, (g, w, s) in enumerate(zip(got, want, scales, strict=True)):
        error = float((g.double() - w).abs().max())
        assert error <= tolerance * float(s), f"tensor {i}: {error:.3g} > {tolerance * s:.3g}"


@pytest.mark.parametrize(
    "heads",
    [
        [(4, 6), (2, 3)],
        [(4, 6), {"num_prototypes": 3, "embedding_size": 5, "projection_dim": 0}, (2, 3)],
        [{"num_prototypes": 2, "embedding_size": 4, "projection_dim": 0}, (3, 5)],
        [(4, 6), {"num_prototypes": 2, "embedding_size": 3, "projection_dim": 5}],
    ],
)
def test_shared_forward_and_backward_equal_separate_heads(heads):
    torch.manual_seed(0)
    module = MultiHeadCRT(8, heads=heads).train()
    x = torch.randn(3, 8, 2, 3)
    weights = torch.randn(3, sum(module.embedding_sizes))
    module64 = MultiHeadCRT(8, heads=heads).train().double()
    module64.load_state_dict(module.state_dict())
    x64, weights64 = x.double(), weights.double()

    reference = _run(module64, x64, weights64, separate=True)
    scales = output_and_gradient_scales(module64, x64, weights64)
    shared = _run(module64, x64, weights64, separate=False)
    _assert_within(shared, reference, scales, _tolerance(module, x, torch.float64))
    for separate in (False, True):
        float32 = _run(module, x, weights, separate)
        _assert_within(float32, reference, scales, _tolerance(module, x, torch.float32))


def test_shared_path_checks_the_input_once_and_names_it():
    module = MultiHeadCRT(4, heads=[(2, 3), (2, 2)]).train()
    x = torch.randn(2, 4, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or infinite"):
        module(x)
