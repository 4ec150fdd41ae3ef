"""Paired comparisons, seed by seed: variant minus base with a 95% CI, and its verdict.

:func:`seed_table` (or :func:`read_separate_rows` for a published CSV) arranges the
runner's rows as ``{method: {seed: {metric: value}}}``; :func:`paired_differences`
pairs methods over their shared seeds and gives the mean difference of P@1 and MAP@R
with its 95% Student-t CI half-width; :func:`verdict` calls a difference better or
worse only when the whole interval lies on one side of zero. The ablation reports,
the README's verdicts, the defaults grid and the MLRC table all compare this way.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pml_crt.utils.stats import mean_ci95

__all__ = [
    "METRICS",
    "difference_text",
    "paired_differences",
    "read_separate_rows",
    "seed_table",
    "verdict",
]

METRICS = {"precision_at_1": "P@1", "mean_average_precision_at_r": "MAP@R"}


def seed_table(
    rows: Iterable[Mapping[str, Any]],
    evaluation: str = "separate",
    metrics: Iterable[str] = tuple(METRICS),
) -> dict[str, dict[int, dict[str, float]]]:
    """``{method: {seed: {metric: value}}}`` of the runner's rows of one ``evaluation``."""
    table: dict[str, dict[int, dict[str, float]]] = {}
    for row in rows:
        if row["evaluation"] == evaluation:
            values = {m: float(row[m]) for m in metrics}
            table.setdefault(row["method"], {})[int(row["seed"])] = values
    return table


def read_separate_rows(path: Path) -> dict[str, dict[int, dict[str, float]]]:
    """:func:`seed_table` of the runner's published CSV ("separate" rows)."""
    with open(path, newline="") as f:
        return seed_table(csv.DictReader(f))


def paired_differences(
    table: dict[str, dict[int, dict[str, float]]],
    base: str | None = None,
    pairs: Sequence[tuple[str, str]] | None = None,
) -> list[dict[str, object]]:
    """Mean and 95% CI half-width of ``variant - base`` over the shared seeds, per pair.

    Either ``base`` (every other method is a variant of it) or explicit
    ``(variant, base)`` ``pairs``, e.g. one candidate and its base at each
    learning rate of a sweep.
    """
    if (base is None) == (pairs is None):
        raise ValueError("pass base or pairs, not both")
    if pairs is None:
        pairs = [(method, base) for method in table if method != base]
    missing = sorted({name for pair in pairs for name in pair} - set(table))
    if missing:
        kind = "base method" if base is not None else "methods"
        raise ValueError(
            f"{kind} {', '.join(map(repr, missing))} not in the results ({sorted(table)})"
        )
    out = []
    for method, reference in pairs:
        seeds = table[method]
        shared = sorted(set(seeds) & set(table[reference]))
        if not shared:
            raise ValueError(f"{method!r} shares no seed with {reference!r}")
        entry: dict[str, object] = {"method": method, "base": reference, "seeds": shared}
        for metric in METRICS:
            diffs = [seeds[s][metric] - table[reference][s][metric] for s in shared]
            entry[metric] = mean_ci95(diffs)
        out.append(entry)
    return out


def difference_text(mean: float, half: float) -> str:
    """A paired difference in percentage points: ``+1.23 ± 0.45``, or ``+1.23`` (one seed)."""
    if math.isnan(half):
        return f"{100 * mean:+.2f}"
    return f"{100 * mean:+.2f} ± {100 * half:.2f}"


def verdict(mean: float, half: float) -> str:
    """``better`` / ``worse`` when the CI excludes zero, else ``no difference``."""
    if math.isnan(half):
        return "one seed: no verdict"
    if mean - half > 0:
        return "better"
    if mean + half < 0:
        return "worse"
    return "no difference"
