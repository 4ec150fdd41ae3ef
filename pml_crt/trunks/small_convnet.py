"""A small from-scratch convnet trunk for small grayscale images such as Omniglot."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..utils.validation import check_positive_int

__all__ = ["SmallConvNet"]


class SmallConvNet(torch.nn.Module):
    """Stacked ``Conv3x3 -> BatchNorm -> ReLU -> MaxPool2x2`` blocks returning a feature map.

    The default is the "Conv-4" trunk common in few-shot work on Omniglot
    (four 64-channel blocks). Omniglot's 105x105 drawings are usually resized
    (28 or 64 pixels) first; on a 2-core CPU an epoch over the 19,280
    background images costs seconds to minutes depending on size and width.

    Shapes: input ``(B, in_channels, H, W)``; output
    ``(B, channels[-1], H', W')``, where each pooled block maps a side ``s``
    to ``floor(s / 2)``. With the default four blocks: 105 -> 6, 64 -> 4,
    28 -> 1 (use ``pool_last=False`` on small inputs to keep more positions,
    e.g. 28 -> 3, 64 -> 8, or ``num_pools=2`` for a 7x7 map of a 28-px image at
    a quarter of the cost of a 56-px image with three poolings).

    Args:
        in_channels: input channels (1 for Omniglot's grayscale images).
        channels: output channels of each block; the number of blocks is
            ``len(channels)``.
        pool_last: max-pool after the last block too (``stride`` is then
            ``2 ** len(channels)``, otherwise ``2 ** (len(channels) - 1)``).
            ``None`` (the default) means ``True`` unless ``num_pools`` is given.
        num_pools: max-pool after the first ``num_pools`` blocks only (``0`` to
            ``len(channels)``; ``stride = 2 ** num_pools``); mutually exclusive
            with ``pool_last``.
        kernel_size: odd convolution kernel size (padding keeps the side).

    Attributes:
        out_channels: ``channels[-1]``.
        stride: the output stride.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: Sequence[int] = (64, 64, 64, 64),
        *,
        pool_last: bool | None = None,
        num_pools: int | None = None,
        kernel_size: int = 3,
    ) -> None:
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        channels = tuple(channels)
        if not channels:
            raise ValueError("channels must name at least one block")
        for c in channels:
            check_positive_int(c, "every entry of channels")
        check_positive_int(kernel_size, "kernel_size")
        if kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd, got {kernel_size}")
        num_pools = _num_pools(len(channels), pool_last, num_pools)

        blocks = []
        previous = in_channels
        for i, c in enumerate(channels):
            layers: list[torch.nn.Module] = [
                torch.nn.Conv2d(previous, c, kernel_size, padding=kernel_size // 2, bias=False),
                torch.nn.BatchNorm2d(c),
                torch.nn.ReLU(inplace=True),
            ]
            if i < num_pools:
                layers.append(torch.nn.MaxPool2d(2))
            blocks.append(torch.nn.Sequential(*layers))
            previous = c
        self.blocks = torch.nn.Sequential(*blocks)
        self.in_channels = in_channels
        self.channels = channels
        self.num_pools = num_pools
        self.pool_last = num_pools == len(channels)
        self.out_channels = channels[-1]
        self.stride = 2**num_pools
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Kaiming-normal convolutions, unit BatchNorm scale, zero BatchNorm shift."""
        for module in self.modules():
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, torch.nn.BatchNorm2d):
                torch.nn.init.ones_(module.weight)
                torch.nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the feature map.

        Args:
            x: ``(B, in_channels, H, W)`` images.

        Returns:
            ``(B, out_channels, H', W')``.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(
                f"x must have shape (B, {self.in_channels}, H, W), got {tuple(x.shape)}"
            )
        return self.blocks(x)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, channels={self.channels}, "
            f"num_pools={self.num_pools}, out_channels={self.out_channels}"
        )


def _num_pools(num_blocks: int, pool_last: bool | None, num_pools: int | None) -> int:
    """How many leading blocks max-pool, from ``pool_last`` or ``num_pools``."""
    if num_pools is None:
        return num_blocks if pool_last is None or pool_last else num_blocks - 1
    if pool_last is not None:
        raise ValueError(
            f"pass pool_last or num_pools, not both (got pool_last={pool_last}, "
            f"num_pools={num_pools})"
        )
    if isinstance(num_pools, bool) or not isinstance(num_pools, int):
        raise TypeError(f"num_pools must be an int, got {type(num_pools).__name__}")
    if not 0 <= num_pools <= num_blocks:
        raise ValueError(
            f"num_pools must lie in [0, len(channels)] = [0, {num_blocks}], got {num_pools}"
        )
    return num_pools
