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
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from pml_crt.utils.stats import mean_ci95

METRICS = {"precision_at_1": "P@1", "mean_average_precision_at_r": "MAP@R"}


def read_separate_rows(path: Path) -> dict[str, dict[int, dict[str, float]]]:
    """``{method: {seed: {metric: value}}}`` from the runner's CSV ("separate" rows)."""
    table: dict[str, dict[int, dict[str, float]]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            if row["evaluation"] != "separate":
                continue
            values = {m: float(row[m]) for m in METRICS}
            table.setdefault(row["method"], {})[int(row["seed"])] = values
    return table


def paired_differences(
    table: dict[str, dict[int, dict[str, float]]], base: str
) -> list[dict[str, object]]:
    """Per method: mean and 95% CI half-width of ``method - base`` over the shared seeds."""
    if base not in table:
        raise ValueError(f"base method {base!r} not in the results ({sorted(table)})")
    out = []
    for method, seeds in table.items():
        if method == base:
            continue
        shared = sorted(set(seeds) & set(table[base]))
        if not shared:
            raise ValueError(f"{method!r} shares no seed with {base!r}")
        entry: dict[str, object] = {"method": method, "seeds": shared}
        for metric in METRICS:
            diffs = [seeds[s][metric] - table[base][s][metric] for s in shared]
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
    header = ["variant"] + [f"Δ{label} (pts)" for label in METRICS.values()] + ["MAP@R verdict"]
    lines = [
        f"## Paired differences from `{base}` ({classes} classes)",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        cells = [str(row["method"])]
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
        f"Percentage points, variant minus `{base}`, paired by seed (seeds {seeds}); "
        "mean ± 95% Student-t CI of the per-seed differences. A verdict needs the whole "
        "interval on one side of zero.",
        f"Source: `{source}`. Produced by `{command}`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablation_report")
    parser.add_argument("csv", type=Path, help="DIR/<config>.csv written by --publish")
    parser.add_argument("--base", default="base", help="the method every variant is paired with")
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
    rows = paired_differences(read_separate_rows(args.csv), args.base)
    text = markdown(rows, args.base, args.csv, command, args.classes)
    if args.out is not None:
        args.out.write_text(text)
    print(text)
    return text


if __name__ == "__main__":
    main()
