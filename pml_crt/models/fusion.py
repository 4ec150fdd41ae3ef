"""Fusions of CRT's coded residuals beside a plain ``Linear``.

- :class:`PrototypeWiseLinear`: a low-parameter fusion, one small projection per prototype.
- :class:`StepScaledLinear`: a ``Linear`` whose Adam steps are scaled down, for the
  ``K * d`` fan-in of the ``"flatten"`` fusion.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..utils.validation import check_positive_int

__all__ = ["PrototypeWiseLinear", "StepScaledLinear"]


class PrototypeWiseLinear(torch.nn.Module):
    """Each prototype's coded residual projected to ``D / K`` values, concatenated.

    ``(B, K, d) -> (B, D)``: ``y[:, k*D/K : (k+1)*D/K] = E[:, k] @ W_k + b_k``
    with ``W_k`` ``(d, D/K)``. ``d * D + D`` parameters, against ``K * d * D + D``
    for one ``Linear(K*d, D)`` (``"flatten"`` fusion): at ``K = 64``,
    ``d = D = 512`` that is 0.26 M instead of 16.8 M. Every output still sees one
    prototype's full residual, unlike ``"sum"``, where all prototypes share
    one ``Linear(d, D)`` and are summed.

    Args:
        num_prototypes: ``K``.
        in_features: ``d``.
        out_features: ``D``, a multiple of ``K``.
    """

    def __init__(self, num_prototypes: int, in_features: int, out_features: int) -> None:
        super().__init__()
        check_positive_int(num_prototypes, "num_prototypes")
        check_positive_int(in_features, "in_features")
        check_positive_int(out_features, "out_features")
        if out_features % num_prototypes:
            raise ValueError(
                f'fusion="prototype_wise" needs embedding_size ({out_features}) to be a '
                f"multiple of num_prototypes ({num_prototypes})"
            )
        self.num_prototypes = num_prototypes
        self.in_features = in_features
        self.out_features = out_features
        per = out_features // num_prototypes
        self.weight = torch.nn.Parameter(torch.empty(num_prototypes, in_features, per))
        self.bias = torch.nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``Linear(d, D/K)``'s default init for each prototype: U(+-1/sqrt(d))."""
        bound = 1.0 / math.sqrt(self.in_features)
        torch.nn.init.uniform_(self.weight, -bound, bound)
        torch.nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, coded: torch.Tensor) -> torch.Tensor:
        """``(B, K, d)`` coded residuals to ``(B, D)``."""
        per_prototype = torch.einsum("bkd,kde->bke", coded, self.weight)  # (B, K, D/K)
        return per_prototype.flatten(1) + self.bias

    def extra_repr(self) -> str:
        return (
            f"num_prototypes={self.num_prototypes}, in_features={self.in_features}, "
            f"out_features={self.out_features}"
        )


class StepScaledLinear(torch.nn.Module):
    """``Linear(in_features, out_features)`` whose Adam steps move it ``step_scale`` times as far.

    ``y = step_scale * (x @ V^T + c)``, with ``V`` and ``c`` initialised as a
    ``Linear``'s weight and bias divided by ``step_scale``: at initialisation
    the function, and its distribution, are exactly a plain ``Linear``'s. Adam
    moves every stored parameter by about ``lr`` per step whatever its
    gradient's scale, so the effective weights ``step_scale * V`` move by
    ``step_scale * lr``: a per-layer learning-rate multiplier that needs no
    optimiser parameter groups (under plain SGD the multiplier is
    ``step_scale ** 2``).

    Why CRT needs it: with ``n`` inputs, one Adam step changes a ``Linear``'s
    output by up to ``lr * sum_i |x_i|`` while its initial output is of order
    ``||x|| / sqrt(n)``, so the relative step grows with the fan-in ``n``. The
    ``"flatten"`` fusion has ``n = K * d`` (32768 at ``K = 64``, ``d = 512``),
    ``K`` times a ``Linear(d, D)``'s: at the same learning rate it rewrites
    its output ``K`` times faster than the ``"sum"`` fusion and about 25 times
    faster than a linear head on a 1280-channel trunk. ``step_scale = 1 / K``
    gives it the steps of a fan-in-``d`` layer.

    State dicts store ``scaled_weight`` (``V``, ``(out, in)``) and
    ``scaled_bias`` (``c``, ``(out,)``); a plain ``Linear``'s ``weight`` and
    ``bias`` (e.g. a checkpoint saved without step scaling) load as
    ``weight / step_scale`` and ``bias / step_scale``, the same function.

    Args:
        in_features: ``n``.
        out_features: ``D``.
        step_scale: the multiplier, in ``(0, 1]``.
    """

    def __init__(self, in_features: int, out_features: int, step_scale: float) -> None:
        super().__init__()
        check_positive_int(in_features, "in_features")
        check_positive_int(out_features, "out_features")
        if isinstance(step_scale, bool) or not isinstance(step_scale, (int, float)):
            raise TypeError(f"step_scale must be a float, got {type(step_scale).__name__}")
        if not 0 < step_scale <= 1:
            raise ValueError(f"step_scale must lie in (0, 1], got {step_scale}")
        self.in_features = in_features
        self.out_features = out_features
        self.step_scale = float(step_scale)
        self.scaled_weight = torch.nn.Parameter(torch.empty(out_features, in_features))
        self.scaled_bias = torch.nn.Parameter(torch.empty(out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``Linear``'s default init divided by ``step_scale``: U(+-1/(step_scale*sqrt(n)))."""
        bound = 1.0 / (self.step_scale * math.sqrt(self.in_features))
        torch.nn.init.uniform_(self.scaled_weight, -bound, bound)
        torch.nn.init.uniform_(self.scaled_bias, -bound, bound)

    @property
    def weight(self) -> torch.Tensor:
        """The effective ``(out, in)`` weight, ``step_scale * scaled_weight``."""
        return self.step_scale * self.scaled_weight

    @property
    def bias(self) -> torch.Tensor:
        """The effective ``(out,)`` bias, ``step_scale * scaled_bias``."""
        return self.step_scale * self.scaled_bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(..., in_features)`` to ``(..., out_features)``."""
        return self.step_scale * F.linear(x, self.scaled_weight, self.scaled_bias)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        for name in ("weight", "bias"):
            plain = state_dict.pop(prefix + name, None)
            if plain is not None and prefix + "scaled_" + name not in state_dict:
                state_dict[prefix + "scaled_" + name] = plain / self.step_scale
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"step_scale={self.step_scale:g}"
        )
