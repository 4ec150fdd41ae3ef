"""Embedders and losses under ``torch.autocast`` (bf16 on CPU; fp16/bf16 on CUDA when present).

Stated tolerance: outputs within 3% relative (Frobenius) error of float32 and parameter
gradients pointing the same way (cosine > 0.99), with every value finite, for normal
inputs, inputs with norms near 1e4, constant feature maps and all-zero maps. Also the input-dtype
rule: a dtype other than the parameters' is a clear error, except the low-precision mix that
autocast handles.
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
    # The coded residuals alone: with a global branch their fusion starts at zero.
    "CRT": lambda: CRT(32, 16, 8, global_pooling=None),
    "CRT-positions-prototype": lambda: CRT(
        32, 16, 8, assignment="positions", residual="prototype", global_pooling=None
    ),
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
@pytest.mark.parametrize("fusion", ["flatten", "sum", "prototype_wise"])
def test_every_fusion_returns_the_autocast_dtype_like_a_linear(fusion, device, dtype):
    module = CRT(32, 16, 8, fusion=fusion).to(device)
    with torch.autocast(device, dtype=dtype):
        out = module(_inputs("normal", device))
        linear = torch.nn.Linear(4, 2).to(device)(torch.ones(1, 4, device=device))
    assert out.dtype == linear.dtype == dtype


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


# --------------------------------------------------------------------------- input dtype

MISMATCHES = [
    (torch.float32, torch.float64),
    (torch.float64, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float64, torch.float16),
]


@pytest.mark.parametrize("module_dtype,input_dtype", MISMATCHES, ids=str)
@pytest.mark.parametrize("name", list(EMBEDDERS))
def test_input_of_another_dtype_is_a_clear_error(name, module_dtype, input_dtype):
    """Outside autocast, an input whose dtype differs from the parameters' is refused
    with a message naming the argument and both dtypes (not cast silently)."""
    module = EMBEDDERS[name]().to(module_dtype)
    x = _inputs("normal", "cpu").to(input_dtype)
    with pytest.raises(TypeError, match=f"x has dtype {input_dtype}, .* {module_dtype}"):
        module(x)


@pytest.mark.parametrize("name", list(EMBEDDERS))
def test_float64_input_under_autocast_is_a_clear_error(name):
    """Autocast leaves float64 alone, so it cannot meet float32 parameters there either."""
    module = EMBEDDERS[name]()
    x = _inputs("normal", "cpu").double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with pytest.raises(TypeError, match="x has dtype torch.float64, .* torch.float32"):
            module(x)


@pytest.mark.parametrize("input_dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(EMBEDDERS))
def test_low_precision_input_under_autocast_is_accepted(name, input_dtype):
    """What an autocast trunk hands a float32 embedder; autocast casts it for every matmul."""
    torch.manual_seed(0)
    module = EMBEDDERS[name]()
    x = _inputs("normal", "cpu")
    reference = module(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = module(x.to(input_dtype))
    assert _relative_error(out, reference) < RELATIVE_TOLERANCE


@pytest.mark.parametrize("pooling", ["avg", "max", "gem"])
@pytest.mark.parametrize("input_dtype", [torch.float64, torch.bfloat16], ids=str)
def test_pooling_without_linear_takes_any_floating_dtype(pooling, input_dtype):
    """No parameter meets the tokens (GeM's p is cast to them), so nothing can mismatch."""
    module = GlobalPoolEmbedder(32, None, pooling=pooling)
    x = _inputs("normal", "cpu").abs().to(input_dtype)
    out = module(x)
    tokens = x.flatten(2).double()
    p = module.gem_p_value if pooling == "gem" else None
    expected = {
        "avg": lambda: tokens.mean(dim=2),
        "max": lambda: tokens.amax(dim=2),
        "gem": lambda: tokens.clamp(min=module.gem_eps).pow(p).mean(dim=2).pow(1 / p),
    }[pooling]()
    assert out.dtype == input_dtype
    # The reference starts from the same (rounded) values, so only the ops' rounding counts:
    # bfloat16 rounds each op to 2**-9 relative; GeM's exp(p log x) multiplies the rounding of
    # log x by p |log x| < 4.5 here (x < 4.2, p = 3; values near gem_eps add ~0 to the mean),
    # and its final pow divides the error by p again: about 2 * 2**-8 in all, bounded here by
    # 4 * 2**-8. float64: the same ops at 2**-53.
    tolerance = 1e-12 if input_dtype == torch.float64 else 4 * 2.0**-8
    torch.testing.assert_close(out.double(), expected, rtol=tolerance, atol=tolerance)
