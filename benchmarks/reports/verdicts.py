"""The README's results table: each CRT head against GeM and against average pooling.

    python -m benchmarks.verdicts [--write]

For every published head comparison in :data:`BENCHMARKS` (tuned, or at the
defaults), pairs each CRT-family head with ``global_gem`` and with ``global_avg``
seed by seed on the test classes (the published ``<stem>.csv``, as
``benchmarks.ablation_report`` does) and writes one markdown table, each cell the
paired test MAP@R difference with its verdict, linking to the paired report
``<stem>_paired_gem.md`` / ``<stem>_paired_avg.md``. ``--write`` puts it between the
README's ``<!-- verdicts:start -->`` and ``<!-- verdicts:end -->`` markers; without
it the table is printed. ``tests/test_readme.py`` checks that the README holds
exactly it.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from .markdown import markdown_table
from .paired import paired_differences, read_separate_rows, verdict

__all__ = ["BENCHMARKS", "HEADS", "MARKERS", "main", "readme_with", "table"]

ROOT = Path(__file__).resolve().parents[2]
RESULTS = Path("benchmarks") / "results"
MARKERS = ("<!-- verdicts:start -->", "<!-- verdicts:end -->")
# (label, published stem): <stem>.csv and its _paired_gem.md / _paired_avg.md reports.
BENCHMARKS = (
    ("Omniglot 7x7, tuned", "omniglot7x7_tune_tuned"),
    ("CUB 224 px, tuned", "cub224_tune_tuned"),
    ("Cars196 224 px, tuned", "cars224_tune_tuned"),
    ("Cars196 224 px, defaults", "cars224_tune_defaults"),
)
HEADS = (
    ("multihead_crt", "`MultiHeadCRT`"),
    ("crt", "`CRT`"),
    ("netvlad", "`NetVLAD`"),
    ("frozen", "untrained trunk"),
)
BASES = (("global_gem", "gem"), ("global_avg", "avg"))
MAP_AT_R = "mean_average_precision_at_r"


def _cell(
    rows: dict[str, dict[int, dict[str, float]]], stem: str, head: str, base: str, suffix: str
) -> str:
    """One cell: ``head`` minus ``base`` in ``rows`` (the seed table of ``<stem>.csv``)."""
    (row,) = paired_differences(rows, pairs=[(head, base)])
    mean, half = row[MAP_AT_R]
    link = f"{RESULTS}/{stem}_paired_{suffix}.md"
    return f"[{verdict(mean, half)}]({link}) ({100 * mean:+.1f} ± {100 * half:.1f})"


def table(root: Path = ROOT) -> str:
    """The results table, from the published CSVs under ``root``."""
    rows = []
    for label, stem in BENCHMARKS:
        seeds = read_separate_rows(root / RESULTS / f"{stem}.csv")
        rows += [
            [label, head_label, *(_cell(seeds, stem, head, base, suffix) for base, suffix in BASES)]
            for head, head_label in HEADS
        ]
    header = ["benchmark", "head", "vs GeM", "vs average pooling"]
    return markdown_table(header, rows) + "\n"


def readme_with(text: str, block: str) -> str:
    """``text`` with ``block`` between the verdict markers (each on its own line)."""
    start, end = MARKERS
    before, found, rest = text.partition(start + "\n")
    _, found_end, after = rest.partition(end)
    if not (found and found_end):
        raise ValueError(f"README.md must hold {start} and {end} on lines of their own")
    return before + start + "\n" + block + end + after


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.verdicts", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--write", action="store_true", help="write it into README.md")
    args = parser.parse_args(argv)
    block = table()
    if args.write:
        readme = ROOT / "README.md"
        readme.write_text(readme_with(readme.read_text(), block))
    print(block, end="")
    return block
