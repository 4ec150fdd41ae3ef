"""Paired comparison of variants with a base method, seed by seed.

Reads the per-seed rows that ``python -m benchmarks.run --publish DIR`` wrote to
``DIR/<config>.csv`` (validation classes for a config with ``eval.split: val``, the
default for ablations; ``--classes test`` for a comparison), pairs every method with
the base method seed by seed, and writes a markdown table of the mean paired
difference with its 95% Student-t CI. A variant counts as better (worse) only
when the whole interval lies above (below) zero.

    python -m benchmarks.ablation_report benchmarks/results/omniglot_ablation.csv \
        --base base --out benchmarks/results/omniglot_ablation_paired.md
    python -m benchmarks.ablation_report benchmarks/results/cub_compare.csv \
        --base multihead_crt --classes test --out benchmarks/results/cub_compare_paired.md
    python -m benchmarks.ablation_report DIR/<name>_lr_sweep.csv \
        --pairs a_lr1e-04:b_lr1e-04 a_lr1e-03:b_lr1e-03 --out ...
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from pml_crt.utils.stats import mean_ci95

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


def verdict(mean: float, half: float) -> str:
    """``better`` / ``worse`` when the CI excludes zero, else ``no difference``."""
    if math.isnan(half):
        return "one seed: no verdict"
    if mean - half > 0:
        return "better"
    if mean + half < 0:
        return "worse"
    return "no difference"


def markdown(
    rows: Sequence[dict[str, object]],
    base: str,
    source: Path,
    command: str,
    classes: str = "validation",
) -> str:
    """The table of :func:`paired_differences`' rows; ``base`` ``None`` adds a base column."""
    header = ["variant"] + ([] if base else ["base"])
    header += [f"Δ{label} (pts)" for label in METRICS.values()] + ["MAP@R verdict"]
    title = f"from `{base}` " if base else ""
    lines = [
        f"## Paired differences {title}({classes} classes)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [str(row["method"])] + ([] if base else [str(row["base"])])
        for metric in METRICS:
            mean, half = row[metric]
            cells.append(
                f"{100 * mean:+.2f}"
                if math.isnan(half)
                else f"{100 * mean:+.2f} ± {100 * half:.2f}"
            )
        cells.append(verdict(*row["mean_average_precision_at_r"]))
        lines.append("| " + " | ".join(cells) + " |")
    seeds = sorted({s for row in rows for s in row["seeds"]})
    lines += [
        "",
        f"Percentage points, variant minus `{base or 'its base'}`, paired by seed (seeds {seeds}); "
        "mean ± 95% Student-t CI of the per-seed differences. A verdict needs the whole "
        "interval on one side of zero.",
        f"Source: `{source}`. Produced by `{command}`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablation_report")
    parser.add_argument("csv", type=Path, help="DIR/<config>.csv written by --publish")
    parser.add_argument("--base", default=None, help="the method every variant is paired with")
    parser.add_argument(
        "--pairs",
        nargs="+",
        default=None,
        metavar="VARIANT:BASE",
        help="explicit pairs instead of --base (e.g. one per learning rate of a sweep)",
    )
    parser.add_argument("--out", type=Path, default=None, help="write the markdown here")
    parser.add_argument(
        "--classes",
        choices=("validation", "test"),
        default="validation",
        help="which classes the CSV's results are on (eval.split of its config)",
    )
    args = parser.parse_args(argv)
    command = "python -m benchmarks.ablation_report " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    pairs = None if args.pairs is None else [_pair(text) for text in args.pairs]
    base = "base" if args.base is None and pairs is None else args.base
    rows = paired_differences(read_separate_rows(args.csv), base, pairs)
    text = markdown(rows, base, args.csv, command, args.classes)
    if args.out is not None:
        args.out.write_text(text)
    print(text)
    return text


def _pair(text: str) -> tuple[str, str]:
    """``"variant:base"`` -> ``("variant", "base")``."""
    variant, sep, base = text.partition(":")
    if not (sep and variant and base):
        raise SystemExit(f"--pairs takes VARIANT:BASE, got {text!r}")
    return variant, base
