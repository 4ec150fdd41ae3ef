"""``torch.compile`` of a trunk + CRT matches eager, outputs and gradients.

A cold compile (empty inductor cache) takes tens of seconds on 2 CPU cores;
warm runs reuse ``torch``'s on-disk compile cache.
"""

import pytest
import torch

from pml_crt.models import CRT, MultiHeadCRT
from pml_crt.trunks import SmallConvNet


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def _run(fn, model, x):
    """Forward + backward of ``fn`` (``model`` or its compiled wrapper); grads of ``model``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_()
    out = fn(x)
    # A non-uniform loss, so that every gradient path matters.
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach(), _grads(model), x.grad.detach()


def test_compiled_trunk_and_crt_match_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    trunk = SmallConvNet(1, (8,), pool_last=False)
    embedder = CRT(trunk.out_channels, 6, 4, projection_dim=8, diversity_weight=0.1)
    model = torch.nn.Sequential(trunk, embedder).train()
    x = torch.randn(4, 1, 6, 6)

    # BatchNorm updates running statistics in training mode: run eager and
    # compiled from the same state.
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager_out, eager_grads, eager_xgrad = _run(model, model, x)
    model.load_state_dict(state)
    out, grads, xgrad = _run(torch.compile(model), model, x)

    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xgrad, eager_xgrad, rtol=1e-4, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_multi_head_crt_matches_eager():
    """The heads' shared projection (one stacked GEMM) under ``torch.compile``."""
    torch._dynamo.reset()
    torch.manual_seed(1)
    embedder = MultiHeadCRT(8, heads=[(4, 6), (2, 3)]).train()
    x = torch.randn(3, 8, 3, 3)
    eager_out, eager_grads, eager_xgrad = _run(embedder, embedder, x)
    out, grads, xgrad = _run(torch.compile(embedder), embedder, x)
    torch.testing.assert_close(out, eager_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(xgrad, eager_xgrad, rtol=1e-4, atol=1e-5)
    assert grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)
