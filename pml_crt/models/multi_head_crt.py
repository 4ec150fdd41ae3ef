"""Several CRT heads, differing in prototypes and width, on one feature map."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.module_with_records import ModuleWithRecords

from ..utils.validation import check_choice, feature_map_to_tokens
from .crt import CRT

HeadSpec = tuple[int, int] | Mapping[str, Any]
EvalOutput = Literal["primary", "concat"]

_HEAD_RECORD = re.compile(r"^head(\d+)_(\w+)$")
_RECORDED_HEAD_ATTRIBUTES = ("num_prototypes", "embedding_size", "temperature_value")


class MultiHeadCRT(ModuleWithRecords):
    """Several :class:`CRT` heads, differing in prototypes ``K`` and width ``D``.

    In ``train()`` mode the forward returns the heads' embeddings concatenated
    on dim 1, ``(B, sum(embedding_sizes))``, for :class:`pml_crt.losses.MultiHeadLoss`
    to split. In ``eval()`` mode it returns the primary (first) head,
    ``(B, embedding_sizes[0])``, or with ``eval_output="concat"`` the
    concatenation, so a stock PML tester works unchanged.

    Args:
        in_channels: ``C`` of the ``(B, C, H, W)`` or ``(B, N, C)`` input.
        heads: one entry per head, either ``(num_prototypes, embedding_size)``
            or a dict of :class:`CRT` keyword arguments (which must include
            ``num_prototypes`` and ``embedding_size`` and may override
            ``crt_kwargs``). The first head is the primary one.
        eval_output: ``"primary"`` or ``"concat"``.
        **crt_kwargs: keyword options passed to every :class:`CRT` head.
    """

    def __init__(
        self,
        in_channels: int,
        heads: Sequence[HeadSpec] = ((64, 512), (32, 128)),
        *,
        eval_output: EvalOutput = "primary",
        **crt_kwargs: Any,
    ) -> None:
        super().__init__()
        check_choice(eval_output, "eval_output", ("primary", "concat"))
        if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence) or len(heads) == 0:
            raise ValueError(
                "heads must be a non-empty sequence of (num_prototypes, embedding_size) "
                f"pairs or dicts of CRT options, got {heads!r}"
            )
        self.heads = torch.nn.ModuleList(
            CRT(in_channels, **_head_kwargs(spec, i, crt_kwargs)) for i, spec in enumerate(heads)
        )
        self.in_channels = in_channels
        self.eval_output = eval_output
        self.num_heads = len(self.heads)
        self.add_to_recordable_attributes(
            list_of_names=["num_heads"]
            + [f"head{i}_{a}" for i in range(self.num_heads) for a in _RECORDED_HEAD_ATTRIBUTES],
            is_stat=False,
        )

    @property
    def embedding_sizes(self) -> list[int]:
        """The width ``D_h`` of every head, in concatenation order."""
        return [head.embedding_size for head in self.heads]

    @property
    def embedding_size(self) -> int:
        """Width of the forward output in the current mode."""
        if self.training or self.eval_output == "concat":
            return sum(self.embedding_sizes)
        return self.embedding_sizes[0]

    def __getattr__(self, name: str) -> Any:
        """``head{i}_{attribute}`` (the recorded head attributes), else ``Module``'s lookup.

        Raises ``AttributeError`` for a head index past the last head, so that
        ``hasattr`` and ``getattr(module, name, default)`` work.
        """
        match = _HEAD_RECORD.match(name)
        if match and match.group(2) in _RECORDED_HEAD_ATTRIBUTES:
            heads = self.heads
            index = int(match.group(1))
            if index >= len(heads):
                raise AttributeError(
                    f"{type(self).__name__} has no attribute {name!r}: it has {len(heads)} "
                    f"heads (head0 to head{len(heads) - 1})"
                )
            return getattr(heads[index], match.group(2))
        return super().__getattr__(name)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a feature map with every head.

        The heads share the work that does not depend on their parameters: the
        input is checked and flattened to tokens once, and the heads' input
        projections (``Linear(C, d_h)``) run as one matrix product with the
        weights stacked, ``(B*N, C) @ (C, sum_h d_h)``, before each head's
        LayerNorm. The result equals running every head on its own.

        Args:
            x: ``(B, C, H, W)`` feature map or ``(B, N, C)`` token sequence,
                in the dtype of the module's parameters; under ``torch.autocast``
                float32, float16 and bfloat16 mix. Any other dtype raises
                ``TypeError`` naming both dtypes: the input is never cast.

        Returns:
            ``(B, sum(embedding_sizes))`` in training mode or with
            ``eval_output="concat"``; ``(B, embedding_sizes[0])`` otherwise.
        """
        if not self.training and self.eval_output == "primary":
            return self.heads[0](x)
        check = any(head.check_inputs for head in self.heads)
        dtype = self.heads[0].prototypes.dtype  # module.to(dtype) converts every head
        tokens = feature_map_to_tokens(x, self.in_channels, "x", check, dtype)
        features = _project_all(self.heads, tokens)
        return torch.cat(
            [head._embed(head._code(f)) for head, f in zip(self.heads, features, strict=True)],
            dim=1,
        )


def _stackable(projection: torch.nn.Module) -> bool:
    """Whether a CRT input projection is ``Sequential(Linear with bias, norm)``."""
    return (
        isinstance(projection, torch.nn.Sequential)
        and len(projection) == 2
        and isinstance(projection[0], torch.nn.Linear)
        and projection[0].bias is not None
    )


def _project_all(heads: Sequence[CRT], tokens: torch.Tensor) -> list[torch.Tensor]:
    """Every head's projected features ``(B, N, d_h)``, one GEMM for all Linear projections."""
    stacked = [i for i, head in enumerate(heads) if _stackable(head.projection)]
    if len(stacked) < 2:
        return [head.projection(tokens) for head in heads]
    features = [None if i in stacked else head.projection(tokens) for i, head in enumerate(heads)]
    linears = [heads[i].projection[0] for i in stacked]
    weight = torch.cat([linear.weight for linear in linears])  # (sum_h d_h, C)
    bias = torch.cat([linear.bias for linear in linears])
    chunks = F.linear(tokens, weight, bias).split([lin.out_features for lin in linears], dim=-1)
    for i, chunk in zip(stacked, chunks, strict=True):
        features[i] = heads[i].projection[1](chunk)
    return features


def _head_kwargs(spec: HeadSpec, index: int, shared: Mapping[str, Any]) -> dict[str, Any]:
    if isinstance(spec, Mapping):
        kwargs = {**shared, **spec}
        missing = {"num_prototypes", "embedding_size"} - kwargs.keys()
        if missing:
            raise ValueError(f"heads[{index}] is missing {sorted(missing)}")
        return kwargs
    if (
        isinstance(spec, Sequence)
        and len(spec) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in spec)
    ):
        return {**shared, "num_prototypes": spec[0], "embedding_size": spec[1]}
    raise ValueError(
        f"heads[{index}] must be a (num_prototypes, embedding_size) pair of ints or a "
        f"dict of CRT options, got {spec!r}"
    )
