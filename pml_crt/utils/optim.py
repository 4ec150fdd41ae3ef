"""Optimizer parameter groups that give each CRT fusion its own learning rate."""

from __future__ import annotations

from typing import Any

import torch

from .validation import check_number

__all__ = ["param_groups"]


def param_groups(model: torch.nn.Module, lr: float, **options: Any) -> list[dict[str, Any]]:
    """Parameter groups for a ``torch.optim`` optimizer, honouring ``fusion_lr_scale``.

    Every :class:`~pml_crt.models.CRT` in ``model`` (the module itself, the
    heads of a :class:`~pml_crt.models.MultiHeadCRT`, or one inside a larger
    model) whose ``fusion_lr_scale`` is not 1 (``scale_fusion_step=True``)
    gets its fusion's parameters in a group at ``lr * fusion_lr_scale``;
    every other parameter is in one group at ``lr``. ``options`` (for example
    ``weight_decay``) go into every group unchanged, so a coupled weight
    decay means the same for every layer. Parameters with
    ``requires_grad=False`` are left out, and so are empty groups::

        optimizer = torch.optim.Adam(param_groups(embedder, lr=1e-4), weight_decay=1e-4)

    With PML's trainers, pass that optimizer as ``optimizers["embedder_optimizer"]``.

    Args:
        model: any module.
        lr: the base learning rate (finite, ``> 0``).
        **options: per-group optimizer options, the same for every group.

    Returns:
        A list of ``{"params": [...], "lr": ..., **options}`` dicts, the base
        group first.
    """
    lr = check_number(lr, "lr", greater_than=0.0)
    scaled: dict[int, float] = {}  # id(parameter) -> learning-rate factor
    for module in model.modules():
        factor = getattr(module, "fusion_lr_scale", 1.0)
        if factor != 1.0:
            for parameter in module.fuse.parameters():
                scaled[id(parameter)] = factor
    groups: dict[float, list[torch.nn.Parameter]] = {1.0: []}
    for parameter in model.parameters():
        if parameter.requires_grad:
            groups.setdefault(scaled.get(id(parameter), 1.0), []).append(parameter)
    return [
        {"params": parameters, "lr": lr * factor, **options}
        for factor, parameters in groups.items()
        if parameters
    ]
