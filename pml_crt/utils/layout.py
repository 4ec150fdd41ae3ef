"""Tensor layouts of pml-crt: trunk outputs to token sequences, heads out of a concatenation."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .validation import check_finite, check_input_dtype, check_tensor

__all__ = ["feature_map_to_tokens", "split_heads"]


def feature_map_to_tokens(
    x: object,
    in_channels: int,
    name: str = "x",
    check_values: bool = True,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Turn a trunk output into a token sequence.

    Args:
        x: ``(B, C, H, W)`` feature map (CNN trunk) or ``(B, N, C)`` token
            sequence (transformer trunk), floating point.
        in_channels: the expected ``C``.
        name: the argument name used in error messages.
        check_values: also reject NaN and infinite values.
        dtype: the dtype of the module parameters the tokens meet; ``x`` must
            have it (see :func:`check_input_dtype`). ``None`` skips the check
            (no parameter meets the tokens, so any floating dtype works).

    Returns:
        ``(B, N, C)`` tokens, with ``N = H * W`` for a feature map (a view of
        ``x`` where possible).
    """
    x = check_tensor(x, name)
    if x.dim() == 4:
        batch, channels = x.shape[:2]
        layout = "(B, C, H, W)"
    elif x.dim() == 3:
        batch, channels = x.shape[0], x.shape[2]
        layout = "(B, N, C)"
    else:
        raise ValueError(
            f"{name} must be a (B, C, H, W) feature map or a (B, N, C) token "
            f"sequence, got shape {tuple(x.shape)}"
        )
    if channels != in_channels:
        raise ValueError(
            f"{name} has {channels} channels in layout {layout} (shape "
            f"{tuple(x.shape)}), but the module was built with in_channels={in_channels}"
        )
    if batch == 0 or x.numel() == 0:
        raise ValueError(f"{name} is empty: shape {tuple(x.shape)}")
    if dtype is not None:
        check_input_dtype(x, dtype, name)
    if check_values:
        check_finite(x, name)
    if x.dim() == 4:
        return x.flatten(2).transpose(1, 2)
    return x


def split_heads(
    embeddings: torch.Tensor, embedding_sizes: Sequence[int]
) -> tuple[torch.Tensor, ...]:
    """Split ``(B, sum(D_h))`` into one ``(B, D_h)`` view per head."""
    return torch.split(embeddings, list(embedding_sizes), dim=1)
