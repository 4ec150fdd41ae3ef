"""``StepScaledLinear`` and CRT's ``scale_fusion_step`` (learning-rate robustness of the fusion)."""

from __future__ import annotations

import math

import pytest
import torch

from pml_crt.models import CRT, MultiHeadCRT
from pml_crt.models.fusion import StepScaledLinear


def _reference(x, scaled_weight, scaled_bias, step_scale):
    """``y[b, j] = step_scale * (sum_i x[b, i] * V[j, i] + c[j])`` in loops, float64."""
    out = torch.zeros(x.shape[0], scaled_weight.shape[0], dtype=torch.float64)
    for b in range(x.shape[0]):
        for j in range(scaled_weight.shape[0]):
            total = float(scaled_bias[j])
            for i in range(x.shape[1]):
                total += float(x[b, i]) * float(scaled_weight[j, i])
            out[b, j] = step_scale * total
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_step_scaled_linear_matches_loops(dtype):
    torch.manual_seed(0)
    fuse = StepScaledLinear(7, 3, 0.25).to(dtype)
    x = torch.randn(4, 7, dtype=dtype)
    got = fuse(x)
    v, c = fuse.scaled_weight.detach(), fuse.scaled_bias.detach()
    expected = _reference(x, v, c, 0.25)
    # n + 1 products summed, then one scaling: |error| <= (n + 2) u sum |terms|.
    magnitude = 0.25 * (x.abs().max() * v.abs().max() * 7 + c.abs().max())
    tolerance = 9 * (torch.finfo(dtype).eps / 2) * float(magnitude)
    assert got.shape == (4, 3) and got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=0)
    torch.testing.assert_close(fuse.weight, 0.25 * fuse.scaled_weight, rtol=0, atol=0)
    torch.testing.assert_close(fuse.bias, 0.25 * fuse.scaled_bias, rtol=0, atol=0)


def test_step_scaled_linear_gradcheck():
    torch.manual_seed(0)
    fuse = StepScaledLinear(4, 3, 0.5).double()
    x = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fuse, (x,))
    for name, parameter in fuse.named_parameters():

        def call(p, name=name):
            return torch.func.functional_call(fuse, {name: p}, (x.detach(),))

        assert torch.autograd.gradcheck(call, (parameter.detach().clone().requires_grad_(),))


def test_initialisation_is_a_plain_linear_and_one_adam_step_is_scaled():
    n, step_scale, lr = 400, 1 / 16, 1e-3
    # Same RNG stream: uniform_(-b, b) draws scale with b, so the effective weights
    # equal a plain Linear's up to one rounding of the division and the product.
    torch.manual_seed(0)
    plain = torch.nn.Linear(n, 5).double()
    torch.manual_seed(0)
    fuse = StepScaledLinear(n, 5, step_scale).double()
    rounding = 4 * torch.finfo(torch.float64).eps / math.sqrt(n)
    torch.testing.assert_close(fuse.weight, plain.weight, atol=rounding, rtol=0)
    torch.testing.assert_close(fuse.bias, plain.bias, atol=rounding, rtol=0)
    assert float(fuse.weight.detach().abs().max()) <= 1 / math.sqrt(n)

    # Adam's first step moves every stored parameter by lr * g / (|g| + eps), i.e. lr
    # up to eps / |g|: the effective weights move by step_scale * lr, the plain ones by lr.
    x = torch.randn(8, n, dtype=torch.float64)
    for module in (plain, fuse):
        before = module.weight.detach().clone()
        optimizer = torch.optim.Adam(module.parameters(), lr=lr, eps=1e-30)
        module(x).pow(2).sum().backward()
        optimizer.step()
        moved = (module.weight.detach() - before).abs()
        expected = lr * (step_scale if module is fuse else 1.0)
        torch.testing.assert_close(moved, torch.full_like(moved, expected), rtol=1e-9, atol=0)


def test_a_plain_linear_state_dict_loads_as_the_same_function():
    torch.manual_seed(0)
    plain = torch.nn.Linear(6, 4).double()
    fuse = StepScaledLinear(6, 4, 1 / 8).double()
    fuse.load_state_dict(plain.state_dict())
    x = torch.randn(3, 6, dtype=torch.float64)
    torch.testing.assert_close(fuse(x), plain(x), rtol=1e-15, atol=1e-15)
    assert set(fuse.state_dict()) == {"scaled_weight", "scaled_bias"}
    again = StepScaledLinear(6, 4, 1 / 8).double()
    again.load_state_dict(fuse.state_dict())
    torch.testing.assert_close(again(x), fuse(x), rtol=0, atol=0)


def test_step_scaled_linear_validation():
    with pytest.raises(ValueError, match=r"step_scale must lie in \(0, 1\], got 2"):
        StepScaledLinear(3, 2, 2)
    with pytest.raises(ValueError, match=r"step_scale must lie in \(0, 1\], got 0"):
        StepScaledLinear(3, 2, 0)
    with pytest.raises(TypeError, match="step_scale must be a float, got str"):
        StepScaledLinear(3, 2, "0.5")
    with pytest.raises(ValueError, match="in_features"):
        StepScaledLinear(0, 2, 0.5)


def test_crt_scale_fusion_step_is_the_same_function_at_initialisation():
    x = torch.randn(3, 6, 3, 3, dtype=torch.float64)
    outputs = []
    for scale in (False, True):
        torch.manual_seed(0)
        crt = CRT(6, embedding_size=8, num_prototypes=4, projection_dim=5, scale_fusion_step=scale)
        outputs.append(crt.double()(x))
    assert isinstance(crt.fuse, StepScaledLinear) and crt.fuse.step_scale == 1 / 4
    assert crt.fuse.in_features == 4 * 5 and crt.fuse.out_features == 8
    torch.testing.assert_close(outputs[1], outputs[0], atol=1e-12, rtol=0)


def test_crt_scale_fusion_step_only_touches_the_flatten_fusion_and_reaches_multihead_heads():
    for fusion in ("sum", "prototype_wise"):
        crt = CRT(6, embedding_size=8, num_prototypes=4, fusion=fusion, scale_fusion_step=True)
        assert not isinstance(crt.fuse, StepScaledLinear)
    heads = MultiHeadCRT(6, heads=[(4, 8), (2, 4)], scale_fusion_step=True).heads
    assert [head.fuse.step_scale for head in heads] == [1 / 4, 1 / 2]
    branch = CRT(6, 8, 4, global_pooling="avg", scale_fusion_step=True)
    assert all(float(p.detach().abs().max()) == 0 for p in branch.fuse.parameters())
    with pytest.raises(TypeError, match="scale_fusion_step must be a bool, got int"):
        CRT(6, 8, 4, scale_fusion_step=1)
