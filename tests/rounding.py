"""Magnitudes that float rounding-error bounds in the tests are relative to."""

from __future__ import annotations

import torch


def output_and_gradient_scales(
    module: torch.nn.Module, x: torch.Tensor, weights: torch.Tensor
) -> list[torch.Tensor]:
    """The largest |value| of ``module(x)`` and of every gradient of ``sum_j w_j out_j``.

    A gradient is a sum over the outputs j whose terms can cancel (a temperature's
    gradient can be ~1e-3 of its terms), so its scale is the sum of |terms|,
    ``|J|^T |w|`` with ``J = d out / d theta``: one backward per output. Returns
    ``[output scale, one scale per parameter of module..., the scale of x's gradient]``.
    """
    x = x.detach().clone().requires_grad_()
    out = module(x)
    tensors = [*module.parameters(), x]
    sums = [torch.zeros_like(t) for t in tensors]
    for out_j, w_j in zip(out.flatten(), weights.flatten(), strict=True):
        grads = torch.autograd.grad(out_j, tensors, retain_graph=True, allow_unused=True)
        for total, grad in zip(sums, grads, strict=True):
            if grad is not None:
                total += w_j.abs() * grad.abs()
    return [out.detach().abs().max()] + [total.max() for total in sums]
