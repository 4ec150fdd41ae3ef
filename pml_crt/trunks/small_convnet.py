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
    e.g. 28 -> 3, 64 -> 8).

    Args:
        in_channels: input channels (1 for Omniglot's grayscale images).
        channels: output channels of each block; the number of blocks is
            ``len(channels)``.
        pool_last: max-pool after the last block too (``stride`` is then
            ``2 ** len(channels)``, otherwise ``2 ** (len(channels) - 1)``).
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
        pool_last: bool = True,
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

        blocks = []
        previous = in_channels
        for i, c in enumerate(channels):
            layers: list[torch.nn.Module] = [
                torch.nn.Conv2d(previous, c, kernel_size, padding=kernel_size // 2, bias=False),
                torch.nn.BatchNorm2d(c),
                torch.nn.ReLU(inplace=True),
            ]
            if pool_last or i < len(channels) - 1:
                layers.append(torch.nn.MaxPool2d(2))
            blocks.append(torch.nn.Sequential(*layers))
            previous = c
        self.blocks = torch.nn.Sequential(*blocks)
        self.in_channels = in_channels
        self.channels = channels
        self.pool_last = pool_last
        self.out_channels = channels[-1]
        self.stride = 2 ** (len(channels) if pool_last else len(channels) - 1)
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
            f"pool_last={self.pool_last}, out_channels={self.out_channels}"
        )
