"""A run's results: per-fold values combined per seed, summarised, tabled and published.

Per-fold results are combined ("separate": mean over fold models; "concatenated":
the fold models' L2-normalised embeddings concatenated, :func:`aggregate`), then
summarised as mean ± 95% CI over seeds (:func:`summarize`, :func:`results_table`)
(:func:`combine`) and written as ``table.md``, ``results.csv`` and ``summary.json``
(:func:`write_results`) and, with ``--publish``, as ``<name>.md`` and ``<name>.csv``
with their provenance (:func:`publish_results`).
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.reports.markdown import markdown_table
from pml_crt.utils.stats import format_mean_ci, mean_ci95

from .config import method_config, method_names
from .data import Source
from .evaluation import make_calculator, metric_values, report_split
from .layout import EMBEDDINGS, RESULTS, unit_dir, unit_folds, write_atomic
from .metrics import BenchmarkAccuracyCalculator
from .provenance import published_provenance

__all__ = [
    "TABLE_METRICS",
    "aggregate",
    "combine",
    "complete_methods",
    "concatenated_metrics",
    "publish_results",
    "results_csv",
    "results_table",
    "summarize",
    "table_header",
    "write_results",
]

TABLE_METRICS = {
    "precision_at_1": "P@1",
    "r_precision": "R-Precision",
    "mean_average_precision_at_r": "MAP@R",
    "recall_at_1": "R@1",
    "spectral_decay": "spectral decay ρ",
    "embedding_density": "density π",
}
# Metrics shown as they are (not as percent), with 3 decimals.
_UNSCALED = {"spectral_decay", "embedding_density"}
_EVALUATION_LABELS = {
    "separate": "separate (mean of fold models)",
    "concatenated": "concatenated folds",
}


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


# --------------------------------------------------------------------------- combining


def concatenated_metrics(
    folders: Sequence[Path], calculator: BenchmarkAccuracyCalculator, metrics: Sequence[str]
) -> dict[str, float]:
    """Metrics of the fold models' L2-normalised test embeddings concatenated (MLRC's 512-dim)."""
    parts, labels = [], None
    for folder in folders:
        saved = torch.load(folder / EMBEDDINGS, map_location="cpu", weights_only=True)
        if labels is not None and not torch.equal(labels, saved["labels"]):
            raise ValueError(f"{folder}: test labels differ between folds")
        labels = saved["labels"]
        parts.append(torch.nn.functional.normalize(saved["embeddings"].float(), dim=1))
    embeddings = torch.nn.functional.normalize(torch.cat(parts, dim=1), dim=1)
    accuracies = calculator.get_accuracy(embeddings, labels, embeddings, labels, True)
    return metric_values(accuracies, metrics)


class _Combiner:
    """The rows of one method's seeds; builds the accuracy calculator once, when needed."""

    def __init__(self, config: Mapping[str, Any], root: Path) -> None:
        self.config, self.root = config, root
        self.metrics = list(config["eval"]["metrics"])
        self.split = report_split(config)
        self.calculator: BenchmarkAccuracyCalculator | None = None

    def seed_rows(self, name: str, folds: Sequence[int], seed: int) -> list[dict[str, Any]]:
        """The fold, "separate" and (when possible) "concatenated" rows of one seed."""
        split, metrics = self.split, self.metrics
        folders = [unit_dir(self.root, name, seed, fold) for fold in folds]
        results = [json.loads((f / RESULTS).read_text()) for f in folders]
        row = {"method": name, "evaluation": "fold", "seed": seed}
        rows = [
            {**row, "fold": fold, **result[split]}
            for fold, result in zip(folds, results, strict=True)
        ]
        separate = {m: _mean([r[split][m] for r in results]) for m in metrics}
        rows.append({**row, "evaluation": "separate", "fold": "", **separate})
        concatenable = split == "test" and all((f / EMBEDDINGS).exists() for f in folders)
        if len(folds) > 1 and concatenable:
            concat = self.concatenated(name, folds, seed, folders)
            rows.append({**row, "evaluation": "concatenated", "fold": "", **concat})
        return rows

    def concatenated(
        self, name: str, folds: Sequence[int], seed: int, folders: Sequence[Path]
    ) -> dict[str, float]:
        """The concatenated folds' metrics, also written to ``seed<k>/concatenated.json``."""
        self.calculator = self.calculator or make_calculator(self.config)
        concat = concatenated_metrics(folders, self.calculator, self.metrics)
        write_atomic(
            self.root / name / f"seed{seed}" / "concatenated.json",
            json.dumps({"folds": list(folds), "test": concat}, indent=2),
        )
        return concat


def aggregate(config: Mapping[str, Any], names: Sequence[str], root: Path) -> list[dict[str, Any]]:
    """Per-seed "separate" and "concatenated" results of every method (from the unit folders).

    Returns rows ``{method, evaluation, seed, fold, <metric>: value}`` with
    ``evaluation`` in ``fold``, ``separate`` (mean over folds) and
    ``concatenated`` (with more than one fold and ``eval.save_embeddings``).
    """
    combiner = _Combiner(config, root)
    rows: list[dict[str, Any]] = []
    for name in names:
        folds = unit_folds(method_config(config, name))
        for seed in config["seeds"]:
            rows += combiner.seed_rows(name, folds, seed)
    return rows


def complete_methods(config: Mapping[str, Any], root: Path) -> list[str]:
    """The config's methods (in config order) whose every unit has finished."""

    def complete(name: str) -> bool:
        return all(
            (unit_dir(root, name, seed, fold) / RESULTS).exists()
            for seed in config["seeds"]
            for fold in unit_folds(method_config(config, name))
        )

    return [name for name in method_names(config) if complete(name)]


# --------------------------------------------------------------------------- summaries


def _groups(rows: Sequence[Mapping[str, Any]]) -> dict[tuple[str, str], list[Mapping[str, Any]]]:
    """The per-seed rows of every (method, evaluation) pair, fold rows left out."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["evaluation"] != "fold":
            groups.setdefault((row["method"], row["evaluation"]), []).append(row)
    return groups


def summarize(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and 95% CI half-width over seeds of every (method, evaluation) pair."""
    summary = []
    for (method, evaluation), group in _groups(rows).items():
        entry: dict[str, Any] = {
            "method": method,
            "evaluation": evaluation,
            "seeds": [r["seed"] for r in group],
        }
        for metric in metrics:
            mean, half = mean_ci95([r[metric] for r in group])
            entry[metric] = {"mean": mean, "ci95": None if math.isnan(half) else half}
        summary.append(entry)
    return summary


def _table_note(seeds: Sequence[int], columns: Sequence[str]) -> str:
    """The sentence under the table: units, seeds and what the columns mean."""
    note = f"\n\nPercent; mean ± 95% CI (Student t) over seeds {list(seeds)}"
    if len(seeds) < 2:
        note = f"\n\nPercent; one seed ({list(seeds)}), so no CI"
    if any(m in _UNSCALED for m in columns):
        note += (
            "; spectral decay ρ (lower: flatter spectrum) and density π (intra-class over "
            "inter-class-centre distance) are plain numbers (Roth et al., ICML 2020)"
        )
    if "recall_at_1" in columns:
        note += "; R@1 equals P@1 by definition (R@2/4/8 in results.csv)"
    return note + "."


def results_table(rows: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> str:
    """Markdown table: one row per method (and evaluation), mean ± 95% CI over seeds, percent."""
    groups = _groups(rows)
    show_evaluation = any(evaluation == "concatenated" for _, evaluation in groups)
    columns = [m for m in TABLE_METRICS if all(m in r for g in groups.values() for r in g)]
    header = (
        ["method"]
        + (["evaluation"] if show_evaluation else [])
        + [TABLE_METRICS[m] for m in columns]
    )
    body = []
    for (method, evaluation), group in groups.items():
        cells = [method] + ([_EVALUATION_LABELS[evaluation]] if show_evaluation else [])
        cells += [
            format_mean_ci([r[m] for r in group], 1.0, 3)
            if m in _UNSCALED
            else format_mean_ci([r[m] for r in group])
            for m in columns
        ]
        body.append(cells)
    return markdown_table(header, body) + _table_note(seeds, columns)


def results_csv(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    """The rows as CSV: method, evaluation, seed, fold and the metrics."""
    out = io.StringIO()
    writer = csv.DictWriter(
        out, ["method", "evaluation", "seed", "fold", *metrics], extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# --------------------------------------------------------------------------- writing


def table_header(
    config: Mapping[str, Any], source: Source, shown: Sequence[str] | None = None
) -> str:
    """The heading and data line above a run's table of the methods ``shown`` (default: all)."""
    folds = [int(f) for f in config["folds"]]
    header = f"## {config['name']}\n\n{config['dataset']['name']}"
    header += f": {source.num_classes} classes ({len(source.labels)} images), "
    order_seed = config["dataset"].get("class_order_seed")
    if order_seed is not None:
        header += f"classes shuffled with seed {order_seed}, then "
    header += f"MLRC split, folds {folds} of {config['num_folds']}"
    if report_split(config) == "val":
        header += "; VALIDATION classes only (the test classes were never embedded)"
    tune = config.get("tune") or {}
    if tune.get("tuned_from"):
        sentence = _search_sentence(tune, method_names(config) if shown is None else shown)
        header += f". {sentence}" if sentence else ""
    return header + ".\n\n"


def _search_sentence(tune: Mapping[str, Any], shown: Sequence[str]) -> str:
    """What ``best.yaml`` says of the search behind each method ``shown``, as one sentence
    (empty when none of them is named there)."""
    search = (
        f"{tune['trials']} trials of `python -m benchmarks.tune` on validation classes (seeds "
        f"{tune['seeds']}, folds {tune['folds']}): `{tune['tuned_from']}_tuning.md`"
    )
    searched = tune.get("tuned_methods")
    if searched is None:  # a best.yaml written before it named its methods
        return f"Every trained method runs with the best of its {search}"
    searched = [m for m in searched if m in shown]
    untuned = [m for m in tune.get("untuned_methods") or [] if m in shown]
    if not searched:
        return f"{_names(untuned)} had no search" if untuned else ""
    names = _names(searched)
    if len(searched) == 1:
        sentence = f"{names} runs with the best of its {search}"
    else:
        sentence = f"{names} run with the best of their {search}, the same budget for each"
    if untuned:
        sentence += f"; {_names(untuned)} had no search"
    return sentence


def _names(methods: Sequence[str]) -> str:
    return ", ".join(f"`{m}`" for m in methods)


def combine(
    config: Mapping[str, Any], root: Path
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], str]:
    """``(rows, summary, table)`` of the methods whose every unit has finished."""
    rows = aggregate(config, complete_methods(config, root), root)
    summary = summarize(rows, list(config["eval"]["metrics"]))
    return rows, summary, results_table(rows, config["seeds"])


def write_results(
    root: Path,
    text: str,
    rows: Sequence[Mapping[str, Any]],
    summary: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
) -> None:
    """Write a run's ``table.md`` (``text``), ``results.csv`` and ``summary.json``."""
    write_atomic(root / "table.md", text)
    write_atomic(root / "results.csv", results_csv(rows, metrics))
    write_atomic(root / "summary.json", json.dumps(summary, indent=2))


def publish_results(
    folder: Path,
    name: str,
    table: str,
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    device: torch.device,
    command: str,
    run_root: Path | None = None,
) -> None:
    """Write ``<folder>/<name>.md`` (table + how it was made) and ``<folder>/<name>.csv``.

    With ``run_root``, then the plots of ``benchmarks.reports.plots.write_plots``
    (``<name>_*.png``); a plotting failure only warns: the table and values are already
    written.
    """
    provenance = published_provenance(name, device, command, run_root)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"{name}.md", table + provenance)
    write_atomic(folder / f"{name}.csv", results_csv(rows, metrics))
    if run_root is not None:
        try:
            from benchmarks.reports.plots import write_plots

            write_plots(run_root, folder, name)
        except Exception as error:  # e.g. matplotlib missing: the results are safe already
            warnings.warn(f"plots of {name} not written: {error!r}", stacklevel=2)
