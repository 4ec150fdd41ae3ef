"""CRT's prototype-wise fusion: a low-parameter alternative to one ``Linear(K*d, D)``."""

from __future__ import annotations

import math

import torch

from ..utils.validation import check_positive_int

__all__ = ["PrototypeWiseLinear"]


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
        """``(B, K, d)`` coded residuals to ``(B, D)``.

        One batched ``baddbmm`` over prototypes, bias included, so that under
        ``torch.autocast`` the output has the autocast dtype, as a ``Linear``'s.
        """
        bias = self.bias.view(self.num_prototypes, 1, -1)  # (K, 1, D/K)
        per_prototype = torch.baddbmm(bias, coded.transpose(0, 1), self.weight)  # (K, B, D/K)
        return per_prototype.transpose(0, 1).flatten(1)

    def extra_repr(self) -> str:
        return (
            f"num_prototypes={self.num_prototypes}, in_features={self.in_features}, "
            f"out_features={self.out_features}"
        )
