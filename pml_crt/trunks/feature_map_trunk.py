"""Torchvision backbones cut before global pooling, returning their last feature map.

PML's trainers and testers compute ``embedder(trunk(x))``; a CRT embedder
needs the trunk to keep the spatial layout, so these trunks return the
``(B, C, H, W)`` output of the last convolutional stage instead of pooled
features. The backbone is built by torchvision's own builder with its
``weights=`` argument, so pretrained weights are downloaded, cached in
``$TORCH_HOME/hub/checkpoints`` and hash-checked by torchvision's code.

===============  ================  ======  ===========================================
name             ``out_channels``  stride  blocks (``block_names``)
===============  ================  ======  ===========================================
``resnet18``     512               32      stem, layer1, layer2, layer3, layer4
``resnet34``     512               32      stem, layer1, layer2, layer3, layer4
``resnet50``     2048              32      stem, layer1, layer2, layer3, layer4
``resnet101``    2048              32      stem, layer1, layer2, layer3, layer4
``resnet152``    2048              32      stem, layer1, layer2, layer3, layer4
``googlenet``    1024              32      stem, inception3, inception4, inception5
``mobilenet_v2`` 1280              32      stage1 ... stage5, head
===============  ================  ======  ===========================================

The output side is ``ceil(H / 32)`` for the ResNets and MobileNetV2 and about
``H / 32`` for GoogLeNet (its max-pools use ``ceil_mode``); all give 7 at 224
and 2 at 64.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torchvision.models import WeightsEnum

__all__ = ["FeatureMapTrunk", "available_trunks", "feature_map_trunk"]


class _GoogLeNetInputTransform(torch.nn.Module):
    """GoogLeNet's ``transform_input``: ImageNet-normalised input -> the ported weights' range.

    ``(B, 3, H, W)`` -> ``(B, 3, H, W)``; the same arithmetic as
    ``torchvision.models.GoogLeNet._transform_input``.
    """

    def __init__(self) -> None:
        super().__init__()
        scale = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) / 0.5
        shift = (torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1) - 0.5) / 0.5
        # Constants, not state: a trunk's state_dict does not depend on transform_input.
        self.register_buffer("scale", scale, persistent=False)
        self.register_buffer("shift", shift, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


def _resnet_blocks(model: torch.nn.Module) -> tuple[OrderedDict[str, torch.nn.Module], int]:
    stem = torch.nn.Sequential(
        OrderedDict(
            conv1=model.conv1,
            bn1=model.bn1,
            relu=model.relu,
            maxpool=model.maxpool,
        )
    )
    blocks = OrderedDict(stem=stem)
    for name in ("layer1", "layer2", "layer3", "layer4"):
        blocks[name] = getattr(model, name)
    return blocks, model.fc.in_features


def _googlenet_blocks(model: torch.nn.Module) -> tuple[OrderedDict[str, torch.nn.Module], int]:
    stem: OrderedDict[str, torch.nn.Module] = OrderedDict()
    if model.transform_input:
        stem["transform_input"] = _GoogLeNetInputTransform()
    for name in ("conv1", "maxpool1", "conv2", "conv3", "maxpool2"):
        stem[name] = getattr(model, name)

    def group(names: tuple[str, ...]) -> torch.nn.Sequential:
        return torch.nn.Sequential(OrderedDict((name, getattr(model, name)) for name in names))

    blocks = OrderedDict(
        stem=torch.nn.Sequential(stem),
        inception3=group(("inception3a", "inception3b", "maxpool3")),
        inception4=group(
            ("inception4a", "inception4b", "inception4c", "inception4d", "inception4e", "maxpool4")
        ),
        inception5=group(("inception5a", "inception5b")),
    )
    return blocks, model.fc.in_features


# MobileNetV2 ``features`` indices per output stride: 2, 4, 8, 16, 32, then the 1x1 conv to 1280.
_MOBILENET_V2_STAGES = (
    ("stage1", range(0, 2)),
    ("stage2", range(2, 4)),
    ("stage3", range(4, 7)),
    ("stage4", range(7, 14)),
    ("stage5", range(14, 18)),
    ("head", range(18, 19)),
)


def _mobilenet_v2_blocks(model: torch.nn.Module) -> tuple[OrderedDict[str, torch.nn.Module], int]:
    features = model.features
    if len(features) != 19:
        raise ValueError(
            f"expected torchvision's MobileNetV2 with 19 feature layers, got {len(features)}"
        )
    blocks = OrderedDict(
        (
            name,
            torch.nn.Sequential(OrderedDict((str(i), features[i]) for i in indices)),
        )
        for name, indices in _MOBILENET_V2_STAGES
    )
    return blocks, model.last_channel


def _googlenet_kwargs(weights: object, kwargs: dict[str, Any]) -> dict[str, Any]:
    kwargs = dict(kwargs)
    if weights is None:
        # Without weights torchvision defaults to aux heads and warns about init_weights.
        kwargs.setdefault("aux_logits", False)
        kwargs.setdefault("init_weights", True)
    return kwargs


_BlockFn = Callable[[torch.nn.Module], tuple["OrderedDict[str, torch.nn.Module]", int]]
_KwargsFn = Callable[[object, dict[str, Any]], dict[str, Any]]

# name -> (split into blocks, adjust builder kwargs)
_REGISTRY: dict[str, tuple[_BlockFn, _KwargsFn | None]] = {
    "resnet18": (_resnet_blocks, None),
    "resnet34": (_resnet_blocks, None),
    "resnet50": (_resnet_blocks, None),
    "resnet101": (_resnet_blocks, None),
    "resnet152": (_resnet_blocks, None),
    "googlenet": (_googlenet_blocks, _googlenet_kwargs),
    "mobilenet_v2": (_mobilenet_v2_blocks, None),
}


def available_trunks() -> list[str]:
    """Names accepted by :class:`FeatureMapTrunk` and :func:`feature_map_trunk`."""
    return sorted(_REGISTRY)


class FeatureMapTrunk(torch.nn.Module):
    """A torchvision backbone that returns its last feature map.

    Shapes: input ``(B, 3, H, W)`` (ImageNet-normalised, as for the torchvision
    model); output ``(B, out_channels, H', W')`` with ``H' ~ H / 32``.

    Args:
        name: one of :func:`available_trunks`, e.g. ``"resnet50"``.
        weights: passed unchanged to torchvision's builder: ``None`` (random
            initialisation), a string such as ``"IMAGENET1K_V1"`` or
            ``"DEFAULT"``, or a ``WeightsEnum`` member. Torchvision downloads
            and caches the file under ``$TORCH_HOME/hub/checkpoints``.
        freeze_batchnorm: keep every BatchNorm layer in eval mode (running
            statistics are neither used from the batch nor updated) and set
            its affine parameters' ``requires_grad`` to False, also after
            ``.train()``.
        frozen_blocks: freeze the first blocks of ``block_names`` (their
            parameters get ``requires_grad=False`` and they stay in eval mode):
            an int count, or a block name meaning "up to and including this
            block". ``0`` freezes nothing.
        progress: show torchvision's download progress bar.
        model: an already-built torchvision model of architecture ``name``
            (e.g. with weights loaded from a local file), used instead of
            building one; ``weights`` must then be None.
        **builder_kwargs: extra keyword arguments for torchvision's builder.
            With weights, torchvision's GoogLeNet sets ``transform_input=True``
            (the trunk then re-normalises ImageNet-normalised input as the
            ported weights expect); pass ``transform_input=True`` to rebuild
            such a trunk without weights before loading its state_dict.

    Attributes:
        out_channels: ``C`` of the output map.
        stride: the output stride (32).
        block_names: the names of the blocks in ``body``, in order.
        weights: the resolved ``WeightsEnum`` member, or None; e.g.
            ``trunk.weights.transforms()`` gives torchvision's preprocessing.
    """

    stride = 32

    def __init__(
        self,
        name: str,
        weights: str | WeightsEnum | None = None,
        *,
        freeze_batchnorm: bool = False,
        frozen_blocks: int | str = 0,
        progress: bool = True,
        model: torch.nn.Module | None = None,
        **builder_kwargs: Any,
    ) -> None:
        super().__init__()
        if name not in _REGISTRY:
            raise ValueError(f"name must be one of {available_trunks()}, got {name!r}")
        split, adjust_kwargs = _REGISTRY[name]
        if model is None:
            if adjust_kwargs is not None:
                builder_kwargs = adjust_kwargs(weights, builder_kwargs)
            model = torchvision.models.get_model(
                name, weights=weights, progress=progress, **builder_kwargs
            )
            resolved = torchvision.models.get_model_weights(name).verify(weights)
        else:
            if weights is not None or builder_kwargs:
                raise ValueError("pass either model or weights/builder_kwargs, not both")
            resolved = None
        blocks, out_channels = split(model)

        self.name = name
        self.weights = resolved
        self.out_channels = int(out_channels)
        self.block_names: tuple[str, ...] = tuple(blocks)
        self.body = torch.nn.Sequential(blocks)
        self.freeze_batchnorm = bool(freeze_batchnorm)
        self.frozen_blocks = self._count_frozen_blocks(frozen_blocks)

        for block in self._frozen_modules():
            block.requires_grad_(False)
        if self.freeze_batchnorm:
            for module in self._batchnorm_modules():
                module.requires_grad_(False)
        self.train(self.training)

    def _count_frozen_blocks(self, frozen_blocks: int | str) -> int:
        if isinstance(frozen_blocks, str):
            if frozen_blocks not in self.block_names:
                raise ValueError(
                    f"frozen_blocks must be an int or one of {self.block_names}, "
                    f"got {frozen_blocks!r}"
                )
            return self.block_names.index(frozen_blocks) + 1
        if (
            not isinstance(frozen_blocks, int)
            or isinstance(frozen_blocks, bool)
            or not 0 <= frozen_blocks <= len(self.block_names)
        ):
            raise ValueError(
                f"frozen_blocks must be an int in [0, {len(self.block_names)}] or a block name, "
                f"got {frozen_blocks!r}"
            )
        return frozen_blocks

    def _frozen_modules(self) -> list[torch.nn.Module]:
        return [self.body[i] for i in range(self.frozen_blocks)]

    def _batchnorm_modules(self) -> list[torch.nn.Module]:
        return [m for m in self.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]

    def train(self, mode: bool = True) -> FeatureMapTrunk:
        """Set train/eval mode, keeping frozen blocks and (optionally) BatchNorm in eval mode."""
        super().train(mode)
        if mode:
            for block in self._frozen_modules():
                block.eval()
            if self.freeze_batchnorm:
                for module in self._batchnorm_modules():
                    module.eval()
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Compute the feature map.

        Args:
            x: ``(B, 3, H, W)`` images.

        Returns:
            ``(B, out_channels, H', W')``.
        """
        return self.body(x)

    def extra_repr(self) -> str:
        weights = None if self.weights is None else str(self.weights)
        return (
            f"name={self.name!r}, weights={weights}, out_channels={self.out_channels}, "
            f"freeze_batchnorm={self.freeze_batchnorm}, frozen_blocks={self.frozen_blocks}"
        )


def feature_map_trunk(
    name: str,
    weights: str | WeightsEnum | None = None,
    *,
    freeze_batchnorm: bool = False,
    frozen_blocks: int | str = 0,
    progress: bool = True,
    **builder_kwargs: Any,
) -> FeatureMapTrunk:
    """Build a :class:`FeatureMapTrunk`; see there for the arguments.

    Example::

        trunk = feature_map_trunk("mobilenet_v2", weights="IMAGENET1K_V1", freeze_batchnorm=True)
        embedder = pml_crt.models.CRT(trunk.out_channels, embedding_size=128)
    """
    return FeatureMapTrunk(
        name,
        weights,
        freeze_batchnorm=freeze_batchnorm,
        frozen_blocks=frozen_blocks,
        progress=progress,
        **builder_kwargs,
    )
