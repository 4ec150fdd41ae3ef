"""Several CRT heads, differing in prototypes and width, on one feature map."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import torch
from pytorch_metric_learning.utils.module_with_records import ModuleWithRecords

from ..utils.layout import feature_map_to_tokens
from ..utils.validation import check_choice
from .crt import CRT, GlobalPooling
from .input_projection import project_jointly

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

    Every head has a GeM branch by default (``global_pooling="gem"``): the
    input GeM-pooled and mapped by ``Linear(C, D_h)``, added to the fused coded
    residuals, whose fusion starts at zero. Training so starts from a GeM
    pooling head. Chosen by a grid over Adam head learning rates 1e-5, 1e-4
    and 1e-3 on Omniglot (7x7 map, trunk from scratch), CUB-200 and Cars196
    (224 px, ImageNet MobileNetV2), validation classes, 3 seeds: it was never
    significantly below a linear head, while without the branch the heads
    were below it at 1e-4 on CUB and collapsed at 1e-3.
    ``global_pooling=None`` gives the heads of pml-crt 0.1.0 (coded residuals
    only), which need a low rate (1e-5 with a pretrained trunk). GeM clamps
    its input at a small positive value, as suits a CNN's post-ReLU feature
    map; for inputs that can be negative (a ViT's tokens) pass
    ``global_pooling="avg"``.

    Args:
        in_channels: ``C`` of the ``(B, C, H, W)`` or ``(B, N, C)`` input.
        heads: one entry per head, either ``(num_prototypes, embedding_size)``
            or a dict of :class:`CRT` keyword arguments (which must include
            ``num_prototypes`` and ``embedding_size`` and may override
            ``crt_kwargs``). The first head is the primary one.
        eval_output: ``"primary"`` or ``"concat"``.
        global_pooling: every head's global branch, ``"gem"``, ``"avg"``,
            ``"max"`` or ``None`` (see :class:`CRT`); a head's dict may
            override it.
        **crt_kwargs: keyword options passed to every :class:`CRT` head.
    """

    def __init__(
        self,
        in_channels: int,
        heads: Sequence[HeadSpec] = ((64, 512), (32, 128)),
        *,
        eval_output: EvalOutput = "primary",
        global_pooling: GlobalPooling | None = "gem",
        **crt_kwargs: Any,
    ) -> None:
        super().__init__()
        check_choice(eval_output, "eval_output", ("primary", "concat"))
        if isinstance(heads, (str, bytes)) or not isinstance(heads, Sequence) or len(heads) == 0:
            raise ValueError(
                "heads must be a non-empty sequence of (num_prototypes, embedding_size) "
                f"pairs or dicts of CRT options, got {heads!r}"
            )
        shared = {"global_pooling": global_pooling, **crt_kwargs}
        self.heads = torch.nn.ModuleList(
            CRT(in_channels, **_head_kwargs(spec, i, shared)) for i, spec in enumerate(heads)
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

    def diversity_penalty(self) -> torch.Tensor:
        """The sum over heads of :meth:`CRT.diversity_penalty`; a differentiable scalar.

        Add ``weight * diversity_penalty()`` to the loss to diversify every
        head's prototypes.
        """
        return torch.stack([head.diversity_penalty() for head in self.heads]).sum()

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
        LayerNorm (:func:`~pml_crt.models.input_projection.project_jointly`);
        then each head runs ``embed(encode_projected(features), tokens)``. The result
        equals running every head on its own.

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
        features = project_jointly([head.projection for head in self.heads], tokens)
        return torch.cat(
            [
                head.embed(head.encode_projected(f), tokens)
                for head, f in zip(self.heads, features, strict=True)
            ],
            dim=1,
        )


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
