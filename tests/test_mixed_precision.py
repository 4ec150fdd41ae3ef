"""Embedders and losses under ``torch.autocast`` (bf16 on CPU; fp16/bf16 on CUDA when present).

Stated tolerance: outputs within 3% relative (Frobenius) error of float32 and parameter
gradients pointing the same way (cosine > 0.99), with every value finite, for normal
inputs, inputs with norms near 1e4, constant feature maps and all-zero maps.
"""

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses

from pml_crt.losses import MultiHeadLoss, SimilarityConsistencyLoss
from pml_crt.models import CRT, GlobalPoolEmbedder, MultiHeadCRT, NetVLAD

RELATIVE_TOLERANCE = 3e-2
GRADIENT_COSINE = 0.99

DEVICES_AND_DTYPES = [("cpu", torch.bfloat16)] + (
    [("cuda", torch.float16), ("cuda", torch.bfloat16)] if torch.cuda.is_available() else []
)

EMBEDDERS = {
    "CRT": lambda: CRT(32, 16, 8),
    "CRT-positions-prototype": lambda: CRT(32, 16, 8, assignment="positions", residual="prototype"),
    "MultiHeadCRT": lambda: MultiHeadCRT(32, heads=[(8, 16), (4, 8)]),
    "NetVLAD": lambda: NetVLAD(32, 16, 8),
    "GeM": lambda: GlobalPoolEmbedder(32, 16, pooling="gem"),
}


def _inputs(kind, device):
    generator = torch.Generator().manual_seed(0)
    shape = (6, 32, 5, 5)
    if kind == "normal":
        x = torch.randn(shape, generator=generator)
    elif kind == "large":
        x = 1e4 * torch.randn(shape, generator=generator)
    elif kind == "constant":
        x = torch.full(shape, 0.7)
    else:
        x = torch.zeros(shape)
    return x.to(device)


def _relative_error(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def _gradients(module):
    return torch.cat([p.grad.flatten() for p in module.parameters() if p.grad is not None])


@pytest.mark.parametrize("device,dtype", DEVICES_AND_DTYPES)
@pytest.mark.parametrize("kind", ["normal", "large", "constant", "zeros"])
@pytest.mark.parametrize("name", list(EMBEDDERS))
def test_embedder_under_autocast(name, kind, device, dtype):
    torch.manual_seed(0)
    module = EMBEDDERS[name]().to(device)
    x = _inputs(kind, device)
    target = torch.randn(6, module(x).shape[1], device=device)

    def run(autocast):
        module.zero_grad()
        with torch.autocast(device, dtype=dtype, enabled=autocast):
            out = module(x)
        (out.float() * target).sum().backward()
        return out.detach(), _gradients(module).clone()

    reference, reference_grad = run(False)
    out, grad = run(True)
    assert torch.isfinite(out).all() and torch.isfinite(grad).all()
    assert _relative_error(out, reference) < RELATIVE_TOLERANCE
    assert F.cosine_similarity(grad.float(), reference_grad, dim=0) > GRADIENT_COSINE


@pytest.mark.parametrize("device,dtype", DEVICES_AND_DTYPES)
def test_losses_under_autocast(device, dtype):
    torch.manual_seed(0)
    sizes = [16, 8]
    embeddings = torch.randn(16, 24, device=device, requires_grad=True)
    labels = torch.arange(4).repeat_interleave(4).to(device)
    loss_funcs = {
        "MultiHeadLoss": MultiHeadLoss(losses.MultiSimilarityLoss(), sizes),
        "SimilarityConsistencyLoss": SimilarityConsistencyLoss(sizes),
    }
    for name, loss_func in loss_funcs.items():
        values, grads = [], []
        for autocast in (False, True):
            embeddings.grad = None
            with torch.autocast(device, dtype=dtype, enabled=autocast):
                # what an autocast embedder hands the loss: low-precision embeddings
                inputs = embeddings.to(dtype) if autocast else embeddings
                value = loss_func(inputs, labels)
            value.float().backward()
            values.append(value.float().detach())
            grads.append(embeddings.grad.clone())
        assert torch.isfinite(values[1]) and torch.isfinite(grads[1]).all(), name
        assert abs(values[1] - values[0]) <= RELATIVE_TOLERANCE * values[0].abs() + 1e-3, name
        assert F.cosine_similarity(grads[1].flatten(), grads[0].flatten(), dim=0) > 0.95, name
