"""MultiHeadCRT's shared work (one token view, one check, one stacked projection GEMM)
gives what running every head on its own gives, forward and backward."""

import pytest
import torch

from pml_crt.models import MultiHeadCRT


def _separate(module, x):
    return torch.cat([head(x) for head in module.heads], dim=1)


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
    x = torch.randn(3, 8, 2, 3, requires_grad=True)
    weights = torch.randn(3, sum(module.embedding_sizes))

    shared = module(x)
    (shared * weights).sum().backward()
    grads = [p.grad.clone() for p in module.parameters()] + [x.grad.clone()]
    module.zero_grad()
    x.grad = None
    separate = _separate(module, x)
    (separate * weights).sum().backward()
    expected = [p.grad for p in module.parameters()] + [x.grad]

    torch.testing.assert_close(shared, separate, rtol=1e-5, atol=1e-6)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_shared_path_checks_the_input_once_and_names_it():
    module = MultiHeadCRT(4, heads=[(2, 3), (2, 2)]).train()
    x = torch.randn(2, 4, 2, 2)
    x[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="x contains NaN or infinite"):
        module(x)
