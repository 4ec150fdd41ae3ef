"""Global pooling + one Linear: the MLRC embedder, a baseline beside CRT.

Musgrave et al. (ECCV 2020) embed with the trunk's globally average-pooled
features followed by one ``Linear(C, D)``. This module takes the same input as
:class:`~pml_crt.models.CRT` (a feature map or a token sequence), so the two can
be swapped on the same trunk. With ``embedding_size=None`` it is the pooling
alone (the frozen-trunk baseline).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.module_with_records import ModuleWithRecords

from ..utils.layout import feature_map_to_tokens
from ..utils.validation import check_choice, check_number, check_positive_int

Pooling = Literal["avg", "max", "gem"]


def _inverse_softplus(y: float) -> float:
    """``x`` such that ``softplus(x) = y`` for ``y > 0``, stable for large ``y``."""
    return y + math.log(-math.expm1(-y))


class GlobalPoolEmbedder(ModuleWithRecords):
    """Global pooling over positions, then an optional ``Linear(C, D)``.

    Shapes: input ``(B, C, H, W)`` or ``(B, N, C)`` (``N = H * W``); pooled
    ``(B, C)``; output ``(B, D)`` with ``D = embedding_size``, or ``D = C`` when
    ``embedding_size is None``.

    Pooling over the ``N`` positions of each channel:

    - ``"avg"``: ``mean_n x_n``;
    - ``"max"``: ``max_n x_n``;
    - ``"gem"`` (generalised mean, Radenovic et al., TPAMI 2018):
      ``(mean_n clamp(x_n, gem_eps) ** p) ** (1 / p)``. ``p`` is kept ``> 1``
      by the parametrisation ``p = 1 + softplus(raw_gem_p)``, so it can never
      reach the degenerate ``p <= 0`` region nor need a clamp that would kill
      its gradient; ``p -> 1`` gives average pooling of the clamped values and
      ``p -> inf`` max pooling.

    Args:
        in_channels: ``C``, the trunk's channel count.
        embedding_size: ``D``; ``None`` means no Linear (the pooled features
            are the embedding, ``D = C``).
        pooling: ``"avg"``, ``"max"`` or ``"gem"``.
        gem_p: initial GeM exponent, ``> 1``; only used with ``pooling="gem"``.
        learn_gem_p: learn ``p`` (a parameter) or keep it fixed (a buffer).
        gem_eps: lower clamp of the features before the power, ``> 0`` (GeM
            needs non-negative inputs, as after a ReLU).
        check_inputs: reject non-finite inputs (one reduction per forward).
    """

    def __init__(
        self,
        in_channels: int,
        embedding_size: int | None = 128,
        *,
        pooling: Pooling = "avg",
        gem_p: float = 3.0,
        learn_gem_p: bool = True,
        gem_eps: float = 1e-6,
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        if embedding_size is not None:
            check_positive_int(embedding_size, "embedding_size")
        check_choice(pooling, "pooling", ("avg", "max", "gem"))
        check_number(gem_p, "gem_p", greater_than=1.0)
        check_number(gem_eps, "gem_eps", greater_than=0.0)

        self.in_channels = in_channels
        self.embedding_size = in_channels if embedding_size is None else embedding_size
        self.pooling = pooling
        self.gem_eps = float(gem_eps)
        self.check_inputs = check_inputs

        if pooling == "gem":
            raw = torch.tensor(_inverse_softplus(float(gem_p) - 1.0))
            if learn_gem_p:
                self.raw_gem_p = torch.nn.Parameter(raw)
            else:
                self.register_buffer("raw_gem_p", raw)
        self.linear: torch.nn.Linear | None = (
            None if embedding_size is None else torch.nn.Linear(in_channels, embedding_size)
        )
        names = ["embedding_size"] + (["gem_p_value"] if pooling == "gem" else [])
        self.add_to_recordable_attributes(list_of_names=names, is_stat=False)

    @property
    def gem_p(self) -> torch.Tensor:
        """The current GeM exponent ``p = 1 + softplus(raw_gem_p)``, a scalar tensor ``> 1``."""
        if self.pooling != "gem":
            raise AttributeError(f"gem_p is only defined for pooling='gem', not {self.pooling!r}")
        return 1.0 + F.softplus(self.raw_gem_p)

    @property
    def gem_p_value(self) -> float:
        """``gem_p`` as a Python float (what record-keeper logs)."""
        return float(self.gem_p.detach())

    def pool(self, x: torch.Tensor) -> torch.Tensor:
        """Pool a feature map over its positions.

        Args:
            x: ``(B, C, H, W)`` or ``(B, N, C)``.

        Returns:
            ``(B, C)``.
        """
        # GeM's p is cast to the tokens: only the Linear needs a matching dtype.
        dtype = None if self.linear is None else self.linear.weight.dtype
        tokens = feature_map_to_tokens(x, self.in_channels, "x", self.check_inputs, dtype)
        if self.pooling == "avg":
            return tokens.mean(dim=1)
        if self.pooling == "max":
            return tokens.amax(dim=1)
        p = self.gem_p.to(tokens.dtype)
        # x ** p as exp(p * log x): two transcendental passes forward and none
        # backward (pow with a tensor exponent recomputes pow and log there).
        powered = torch.exp(p * torch.log(tokens.clamp(min=self.gem_eps)))
        return powered.mean(dim=1).pow(1.0 / p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a feature map.

        Args:
            x: ``(B, C, H, W)`` feature map or ``(B, N, C)`` token sequence,
                in the Linear's dtype (under ``torch.autocast`` float32, float16
                and bfloat16 mix; any other dtype raises ``TypeError`` naming
                both dtypes, the input is never cast). Without the Linear any
                floating dtype works, and the output has it.

        Returns:
            ``(B, embedding_size)`` embeddings (``(B, C)`` without a Linear);
            not normalised (PML's distances and testers normalise).
        """
        pooled = self.pool(x)
        if self.linear is None:
            return pooled
        return self.linear(pooled)

    def extra_repr(self) -> str:
        text = (
            f"in_channels={self.in_channels}, embedding_size={self.embedding_size}, "
            f"pooling={self.pooling!r}"
        )
        if self.pooling == "gem":
            text += f", gem_p={self.gem_p_value:.4g}, learn_gem_p={self.raw_gem_p.requires_grad}"
        return text
