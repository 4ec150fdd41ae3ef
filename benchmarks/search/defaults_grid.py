"""The safety-first choice of a default: every candidate against the linear head, per cell.

    python -m benchmarks.defaults_grid --base global_avg \
        --candidates mh_default mh_scaled ... --lrs 1e-5 1e-4 1e-3 \
        --sweep omniglot7x7=benchmarks/results/omniglot7x7_defaults_grid_lr_sweep.csv \
        [--sweep cub224=benchmarks/results/cub224_defaults_grid_lr_sweep.csv ...] \
        [--datasets omniglot7x7 cub224 cars224] \
        --out benchmarks/results/defaults_grid.md

Reads the per-seed validation rows of one or more learning-rate sweeps
(``python -m benchmarks.lr_sweep ... --publish DIR``), in which every candidate and
the base (the linear head) ran at the same learning rates and seeds. A cell is a
(dataset, learning rate) pair; its value is the paired MAP@R difference, candidate
minus base, mean ± 95% Student-t CI over seeds. The rule (fixed in
``benchmarks/results/ablation.md`` before the grid ran): a candidate's worst cell is
its cell of lowest mean; the default is the candidate whose worst cell is highest,
provided none of its cells is significantly below zero (CI entirely below zero);
candidates whose worst cells lie within each other's CIs are tied, and the tie goes
to the highest mean over all cells. ``--datasets`` names every dataset the grid is to
cover: while one of them has no sweep yet, the report is Provisional. Writes one
markdown report and its plot
(``<out stem>.png``: one panel per dataset, the cells against the learning rate).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.protocol.layout import write_atomic
from benchmarks.reports.markdown import markdown_table
from benchmarks.reports.paired import difference_text, paired_differences, read_separate_rows

from .lr_sweep import lr_label

__all__ = ["Candidate", "choose", "grid_cells", "main", "markdown", "plot_grid"]

MAP_AT_R = "mean_average_precision_at_r"
Cell = tuple[str, float]  # (dataset, learning rate)


@dataclass(frozen=True)
class Candidate:
    """One candidate's cells ``{(dataset, lr): (mean, half-width)}`` and the rule's reading."""

    name: str
    cells: Mapping[Cell, tuple[float, float]]

    @property
    def worst(self) -> tuple[Cell, float, float]:
        """The cell of lowest mean difference, with its mean and CI half-width."""
        cell = min(self.cells, key=lambda c: self.cells[c][0])
        return (cell, *self.cells[cell])

    @property
    def below_zero(self) -> list[Cell]:
        """The cells whose whole CI lies below zero."""
        return [c for c, (mean, half) in self.cells.items() if mean + half < 0]

    @property
    def mean(self) -> float:
        """The mean difference over all cells."""
        return sum(mean for mean, _ in self.cells.values()) / len(self.cells)


def grid_cells(
    sweeps: Sequence[tuple[str, Path]], candidates: Sequence[str], base: str, lrs: Sequence[float]
) -> list[Candidate]:
    """Each candidate's paired MAP@R differences from ``base``, per (dataset, learning rate).

    ``sweeps`` are ``(dataset, csv)`` pairs; a dataset may have several sweeps (one grid
    split over invocations), each with its own ``base`` run, and a candidate is paired
    with the base of the sweep that holds it. A candidate absent from every sweep of a
    later dataset (it failed the proviso on an earlier one, so it was not run there) has
    no cells there; one absent from the first dataset, or present at only some rates, is
    an error naming it.
    """
    cells: dict[str, dict[Cell, tuple[float, float]]] = {name: {} for name in candidates}
    datasets = list(dict.fromkeys(dataset for dataset, _ in sweeps))
    for dataset, path in sweeps:
        table = read_separate_rows(path)
        here = [c for c in candidates if any(f"{c}_{lr_label(lr)}" in table for lr in lrs)]
        pairs = [(f"{c}_{lr_label(lr)}", f"{base}_{lr_label(lr)}") for c in here for lr in lrs]
        rows = iter(paired_differences(table, pairs=pairs))
        for name in here:
            for lr in lrs:
                cells[name][(dataset, lr)] = next(rows)[MAP_AT_R]
    missing = [c for c in candidates if not any(d == datasets[0] for d, _ in cells[c])]
    if missing:
        raise ValueError(f"{datasets[0]} (the first dataset) has no sweep of {missing}")
    return [Candidate(name, cells[name]) for name in candidates]


def _tied(a: Candidate, b: Candidate) -> bool:
    """Worst cells within each other's CIs (a NaN half-width, one seed, ties nothing)."""
    (_, mean_a, half_a), (_, mean_b, half_b) = a.worst, b.worst
    return abs(mean_a - mean_b) <= max(half_a, half_b)


def choose(candidates: Sequence[Candidate]) -> tuple[Candidate, bool]:
    """The rule's default and whether it met the proviso (no cell significantly below 0)."""
    safe = [c for c in candidates if not c.below_zero]
    pool = safe or list(candidates)
    leader = max(pool, key=lambda c: c.worst[1])
    tied = [c for c in pool if _tied(c, leader)]
    return max(tied, key=lambda c: c.mean), bool(safe)


def markdown(
    candidates: Sequence[Candidate],
    base: str,
    sweeps: Sequence[tuple[str, Path]],
    command: str,
    datasets: Sequence[str] | None = None,
) -> str:
    """The grid table, the rule's reading of each candidate, and the chosen default.

    ``datasets``: every dataset the grid is to cover (default: those of ``sweeps``);
    one without a sweep makes the outcome Provisional.
    """
    chosen, proviso = choose(candidates)
    swept = list(dict.fromkeys(dataset for dataset, _ in sweeps))
    unknown = sorted(set(swept) - set(datasets or swept))
    if unknown:
        raise ValueError(f"sweeps of {unknown}, which are not among datasets={list(datasets)}")
    waiting = [d for d in datasets or swept if d not in swept]
    columns = list(dict.fromkeys(cell for c in candidates for cell in c.cells))
    header = ["candidate"] + [f"{d} {lr:g}" for d, lr in columns]
    header += ["worst cell", "mean", "cells below 0"]
    body = []
    for candidate in sorted(candidates, key=lambda c: -c.worst[1]):
        (dataset, lr), mean, half = candidate.worst
        below = ", ".join(f"{d} {r:g}" for d, r in candidate.below_zero) or "none"
        name = f"**{candidate.name}**" if candidate is chosen else candidate.name
        row = [name] + [
            difference_text(*candidate.cells[c]) if c in candidate.cells else "not run"
            for c in columns
        ]
        row += [f"{difference_text(mean, half)} ({dataset} {lr:g})", f"{100 * candidate.mean:+.2f}"]
        body.append(row + [below])
    pending = [c.name for c in candidates if not c.below_zero and len(c.cells) < len(columns)]
    if waiting:
        outcome = (
            f"**Provisional: `{chosen.name}` leads** on {', '.join(swept)}; "
            f"{', '.join(waiting)} {'has' if len(waiting) == 1 else 'have'} not run yet: "
            "no choice until every dataset has."
        )
    elif pending:
        outcome = (
            f"**Provisional: `{chosen.name}` leads**, but {', '.join(f'`{n}`' for n in pending)} "
            "passed the proviso so far and have not run on every dataset yet: no choice "
            "until they have."
        )
    elif proviso:
        outcome = (
            f"**Chosen: `{chosen.name}`**, whose worst cell is the highest among the candidates "
            "with no cell significantly below the linear head (ties, worst cells within each "
            "other's CIs, broken by the mean over all cells)."
        )
    else:
        outcome = (
            f"**No candidate passes the proviso**: every one has a cell significantly below the "
            f"linear head. `{chosen.name}` has the highest worst cell; state where it is below."
        )
    seeds = sorted({s for _, path in sweeps for s in _seeds(path)})
    lines = [
        f"## Candidates minus `{base}`: paired validation MAP@R (pts), per dataset and Adam rate",
        "",
        markdown_table(header, body),
        "",
        outcome,
        "",
        f"Each cell: candidate minus `{base}` at the same learning rate, paired by seed (seeds "
        f"{seeds}), mean ± 95% Student-t CI, percentage points of validation MAP@R. Rows sorted "
        "by their worst cell. Not run: the candidate failed the proviso on an earlier dataset, "
        "or (Provisional) its sweep there has not run yet. "
        "The rule: `benchmarks/results/ablation.md`.",
        "Sources: " + ", ".join(f"`{path}` ({dataset})" for dataset, path in sweeps) + ".",
        f"Produced by `{command}`.",
    ]
    return "\n".join(lines) + "\n"


def _seeds(path: Path) -> set[int]:
    return {seed for seeds in read_separate_rows(path).values() for seed in seeds}


def plot_grid(candidates: Sequence[Candidate], base: str, path: Path) -> None:
    """One panel per dataset: each candidate's difference from ``base`` against the rate."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    datasets = list(dict.fromkeys(d for c in candidates for d, _ in c.cells))
    figure, axes = plt.subplots(
        1, len(datasets), figsize=(5.2 * len(datasets), 4.2), squeeze=False, sharey=True
    )
    for axis, dataset in zip(axes[0], datasets, strict=True):
        for index, candidate in enumerate(candidates):
            cells = sorted((lr, v) for (d, lr), v in candidate.cells.items() if d == dataset)
            if not cells:
                continue
            offset = 1.0 + 0.04 * (index - (len(candidates) - 1) / 2)  # keep bars apart
            axis.errorbar(
                [lr * offset for lr, _ in cells],
                [100 * mean for _, (mean, _) in cells],
                yerr=[0.0 if math.isnan(h) else 100 * h for _, (_, h) in cells],
                marker="o",
                capsize=3,
                label=candidate.name,
            )
        axis.axhline(0.0, color="black", linewidth=0.8)
        axis.set_xscale("log")
        axis.set_title(dataset)
        axis.set_xlabel("head learning rate (Adam)")
        axis.grid(alpha=0.3)
    axes[0][0].set_ylabel(f"validation MAP@R minus {base} (pts)")
    axes[0][-1].legend(fontsize="small")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _sweep(text: str) -> tuple[str, Path]:
    """``"dataset=path"`` -> ``("dataset", Path(path))``."""
    dataset, sep, path = text.partition("=")
    if not (sep and dataset and path):
        raise SystemExit(f"--sweep takes DATASET=CSV, got {text!r}")
    return dataset, Path(path)


def main(argv: Sequence[str] | None = None) -> str:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.defaults_grid", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "--sweep",
        nargs="+",
        required=True,
        type=_sweep,
        metavar="DATASET=CSV",
        help="a learning-rate sweep's published CSV, named by its dataset (one or more; a "
        "dataset may have several, each with its own base run)",
    )
    parser.add_argument("--base", default="global_avg", help="the linear head's method name")
    parser.add_argument("--candidates", nargs="+", required=True, help="candidate method names")
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-5, 1e-4, 1e-3])
    parser.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        help="every dataset the grid is to cover, in order (default: those of --sweep); "
        "while one has no sweep, the report is Provisional",
    )
    parser.add_argument("--out", type=Path, required=True, help="the markdown report (and .png)")
    args = parser.parse_args(argv)
    command = "python -m benchmarks.defaults_grid " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    sweeps = list(args.sweep)
    candidates = grid_cells(sweeps, args.candidates, args.base, args.lrs)
    text = markdown(candidates, args.base, sweeps, command, args.datasets)
    plot = args.out.with_suffix(".png")
    plot_grid(candidates, args.base, plot)
    write_atomic(args.out, text + f"\n![the grid]({plot.name})\n")
    print(text)
    return text
