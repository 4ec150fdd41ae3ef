"""How far a head's embeddings move under a few Adam steps, by learning rate and parameter group.

    python -m benchmarks.adam_step_size [--seeds 0 1 2 3 4] [--lrs 1e-5 1e-4 1e-3 1e-2]
        [--steps 5] [--channels 1280] [--out benchmarks/results/adam_step_size.md]

Why a head's useful learning rates lie where they do: each head starts from its
initialisation, takes ``steps`` Adam steps of PML's Multi-Similarity loss on one
fixed batch with only one group of its parameters trained, and the script
reports how far the L2-normalised embeddings of that batch moved, as the mean
cosine distance ``1 - cos(e_before, e_after)`` (0: unchanged; 1: orthogonal),
mean ± 95% CI over seeds (each seed draws new data and a new initialisation).

The batch is synthetic but shaped like MobileNetV2's last map at 224 px:
``B = 32`` images of 8 classes, ``(C, 7, 7)`` maps, each
``ReLU(class mean + noise)``, so it shows the mechanism and not an accuracy.
Heads: a linear head (``GlobalPoolEmbedder``, avg, 128-d), ``CRT(C, 128, 32)``
and ``MultiHeadCRT()``'s primary head ``CRT(C, 512, 64)``, each with the plain
``"flatten"`` fusion, with ``scale_fusion_step=True`` (the optimizer built
from :func:`pml_crt.utils.param_groups`, as for every head) and with ``"sum"``
fusion. Groups: ``all``; ``fuse`` (the fusion); ``projection`` (Linear +
LayerNorm); ``prototypes`` (the prototypes and the temperature). The CRT heads
are coded residuals only (``global_pooling=None``), the heads this diagnostic
is about: with a global branch their fusion starts at zero, and the
``projection`` and ``prototypes`` groups would get no gradient.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_metric_learning.losses import MultiSimilarityLoss

from benchmarks.perf.common import coded_residual_heads_only
from benchmarks.protocol.layout import write_atomic
from benchmarks.reports.markdown import markdown_table
from pml_crt.models import CRT, GlobalPoolEmbedder
from pml_crt.utils import param_groups
from pml_crt.utils.stats import mean_ci95

__all__ = ["HEADS", "GROUPS", "cosine_drift", "main", "measure", "synthetic_batch"]

BATCH, CLASSES, SIDE = 32, 8, 7
CODED = coded_residual_heads_only(CRT)  # see the module docstring
SCALED = {"scale_fusion_step": True, **CODED}

HEADS: dict[str, Callable[[int], torch.nn.Module]] = {
    "linear (avg pool + Linear)": lambda c: GlobalPoolEmbedder(c, 128, pooling="avg"),
    "CRT(C, 128, 32)": lambda c: CRT(c, 128, 32, **CODED),
    "CRT(C, 128, 32), scale_fusion_step": lambda c: CRT(c, 128, 32, **SCALED),
    'CRT(C, 128, 32), fusion="sum"': lambda c: CRT(c, 128, 32, fusion="sum", **CODED),
    "CRT(C, 512, 64) (MultiHeadCRT() head 0)": lambda c: CRT(c, 512, 64, **CODED),
    "CRT(C, 512, 64), scale_fusion_step": lambda c: CRT(c, 512, 64, **SCALED),
}

GROUPS: dict[str, tuple[str, ...] | None] = {
    "all": None,
    "fuse": ("fuse.",),
    "projection": ("projection.",),
    "prototypes": ("prototypes", "raw_temperature"),
}


def synthetic_batch(channels: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``(B, C, 7, 7)`` maps ``ReLU(class mean + noise)`` of 8 classes, and ``(B,)`` labels."""
    means = torch.randn(CLASSES, channels, SIDE, SIDE, generator=generator)
    labels = torch.arange(BATCH) % CLASSES
    noise = torch.randn(BATCH, channels, SIDE, SIDE, generator=generator)
    return torch.relu(means[labels] + noise), labels


def _train_only(head: torch.nn.Module, prefixes: tuple[str, ...] | None) -> bool:
    """Freeze every parameter of ``head`` outside ``prefixes``; ``False`` if none is left."""
    for name, parameter in head.named_parameters():
        parameter.requires_grad_(prefixes is None or name.startswith(prefixes))
    return any(parameter.requires_grad for parameter in head.parameters())


def cosine_drift(
    head: torch.nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    lr: float,
    steps: int,
) -> float:
    """Mean ``1 - cos`` between ``head``'s embeddings before and after ``steps`` Adam steps.

    Adam trains the parameters that require grad, in :func:`pml_crt.utils.param_groups`.
    """
    loss_fn = MultiSimilarityLoss()
    optimizer = torch.optim.Adam(param_groups(head, lr=lr))
    with torch.no_grad():
        before = F.normalize(head(features), dim=1)
    for _ in range(steps):
        optimizer.zero_grad()
        loss_fn(head(features), labels).backward()
        optimizer.step()
    with torch.no_grad():
        after = F.normalize(head(features), dim=1)
    return float(1 - (before * after).sum(dim=1).mean())


def measure(
    seeds: Sequence[int],
    lrs: Sequence[float],
    steps: int,
    channels: int,
    heads: Mapping[str, Callable[[int], torch.nn.Module]] = HEADS,
) -> dict[tuple[str, str, float], list[float]]:
    """``(head, group, lr) ->`` the per-seed cosine drifts (groups a head lacks are skipped)."""
    drifts: dict[tuple[str, str, float], list[float]] = {}
    for seed in seeds:
        features, labels = synthetic_batch(channels, torch.Generator().manual_seed(seed))
        for name, build in heads.items():
            for group, prefixes in GROUPS.items():
                for lr in lrs:
                    torch.manual_seed(seed)
                    head = build(channels)
                    if not _train_only(head, prefixes):
                        continue
                    drift = cosine_drift(head, features, labels, lr, steps)
                    drifts.setdefault((name, group, lr), []).append(drift)
    return drifts


def markdown(
    drifts: Mapping[tuple[str, str, float], list[float]],
    lrs: Sequence[float],
    seeds: Sequence[int],
    steps: int,
    channels: int,
    command: str,
) -> str:
    """One row per (head, trained group), one column per learning rate."""
    header = ["head", "trained"] + [f"lr {lr:g}" for lr in lrs]
    rows = dict.fromkeys((name, group) for name, group, _ in drifts)
    body = [
        [name, group, *(_mean_ci_significant(drifts[(name, group, lr)]) for lr in lrs)]
        for name, group in rows
    ]
    lines = [
        f"## Embedding drift after {steps} Adam steps (C = {channels}, 7x7 maps)",
        "",
        markdown_table(header, body),
        "",
        f"Mean cosine distance `1 - cos(e_before, e_after)` of the batch's L2-normalised "
        f"embeddings, mean ± 95% CI over seeds {list(seeds)}; a synthetic class-structured "
        "batch (32 images, 8 classes), Multi-Similarity loss, only the named group trained. "
        "A mechanism check, not an accuracy: read it beside the validation sweeps "
        "(`*_lr_sweep_by_lr.md`).",
        f"Command: `{command}`; {torch.get_num_threads()} torch threads.",
    ]
    return "\n".join(lines) + "\n"


def _mean_ci_significant(values: Sequence[float]) -> str:
    """``"mean ± half"`` with two significant digits (drifts span 1e-6 to 1)."""
    mean, half = mean_ci95(values)
    return f"{mean:.2g}" if half != half else f"{mean:.2g} ± {half:.1g}"


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.adam_step_size", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-5, 1e-4, 1e-3, 1e-2])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--channels", type=int, default=1280)
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.adam_step_size " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    drifts = measure(args.seeds, args.lrs, args.steps, args.channels)
    text = markdown(drifts, args.lrs, args.seeds, args.steps, args.channels, command)
    if args.out is not None:
        write_atomic(args.out, text)
    print(text)
    return text
