"""Paired comparison of variants with a base method, seed by seed.

Reads the per-seed rows that ``python -m benchmarks.run --publish DIR`` wrote to
``DIR/<config>.csv`` (validation classes for a config with ``eval.split: val``, the
default for ablations; ``--classes test`` for a comparison), pairs every method with
the base method seed by seed, and writes a markdown table of the mean paired
difference with its 95% Student-t CI. A variant counts as better (worse) only
when the whole interval lies above (below) zero (the statistics:
:mod:`~benchmarks.reports.paired`).

    python -m benchmarks.ablation_report benchmarks/results/omniglot_ablation.csv \
        --base base --out benchmarks/results/omniglot_ablation_paired.md
    python -m benchmarks.ablation_report benchmarks/results/cub_compare.csv \
        --base multihead_crt --classes test --out benchmarks/results/cub_compare_paired.md
    python -m benchmarks.ablation_report DIR/<name>_lr_sweep.csv \
        --pairs a_lr1e-04:b_lr1e-04 a_lr1e-03:b_lr1e-03 --out ...

Two runs of the same seeds (say, tuned settings and defaults) compare as one: give each
CSV as ``LABEL=PATH``, and its methods are named ``LABEL/method``:

    python -m benchmarks.ablation_report tuned=DIR/x_tuned.csv defaults=DIR/x_defaults.csv \
        --pairs tuned/crt:defaults/crt --classes test
"""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from .markdown import markdown_table
from .paired import METRICS, difference_text, paired_differences, read_separate_rows, verdict

__all__ = ["main", "markdown"]


def markdown(
    rows: Sequence[dict[str, object]],
    base: str,
    source: str,
    command: str,
    classes: str = "validation",
) -> str:
    """The table of :func:`paired_differences`' rows; ``base`` ``None`` adds a base column."""
    header = ["variant"] + ([] if base else ["base"])
    header += [f"Δ{label} (pts)" for label in METRICS.values()] + ["MAP@R verdict"]
    title = f"from `{base}` " if base else ""
    body = []
    for row in rows:
        cells = [str(row["method"])] + ([] if base else [str(row["base"])])
        cells += [difference_text(*row[metric]) for metric in METRICS]
        cells.append(verdict(*row["mean_average_precision_at_r"]))
        body.append(cells)
    seeds = sorted({s for row in rows for s in row["seeds"]})
    lines = [
        f"## Paired differences {title}({classes} classes)",
        "",
        markdown_table(header, body),
        "",
        f"Percentage points, variant minus {f'`{base}`' if base else 'its base'}, paired by seed "
        f"(seeds {seeds}); "
        "mean ± 95% Student-t CI of the per-seed differences. A verdict needs the whole "
        "interval on one side of zero.",
        f"Source: {source}. Produced by `{command}`.",
    ]
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ablation_report")
    parser.add_argument(
        "csv",
        nargs="+",
        help="DIR/<config>.csv written by --publish; several as LABEL=PATH each, "
        "their methods then named LABEL/method",
    )
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
    table, source = _read_results(args.csv)
    rows = paired_differences(table, base, pairs)
    text = markdown(rows, base, source, command, args.classes)
    if args.out is not None:
        args.out.write_text(text)
    print(text)
    return text


def _read_results(specs: Sequence[str]) -> tuple[dict[str, dict[int, dict[str, float]]], str]:
    """The seed table of one CSV (a plain path, even with ``=`` in it), or of several
    ``LABEL=PATH`` ones with methods ``LABEL/method``; and the source line naming the files."""
    if len(specs) == 1:
        return read_separate_rows(Path(specs[0])), f"`{specs[0]}`"
    table: dict[str, dict[int, dict[str, float]]] = {}
    labels: set[str] = set()
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not (sep and label and path) or "/" in label:
            raise SystemExit(
                f"several CSVs are each LABEL=PATH (a label without '/'), got {spec!r}"
            )
        if label in labels:
            raise SystemExit(f"the label {label!r} is given twice")
        labels.add(label)
        for method, seeds in read_separate_rows(Path(path)).items():
            table[f"{label}/{method}"] = seeds
    return table, ", ".join(f"`{spec}`" for spec in specs)


def _pair(text: str) -> tuple[str, str]:
    """``"variant:base"`` -> ``("variant", "base")``."""
    variant, sep, base = text.partition(":")
    if not (sep and variant and base):
        raise SystemExit(f"--pairs takes VARIANT:BASE, got {text!r}")
    return variant, base
