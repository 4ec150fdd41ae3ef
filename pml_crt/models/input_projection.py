"""The per-position input projection shared by CRT and NetVLAD."""

from __future__ import annotations

import numbers

import torch

from ..utils.validation import check_positive_int


def input_projection(in_channels: int, projection_dim: int | None) -> tuple[torch.nn.Module, int]:
    """Build the ``C -> d`` projection applied to every position.

    Args:
        in_channels: ``C``.
        projection_dim: ``d``; ``None`` means ``min(C, 512)``; ``0`` means no
            projection (identity, ``d = C``).

    Returns:
        ``(module, d)``: ``Linear(C, d) + LayerNorm(d)`` mapping ``(B, N, C)``
        to ``(B, N, d)``, or ``Identity`` when ``projection_dim == 0``.
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
    module = torch.nn.Sequential(
        torch.nn.Linear(in_channels, projection_dim), torch.nn.LayerNorm(projection_dim)
    )
    return module, int(projection_dim)
