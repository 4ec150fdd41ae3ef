"""The heads whose cost the perf scripts measure, their input and their training step.

Every head of :data:`HEADS` maps a ``(B, C, H, W)`` feature map to ``(B, D)`` with the
projection width ``d = min(C, 512)``; :func:`feature_map` is a post-ReLU input that
requires a gradient, as when the trunk trains, and :func:`train_step` the forward +
backward that :mod:`benchmarks.perf.head_cost` and :mod:`benchmarks.perf.model_changes`
time.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from pml_crt.models import CRT, GlobalPoolEmbedder, MultiHeadCRT, NetVLAD

__all__ = ["HEADS", "build_head", "feature_map", "multihead_specs", "train_step"]

HEADS = ("avg", "gem", "netvlad", "crt", "crt_sum", "multihead")


def multihead_specs(K: int, D: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """The two heads of ``multihead`` at ``(K, D)``: ``(K, D)`` and ``(K // 2, D // 4)``."""
    return (K, D), (max(K // 2, 1), max(D // 4, 1))


def build_head(name: str, C: int, K: int, D: int) -> torch.nn.Module:
    """One head of :data:`HEADS` with default options (``d = min(C, 512)``)."""
    if name == "avg":
        return GlobalPoolEmbedder(C, D, pooling="avg")
    if name == "gem":
        return GlobalPoolEmbedder(C, D, pooling="gem")
    if name == "netvlad":
        return NetVLAD(C, D, K)
    if name == "crt":
        return CRT(C, D, K)
    if name == "crt_sum":
        return CRT(C, D, K, fusion="sum")
    if name == "multihead":
        return MultiHeadCRT(C, heads=multihead_specs(K, D))
    raise ValueError(f"unknown head {name!r}")


def feature_map(B: int, C: int, side: int, seed: int = 0) -> torch.Tensor:
    """A post-ReLU ``(B, C, side, side)`` feature map that requires a gradient."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(B, C, side, side, generator=generator).relu_().requires_grad_()


def train_step(head: torch.nn.Module, x: torch.Tensor) -> Callable[[], None]:
    """``head(x).sum().backward()`` with gradients reset to None first (as ``zero_grad``)."""
    params = [p for p in head.parameters() if p.requires_grad]

    def step() -> None:
        for p in params:
            p.grad = None
        x.grad = None
        head(x).sum().backward()

    return step
