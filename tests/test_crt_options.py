"""CRT's prototype-wise fusion and global branch (issue: CRT where it was designed to work)."""

from __future__ import annotations

import pytest
import torch

from pml_crt.models import CRT, GlobalPoolEmbedder, MultiHeadCRT
from pml_crt.models.fusion import PrototypeWiseLinear


def _prototype_wise_reference(coded, weight, bias):
    """``y[b, k*e + j] = sum_i coded[b, k, i] * weight[k, i, j] + bias[k*e + j]`` in loops."""
    batch, k_count, width = coded.shape
    per = weight.shape[2]
    out = torch.zeros(batch, k_count * per, dtype=torch.float64)
    for b in range(batch):
        for k in range(k_count):
            for j in range(per):
                total = float(bias[k * per + j])
                for i in range(width):
                    total += float(coded[b, k, i]) * float(weight[k, i, j])
                out[b, k * per + j] = total
    return out


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_prototype_wise_linear_matches_loops(dtype):
    torch.manual_seed(0)
    fuse = PrototypeWiseLinear(3, 5, 6).to(dtype)
    coded = torch.randn(4, 3, 5, dtype=dtype)
    got = fuse(coded)
    expected = _prototype_wise_reference(coded, fuse.weight.detach(), fuse.bias.detach())
    # Each output is a sum of d + 1 products: |error| <= (d + 1) u sum |terms|.
    magnitude = coded.abs().max() * fuse.weight.abs().max() * 5 + fuse.bias.abs().max()
    tolerance = 6 * (torch.finfo(dtype).eps / 2) * float(magnitude)
    assert got.shape == (4, 6) and got.dtype == dtype
    torch.testing.assert_close(got.double(), expected, atol=tolerance, rtol=0)
    assert sum(p.numel() for p in fuse.parameters()) == 5 * 6 + 6


def test_prototype_wise_linear_gradcheck():
    torch.manual_seed(0)
    fuse = PrototypeWiseLinear(2, 3, 4).double()
    coded = torch.randn(2, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fuse, (coded,))
    for name, parameter in fuse.named_parameters():  # and with respect to the weights

        def call(p, name=name):
            return torch.func.functional_call(fuse, {name: p}, (coded.detach(),))

        assert torch.autograd.gradcheck(call, (parameter.detach().clone().requires_grad_(),))


def test_prototype_wise_linear_initialises_each_prototype_as_a_linear_of_fan_in_d():
    # Linear(d, D/K)'s default: U(-1/sqrt(d), 1/sqrt(d)) for weights and bias. With
    # 4 * 16 * 16 draws the largest |w| is within 1% of the bound (all but ~e^-10).
    torch.manual_seed(0)
    fuse = PrototypeWiseLinear(4, 16, 64)
    bound = 1 / 16**0.5
    for parameter in (fuse.weight, fuse.bias):
        largest = float(parameter.detach().abs().max())
        assert 0.9 * bound < largest <= bound, (parameter.shape, largest, bound)
    assert float(fuse.weight.detach().abs().max()) > 0.99 * bound


def test_crt_prototype_wise_fusion_and_its_parameter_count():
    torch.manual_seed(0)
    crt = CRT(6, 8, 4, projection_dim=5, fusion="prototype_wise", global_pooling=None)
    x = torch.randn(3, 6, 2, 2)
    coded = crt.encode(x)
    expected = _prototype_wise_reference(coded.detach(), crt.fuse.weight.detach(), crt.fuse.bias)
    torch.testing.assert_close(crt(x).double(), expected, atol=1e-5, rtol=0)
    big = CRT(512, embedding_size=512, num_prototypes=64, fusion="prototype_wise")
    flat = CRT(512, embedding_size=512, num_prototypes=64)
    assert sum(p.numel() for p in big.fuse.parameters()) == 512 * 512 + 512
    assert sum(p.numel() for p in flat.fuse.parameters()) == 64 * 512 * 512 + 512
    with pytest.raises(ValueError, match=r"embedding_size \(10\) to be a multiple of.*\(4\)"):
        CRT(6, embedding_size=10, num_prototypes=4, fusion="prototype_wise")


@pytest.mark.parametrize("fusion", ["flatten", "sum", "prototype_wise"])
@pytest.mark.parametrize("pooling", ["avg", "gem"])
def test_global_branch_starts_as_the_pooling_head_and_adds_the_fused_residuals(fusion, pooling):
    torch.manual_seed(0)
    crt = CRT(6, 8, 4, projection_dim=5, fusion=fusion, global_pooling=pooling).double()
    x = torch.rand(3, 6, 2, 2, dtype=torch.float64)  # positive, as GeM expects
    pool = GlobalPoolEmbedder(6, 8, pooling=pooling).double()
    pool.load_state_dict(crt.global_branch.state_dict())
    assert all(float(p.abs().max()) == 0 for p in crt.fuse.parameters())
    torch.testing.assert_close(crt(x), pool(x), atol=0, rtol=0)
    # Training moves the fusion off zero: the output is then fused residuals + pooling head.
    loss = crt(x).pow(2).sum()
    loss.backward()
    assert float(crt.fuse.weight.grad.abs().max()) > 0, "the coded part would never start"
    with torch.no_grad():
        for parameter in crt.fuse.parameters():
            parameter.normal_()
    tokens = crt.tokens(x)
    coded = crt.encode(x)
    if fusion == "flatten":
        fused = coded.flatten(1) @ crt.fuse.weight.t() + crt.fuse.bias
    elif fusion == "sum":
        fused = (coded @ crt.fuse.weight.t() + crt.fuse.bias).sum(dim=1)
    else:
        fused = _prototype_wise_reference(coded, crt.fuse.weight, crt.fuse.bias)
    torch.testing.assert_close(crt(x), fused + pool(x), atol=1e-12, rtol=0)
    torch.testing.assert_close(crt.embed(coded, tokens), crt(x))
    with pytest.raises(ValueError, match=r"tokens \(B, N, C\).*global_pooling='"):
        crt.embed(coded)


def test_multihead_with_global_branches_equals_its_heads_alone():
    torch.manual_seed(0)
    multi = MultiHeadCRT(6, heads=[(4, 8), (2, 6)], projection_dim=5, global_pooling="avg")
    multi = multi.double().train()
    with torch.no_grad():
        for head in multi.heads:
            for parameter in head.fuse.parameters():
                parameter.normal_()
    x = torch.randn(3, 6, 2, 2, dtype=torch.float64)
    alone = torch.cat([head(x) for head in multi.heads], dim=1)
    torch.testing.assert_close(multi(x), alone, atol=1e-12, rtol=0)
    assert {"global_branch.linear.weight"} <= {n for n, _ in multi.heads[0].named_parameters()}


def test_multihead_default_starts_as_gem_heads_and_none_gives_the_01_heads():
    torch.manual_seed(0)
    multi = MultiHeadCRT(6, heads=[(4, 8), (2, 6)], projection_dim=5).double().train()
    x = torch.rand(3, 6, 2, 2, dtype=torch.float64)
    pooled = []
    for head, width in zip(multi.heads, (8, 6), strict=True):
        assert head.global_pooling == "gem"
        pool = GlobalPoolEmbedder(6, width, pooling="gem").double()
        pool.load_state_dict(head.global_branch.state_dict())
        pooled.append(pool(x))
    torch.testing.assert_close(multi(x), torch.cat(pooled, dim=1), atol=0, rtol=0)
    # A head's dict overrides the shared choice; None gives 0.1.0's heads and loads their state.
    mixed = MultiHeadCRT(
        6,
        heads=[(4, 8), {"num_prototypes": 2, "embedding_size": 6, "global_pooling": None}],
        projection_dim=5,
    )
    assert [h.global_pooling for h in mixed.heads] == ["gem", None]
    old = MultiHeadCRT(6, heads=[(4, 8)], projection_dim=5, global_pooling=None)
    assert old.heads[0].global_branch is None
    assert not any("global_branch" in key for key in old.state_dict())
    with pytest.raises(RuntimeError, match="global_branch"):
        MultiHeadCRT(6, heads=[(4, 8)], projection_dim=5).load_state_dict(old.state_dict())


def test_crt_default_starts_as_a_gem_head_and_none_gives_the_01_head():
    torch.manual_seed(0)
    crt = CRT(6, 8, 4, projection_dim=5).double().train()
    x = torch.rand(3, 6, 2, 2, dtype=torch.float64)
    assert crt.global_pooling == "gem"
    pool = GlobalPoolEmbedder(6, 8, pooling="gem").double()
    pool.load_state_dict(crt.global_branch.state_dict())
    torch.testing.assert_close(crt(x), pool(x), atol=0, rtol=0)
    # global_pooling=None: 0.1.0's head (coded residuals only); its checkpoints need it.
    old = CRT(6, 8, 4, projection_dim=5, global_pooling=None)
    assert old.global_branch is None
    assert not any("global_branch" in key for key in old.state_dict())
    assert any(float(p.abs().max()) > 0 for p in old.fuse.parameters())
    with pytest.raises(RuntimeError, match="global_branch"):
        CRT(6, 8, 4, projection_dim=5).load_state_dict(old.state_dict())
