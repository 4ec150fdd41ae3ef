"""Helpers for tests of whole models that contain CRT heads."""

from __future__ import annotations

import torch

from pml_crt.models import CRT


def live_fusion(module: torch.nn.Module) -> torch.nn.Module:
    """Re-initialise the fusion of every CRT head in ``module`` that has a global branch.

    With a global branch (``CRT``'s default) the fusion starts at zero, so the coded
    residuals reach neither the output nor any gradient at initialisation, and a test of
    the whole model would check the pooling branch only. With a Linear's initialisation
    (global generator) both paths are checked. Returns ``module``.
    """
    with torch.no_grad():
        for head in module.modules():
            if isinstance(head, CRT) and head.global_branch is not None:
                head.fuse.reset_parameters()
    return module
