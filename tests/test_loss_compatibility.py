"""Every loss exported by pytorch_metric_learning.losses trains MultiHeadCRT via MultiHeadLoss.

The exported classes are enumerated with ``inspect``, so a loss added by a new
PML release fails ``test_every_exported_loss_is_run_or_listed`` until it is
added to ``CASES`` (run) or ``NOT_RUN`` (with the reason).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses

from pml_crt.losses import MultiHeadLoss, SimilarityConsistencyLoss
from pml_crt.models import MultiHeadCRT

NUM_CLASSES = 4
PER_CLASS = 4


@dataclass(frozen=True)
class Case:
    """How to build the per-head loss and what to feed MultiHeadLoss.

    ``build`` returns what ``MultiHeadLoss(loss=...)`` takes: an instance without
    parameters or a factory ``embedding_size -> loss``. ``inputs`` is
    ``"labels"`` (embeddings + class labels), ``"views"`` (embeddings of two
    augmented views as ``embeddings`` and ``ref_emb``, no labels) or
    ``"unlabelled"`` (embeddings only).
    """

    build: Callable[[], Any]
    inputs: str = "labels"


def _factory(cls: type, **kwargs: Any) -> Callable[[], Callable[[int], torch.nn.Module]]:
    """A case builder returning ``embedding_size -> cls(num_classes, embedding_size)``."""
    return lambda: lambda size: cls(num_classes=NUM_CLASSES, embedding_size=size, **kwargs)


CASES: dict[str, Case] = {
    # Parameter-free losses: one instance, deep-copied per head.
    "AngularLoss": Case(pml_losses.AngularLoss),
    "CircleLoss": Case(pml_losses.CircleLoss),
    "ContrastiveLoss": Case(pml_losses.ContrastiveLoss),
    "DynamicSoftMarginLoss": Case(pml_losses.DynamicSoftMarginLoss),
    "FastAPLoss": Case(pml_losses.FastAPLoss),
    "GeneralizedLiftedStructureLoss": Case(pml_losses.GeneralizedLiftedStructureLoss),
    "HistogramLoss": Case(pml_losses.HistogramLoss),
    "InstanceLoss": Case(pml_losses.InstanceLoss),
    "IntraPairVarianceLoss": Case(pml_losses.IntraPairVarianceLoss),
    "LiftedStructureLoss": Case(pml_losses.LiftedStructureLoss),
    "MarginLoss": Case(pml_losses.MarginLoss),
    "MultiSimilarityLoss": Case(pml_losses.MultiSimilarityLoss),
    "NCALoss": Case(pml_losses.NCALoss),
    "NPairsLoss": Case(pml_losses.NPairsLoss),
    "NTXentLoss": Case(pml_losses.NTXentLoss),
    "PNPLoss": Case(pml_losses.PNPLoss),
    "RankedListLoss": Case(lambda: pml_losses.RankedListLoss(margin=0.4, Tn=1.0)),
    "SignalToNoiseRatioContrastiveLoss": Case(pml_losses.SignalToNoiseRatioContrastiveLoss),
    "SmoothAPLoss": Case(pml_losses.SmoothAPLoss),  # needs equal class counts: 4 x 4
    "SupConLoss": Case(pml_losses.SupConLoss),
    "ThresholdConsistentMarginLoss": Case(pml_losses.ThresholdConsistentMarginLoss),
    "TripletMarginLoss": Case(pml_losses.TripletMarginLoss),
    "TupletMarginLoss": Case(pml_losses.TupletMarginLoss),
    # Losses whose parameters depend on the embedding size: a factory per head.
    "ArcFaceLoss": Case(_factory(pml_losses.ArcFaceLoss)),
    "CosFaceLoss": Case(_factory(pml_losses.CosFaceLoss)),
    "LargeMarginSoftmaxLoss": Case(_factory(pml_losses.LargeMarginSoftmaxLoss)),
    "NormalizedSoftmaxLoss": Case(_factory(pml_losses.NormalizedSoftmaxLoss)),
    "ProxyAnchorLoss": Case(_factory(pml_losses.ProxyAnchorLoss)),
    "ProxyNCALoss": Case(_factory(pml_losses.ProxyNCALoss)),
    "SoftTripleLoss": Case(_factory(pml_losses.SoftTripleLoss, centers_per_class=2)),
    "SphereFaceLoss": Case(_factory(pml_losses.SphereFaceLoss)),
    "SubCenterArcFaceLoss": Case(_factory(pml_losses.SubCenterArcFaceLoss, sub_centers=2)),
    "P2SGradLoss": Case(
        lambda: lambda size: pml_losses.P2SGradLoss(descriptors_dim=size, num_classes=NUM_CLASSES)
    ),
    # Label-free: proxies per head, no labels (it rejects them).
    "ManifoldLoss": Case(lambda: lambda size: pml_losses.ManifoldLoss(l=size, K=4), "unlabelled"),
    # Two views as embeddings / ref_emb, no labels.
    "VICRegLoss": Case(pml_losses.VICRegLoss, "views"),
    "SelfSupervisedLoss": Case(
        lambda: pml_losses.SelfSupervisedLoss(pml_losses.NTXentLoss()), "views"
    ),
    # Wrappers that work per head.
    "MultipleLosses": Case(
        lambda: pml_losses.MultipleLosses(
            [pml_losses.ContrastiveLoss(), pml_losses.MultiSimilarityLoss()], weights=[1.0, 0.5]
        )
    ),
    "CrossBatchMemory": Case(
        lambda: (
            lambda size: pml_losses.CrossBatchMemory(
                pml_losses.ContrastiveLoss(), size, memory_size=32
            )
        )
    ),
}

NOT_RUN: dict[str, str] = {
    "BaseMetricLossFunction": "abstract base class: compute_loss raises NotImplementedError",
    "BaseLossWrapper": "abstract base class of the wrappers (supported_losses not implemented)",
    "GenericPairLoss": "abstract base class of the pair losses (needs a mat_based_loss)",
    "EmbeddingRegularizerMixin": "mixin that adds embedding_regularizer to losses, not a loss",
    "WeightRegularizerMixin": "mixin that adds weight_regularizer to losses, not a loss",
}


def _exported_classes() -> set[str]:
    return {
        name
        for name, cls in inspect.getmembers(pml_losses, inspect.isclass)
        if cls.__module__.startswith("pytorch_metric_learning.")
    }


def test_every_exported_loss_is_run_or_listed():
    exported = _exported_classes()
    assert not set(CASES) & set(NOT_RUN)
    assert exported - set(CASES) - set(NOT_RUN) == set(), "new PML loss: add it to CASES"
    assert set(CASES) | set(NOT_RUN) <= exported, "stale entry in CASES or NOT_RUN"


@pytest.mark.parametrize("name", sorted(CASES))
def test_one_training_step(name):
    torch.manual_seed(0)
    case = CASES[name]
    model = MultiHeadCRT(in_channels=16, heads=[(8, 32), (4, 16)])
    # consistency_weight=0: any parameter update must come from the PML loss itself.
    loss = MultiHeadLoss(
        case.build(), model.embedding_sizes, consistency_weight=0, collect_stats=True
    )
    with_consistency = MultiHeadLoss(case.build(), model.embedding_sizes, collect_stats=True)
    parameters = list(model.parameters()) + list(loss.parameters())
    before = [p.detach().clone() for p in parameters]
    optimizer = torch.optim.SGD(parameters, lr=0.05)

    features = torch.randn(NUM_CLASSES * PER_CLASS, 16, 4, 4)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    embeddings = model(features)
    if case.inputs == "labels":
        inputs: dict[str, Any] = {"labels": labels}
    elif case.inputs == "views":
        inputs = {"ref_emb": model(features + 0.1 * torch.randn_like(features))}
    else:
        inputs = {}
    value = loss(embeddings, **inputs)
    assert value.dim() == 0 and torch.isfinite(value), f"{name}: {value}"
    assert math.isfinite(loss.head0_loss) and math.isfinite(loss.head1_loss)
    total = with_consistency(embeddings, **inputs)
    assert torch.isfinite(total)
    # The recorded term is the consistency of these embeddings (against ref_emb if given).
    consistency = SimilarityConsistencyLoss(model.embedding_sizes)
    expected = consistency(embeddings, ref_emb=inputs.get("ref_emb"))
    assert with_consistency.consistency_loss == pytest.approx(expected.item(), rel=1e-6)

    optimizer.zero_grad()
    value.backward()
    optimizer.step()
    changed = [not torch.equal(b, p.detach()) for b, p in zip(before, parameters, strict=True)]
    assert any(changed), f"{name}: no parameter changed after one step"
