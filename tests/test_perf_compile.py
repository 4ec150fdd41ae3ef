"""``torch.compile`` of a trunk + CRT matches eager, outputs and gradients.

Compiled and eager code differ in the order of float operations (inductor
fuses and vectorises its own loops), so the comparison that tests the compiled
graph runs in float64, where the two agree to ~1e-13 on any machine. The
float32 compiled model, the one users run, is compared with the float64 eager
result within a tolerance derived from the computation (``_tolerance``).

A cold compile (empty inductor cache) takes tens of seconds on 2 CPU cores;
warm runs reuse ``torch``'s on-disk compile cache.
"""

import copy

import pytest
import torch
from crt_heads import live_fusion
from rounding import output_and_gradient_scales

from pml_crt.models import CRT, MultiHeadCRT
from pml_crt.trunks import SmallConvNet


def _run(fn, model, x):
    """Forward + backward of ``fn`` (``model`` or its compiled wrapper).

    Returns the output, then the gradients of ``model``'s parameters and of x.
    """
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    (out * _loss_weights(out)).sum().backward()
    return [out.detach()] + [p.grad.detach().clone() for p in model.parameters()] + [x.grad]


def _loss_weights(out):
    # A non-uniform loss, so that every gradient path matters.
    return torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)


def _scales(model, x):
    """Magnitude of every compared tensor, from the float64 eager model (see ``rounding``)."""
    with torch.no_grad():
        weights = _loss_weights(model(x))
    return output_and_gradient_scales(model, x, weights)


def _tolerance(length, heads, dtype):
    """``k * eps(dtype)`` relative to ``_scales``, for a chain of ``length`` summed terms.

    Every stage contributes at most its reduction length times eps (relative to
    its sum of |terms|); the softmax of cos / T multiplies the error before it
    by up to 1 / T. k is the whole length times 1 / T.
    """
    temperature = min(head.temperature_value for head in heads)
    return length / temperature * torch.finfo(dtype).eps


def _crt_length(head, positions):
    """Terms summed in one CRT head: projection (C) and LayerNorm (2 d), <x, p> (d),
    the weighted sum over positions (N) and the fusion (K d). Its GeM branch, beside
    them, sums fewer (N, then C)."""
    d = head.projection_dim
    return head.in_channels + 3 * d + positions + head.num_prototypes * d


def _assert_within(got, want, scales, tolerance, names):
    assert len(got) == len(want) == len(scales) == len(names)
    for name, g, w, s in zip(names, got, want, scales, strict=True):
        error = float((g.double() - w).abs().max())
        assert error <= tolerance * float(s), f"{name}: {error:.3g} > {tolerance * s:.3g}"


def _names(model):
    return ["output"] + [name for name, _ in model.named_parameters()] + ["x.grad"]


def test_compiled_trunk_and_crt_match_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    trunk = SmallConvNet(1, (8,), pool_last=False)
    embedder = live_fusion(CRT(trunk.out_channels, 6, 4, projection_dim=8))
    model = torch.nn.Sequential(trunk, embedder).train()
    model64 = copy.deepcopy(model).double()
    x = torch.randn(4, 1, 6, 6)
    x64 = x.double()
    # Conv 3x3 (9 terms), BatchNorm's batch mean and variance (2 x B H W), the CRT
    # head, the loss's sum over the B x D outputs.
    length = 9 + 2 * x[:, 0].numel() + _crt_length(embedder, 36) + 4 * 6
    names = _names(model)

    # BatchNorm updates running statistics in training mode: run every pass
    # from the same state.
    state = copy.deepcopy(model64.state_dict())
    scales = _scales(model64, x64)
    model64.load_state_dict(state)
    reference = _run(model64, model64, x64)
    model64.load_state_dict(state)
    compiled64 = _run(torch.compile(model64), model64, x64)
    _assert_within(
        compiled64, reference, scales, _tolerance(length, [embedder], torch.float64), names
    )
    compiled32 = _run(torch.compile(model), model, x)
    _assert_within(
        compiled32, reference, scales, _tolerance(length, [embedder], torch.float32), names
    )


@pytest.mark.slow
def test_compiled_multi_head_crt_matches_eager():
    """The heads' shared projection (one stacked GEMM) under ``torch.compile``.

    In float64 only: the float32 compile is tested above, and a second compile
    costs ~10 s cold.
    """
    torch._dynamo.reset()
    torch.manual_seed(1)
    embedder = MultiHeadCRT(8, heads=[(4, 6), (2, 3)]).train()
    embedder64 = copy.deepcopy(embedder).double()
    x64 = torch.randn(3, 8, 3, 3).double()
    # The longest head, then the loss's sum over the B x sum(D) outputs.
    length = max(_crt_length(head, 9) for head in embedder.heads) + 3 * 9
    names = _names(embedder)

    scales = _scales(embedder64, x64)
    reference = _run(embedder64, embedder64, x64)
    compiled64 = _run(torch.compile(embedder64), embedder64, x64)
    _assert_within(
        compiled64, reference, scales, _tolerance(length, embedder.heads, torch.float64), names
    )
