"""What a unit reports: on which classes, with which calculator, which values.

:func:`report_split` says whether the results are on the test or the validation
classes (``eval.split``), :func:`make_calculator` is the ``AccuracyCalculator`` of
``eval.metrics`` (Recall@K included, exact k-NN up to the largest class) and
:func:`metric_values` reads the configured metrics out of PML's accuracies. A unit
(:mod:`~benchmarks.protocol.unit`) and the combined results
(:mod:`~benchmarks.protocol.results`) use the same three.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from pml_crt.utils import make_accuracy_calculator

from .config import ConfigError
from .metrics import BenchmarkAccuracyCalculator

__all__ = ["make_calculator", "metric_values", "report_split"]


def metric_values(accuracies: Mapping[str, Any], names: Sequence[str]) -> dict[str, float]:
    """The values of ``names`` among PML's ``accuracies`` (``<name>_level0`` or ``<name>``)."""
    out = {}
    for name in names:
        for key in (f"{name}_level0", name):
            if key in accuracies:
                value = accuracies[key]  # sqlite hands a stored NaN back as None
                out[name] = float("nan") if value is None else float(value)
                break
    return out


def make_calculator(config: Mapping[str, Any]) -> BenchmarkAccuracyCalculator:
    return make_accuracy_calculator(
        include=tuple(config["eval"]["metrics"]),
        k="max_bin_count",
        prefer_faiss=bool(config["eval"].get("prefer_faiss", True)),
        calculator_class=BenchmarkAccuracyCalculator,
    )


def report_split(config: Mapping[str, Any]) -> str:
    """``"test"`` or ``"val"``: which classes the results and tables report."""
    split = config["eval"].get("split", "test")
    if split not in ("test", "val"):
        raise ConfigError(f"eval.split must be 'test' or 'val', got {split!r}")
    return split
