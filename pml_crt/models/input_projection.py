"""The per-position input projection shared by CRT and NetVLAD."""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..utils.validation import check_positive_int


class InputProjection(torch.nn.Sequential):
    """``Linear(C, d)`` then ``LayerNorm(d)`` on every position: ``(B, N, C) -> (B, N, d)``.

    A ``Sequential`` of the two layers, so its parameters are named ``0.*``
    (the Linear) and ``1.*`` (the LayerNorm) in state dicts; :attr:`linear`
    and :attr:`norm` are the layers by name.
    """

    def __init__(self, in_channels: int, projection_dim: int) -> None:
        super().__init__(
            torch.nn.Linear(in_channels, projection_dim), torch.nn.LayerNorm(projection_dim)
        )

    @property
    def linear(self) -> torch.nn.Linear:
        """The ``Linear(C, d)`` layer."""
        return self[0]

    @property
    def norm(self) -> torch.nn.LayerNorm:
        """The ``LayerNorm(d)`` applied after :attr:`linear`."""
        return self[1]


def input_projection(in_channels: int, projection_dim: int | None) -> tuple[torch.nn.Module, int]:
    """Build the ``C -> d`` projection applied to every position.

    Args:
        in_channels: ``C``.
        projection_dim: ``d``; ``None`` means ``min(C, 512)``; ``0`` means no
            projection (identity, ``d = C``).

    Returns:
        ``(module, d)``: an :class:`InputProjection` mapping ``(B, N, C)`` to
        ``(B, N, d)``, or ``Identity`` when ``projection_dim == 0``.
    """
    if projection_dim is None:
        projection_dim = min(in_channels, 512)
    if (
        isinstance(projection_dim, numbers.Integral)
        and not isinstance(projection_dim, bool)
        and projection_dim == 0
    ):
        return torch.nn.Identity(), in_channels
    check_positive_int(projection_dim, "projection_dim")
    return InputProjection(in_channels, int(projection_dim)), int(projection_dim)


def project_jointly(
    projections: Sequence[torch.nn.Module], tokens: torch.Tensor
) -> list[torch.Tensor]:
    """Apply every projection to the same ``tokens`` ``(B, N, C)``; one GEMM for the Linears.

    The :class:`InputProjection` layers whose Linear has a bias run as one
    matrix product with their weights stacked, ``(B*N, C) @ (C, sum_h d_h)``,
    before each one's LayerNorm; any other module (``Identity``, a custom
    projection) is applied on its own. The result equals
    ``[projection(tokens) for projection in projections]``.

    Returns:
        One ``(B, N, d_h)`` tensor per projection, in order.
    """
    stacked = [
        i
        for i, projection in enumerate(projections)
        if isinstance(projection, InputProjection) and projection.linear.bias is not None
    ]
    if len(stacked) < 2:
        return [projection(tokens) for projection in projections]
    features = [None if i in stacked else p(tokens) for i, p in enumerate(projections)]
    linears = [projections[i].linear for i in stacked]
    weight = torch.cat([linear.weight for linear in linears])  # (sum_h d_h, C)
    bias = torch.cat([linear.bias for linear in linears])
    chunks = F.linear(tokens, weight, bias).split([lin.out_features for lin in linears], dim=-1)
    for i, chunk in zip(stacked, chunks, strict=True):
        features[i] = projections[i].norm(chunk)
    return features
