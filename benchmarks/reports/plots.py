"""Plots of a finished benchmark run, read from its run folder.

    python -m benchmarks.plots runs/omniglot_quick [--out DIR] [--name NAME]

Writes three PNG files (matplotlib, Agg) to ``DIR`` (default: the run folder),
every value read from the files the runner wrote (nothing typed by hand):

* ``<name>_val_curves.png``: validation MAP@R per epoch of every method, the
  mean over its finished units (seeds x folds) with a min-max band, from the
  record-keeper CSV ``logs/accuracies_*_VAL_vs_self.csv`` of each unit. The
  frozen baseline (validated once, at epoch 0) is a dashed flat line.
* ``<name>_metrics.png``: P@1, MAP@R and R@1 per method, mean with 95% CI
  error bars over seeds, from ``summary.json`` ("separate" bars; hatched
  "concatenated" bars when more than one fold ran). The classes are the test
  classes, or the validation classes when the units' ``eval.split`` is
  ``val``.
* ``<name>_spectra.png``: the normalised singular values (descending, sum 1)
  of each method's L2-normalised test embeddings (``test_embeddings.pt`` of
  fold 0, or the first fold that has them), the mean over seeds, on a log
  scale, labelled with the method's spectral decay from ``summary.json``.

:func:`validation_curves`, :func:`spectra` and :func:`final_metrics` return the
plotted data; :func:`write_plots` is what ``benchmarks.run --publish`` calls.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
import yaml

from benchmarks.protocol.layout import EMBEDDINGS, RESULTS

__all__ = [
    "Curve",
    "final_metrics",
    "main",
    "method_order",
    "spectra",
    "validation_curves",
    "write_plots",
]

PRIMARY = "mean_average_precision_at_r"
LABELS = {
    "precision_at_1": "P@1",
    "mean_average_precision_at_r": "MAP@R",
    "recall_at_1": "R@1",
    "r_precision": "R-Precision",
}
BAR_METRICS = ("precision_at_1", "mean_average_precision_at_r", "recall_at_1")
VAL_CSV = "accuracies_*_VAL_vs_self.csv"
DPI = 120


class Curve(NamedTuple):
    """One method's validation curve: per epoch, the mean, min and max over its units."""

    epochs: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray
    units: int


# --------------------------------------------------------------------------- run folder


def _seed_fold(path: Path, prefix: str) -> int | None:
    tail = path.name[len(prefix) :]
    return int(tail) if path.name.startswith(prefix) and tail.isdigit() else None


def _units(run_root: Path, method: str) -> list[tuple[int, int, Path]]:
    """``(seed, fold, folder)`` of the method's finished units, sorted by seed then fold."""
    units = []
    for seed_dir in (run_root / method).glob("seed*"):
        seed = _seed_fold(seed_dir, "seed")
        if seed is None or not seed_dir.is_dir():
            continue
        for fold_dir in seed_dir.glob("fold*"):
            fold = _seed_fold(fold_dir, "fold")
            if fold is not None and (fold_dir / RESULTS).is_file():
                units.append((seed, fold, fold_dir))
    return sorted(units)


def _summary(run_root: Path) -> list[dict[str, Any]]:
    path = Path(run_root) / "summary.json"
    return json.loads(path.read_text()) if path.is_file() else []


def method_order(run_root: str | Path) -> list[str]:
    """The methods with finished units: ``summary.json``'s order, then any others by name."""
    run_root = Path(run_root)
    order: list[str] = []
    for entry in _summary(run_root):
        if entry["method"] not in order:
            order.append(entry["method"])
    others = sorted(p.name for p in run_root.iterdir() if p.is_dir() and p.name not in order)
    return [m for m in order + others if _units(run_root, m)]


def _unit_config(run_root: Path) -> dict[str, Any]:
    for method in method_order(run_root):
        for _, _, folder in _units(run_root, method):
            config = yaml.safe_load((folder / "config.yaml").read_text())
            if isinstance(config, dict):
                return config
    return {}


def report_split(run_root: str | Path) -> str:
    """``eval.split`` of the run's units (``"test"`` unless a unit's config.yaml says ``val``)."""
    return str((_unit_config(Path(run_root)).get("eval") or {}).get("split", "test"))


# --------------------------------------------------------------------------- data


def read_val_csv(path: str | Path, metric: str = PRIMARY) -> dict[int, float]:
    """``{epoch: value}`` of ``metric`` in a record-keeper validation CSV (last row per epoch)."""
    values: dict[int, float] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            epoch, value = row.get("epoch"), row.get(f"{metric}_level0", row.get(metric))
            try:
                values[int(float(epoch))] = float(value)
            except (TypeError, ValueError):
                continue  # a repeated header or an empty cell
    return values


def validation_curves(run_root: str | Path, metric: str = PRIMARY) -> dict[str, Curve]:
    """Per method, the validation ``metric`` per epoch over its finished units.

    At each epoch the mean, min and max are over the units that validated at
    that epoch (with early stopping, later epochs may have fewer units). The
    frozen baseline's curve is its single epoch-0 value.
    """
    run_root = Path(run_root)
    curves: dict[str, Curve] = {}
    for method in method_order(run_root):
        per_epoch: dict[int, list[float]] = {}
        units = 0
        for _, _, folder in _units(run_root, method):
            paths = sorted((folder / "logs").glob(VAL_CSV))
            if not paths:
                continue
            values = read_val_csv(paths[0], metric)
            units += bool(values)
            for epoch, value in values.items():
                per_epoch.setdefault(epoch, []).append(value)
        if not per_epoch:
            continue
        epochs = np.array(sorted(per_epoch))
        stacks = [np.array(per_epoch[e], dtype=float) for e in epochs]
        curves[method] = Curve(
            epochs,
            np.array([s.mean() for s in stacks]),
            np.array([s.min() for s in stacks]),
            np.array([s.max() for s in stacks]),
            units,
        )
    return curves


def normalised_spectrum(embeddings: torch.Tensor) -> np.ndarray:
    """Singular values of the row-L2-normalised ``(N, D)`` matrix, descending, summing to 1."""
    x = torch.nn.functional.normalize(embeddings.detach().to(torch.float64), dim=1)
    s = torch.linalg.svdvals(x)
    return (s / s.sum()).numpy()


def spectra(run_root: str | Path) -> dict[str, np.ndarray]:
    """Per method, the mean over seeds of :func:`normalised_spectrum` of the test embeddings.

    Each seed contributes fold 0, or its first fold with saved embeddings;
    methods without saved embeddings are left out.
    """
    run_root = Path(run_root)
    out: dict[str, np.ndarray] = {}
    for method in method_order(run_root):
        by_seed: dict[int, Path] = {}
        for seed, _, folder in _units(run_root, method):  # sorted: fold 0 first
            if seed not in by_seed and (folder / EMBEDDINGS).is_file():
                by_seed[seed] = folder / EMBEDDINGS
        curves = []
        for path in by_seed.values():
            saved = torch.load(path, map_location="cpu", weights_only=True)
            curves.append(normalised_spectrum(saved["embeddings"]))
        if curves:
            if len({len(c) for c in curves}) > 1:
                raise ValueError(f"{method}: test embedding sizes differ between seeds")
            out[method] = np.mean(curves, axis=0)
    return out


def final_metrics(
    run_root: str | Path, metrics: Sequence[str] = BAR_METRICS
) -> dict[tuple[str, str], dict[str, tuple[float, float | None]]]:
    """``{(method, evaluation): {metric: (mean, ci95 or None)}}`` from ``summary.json``.

    Only the metrics in ``metrics`` that the summary holds; evaluation is
    ``separate`` or ``concatenated``.
    """
    out: dict[tuple[str, str], dict[str, tuple[float, float | None]]] = {}
    for entry in _summary(Path(run_root)):
        values = {}
        for metric in metrics:
            if isinstance(entry.get(metric), dict):
                mean, ci = entry[metric].get("mean"), entry[metric].get("ci95")
                values[metric] = (
                    float("nan") if mean is None else float(mean),
                    None if ci is None or math.isnan(ci) else float(ci),
                )
        out[(entry["method"], entry["evaluation"])] = values
    return out


def _spectral_decay(run_root: Path) -> dict[str, float]:
    out = {}
    for entry in _summary(run_root):
        value = entry.get("spectral_decay")
        if entry["evaluation"] == "separate" and isinstance(value, dict):
            if value.get("mean") is not None:
                out[entry["method"]] = float(value["mean"])
    return out


def _seeds(run_root: Path) -> list[int]:
    return sorted({seed for m in method_order(run_root) for seed, _, _ in _units(run_root, m)})


# --------------------------------------------------------------------------- plots


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # no pyplot: nothing global, Agg through savefig

    return Figure(figsize=(width, height), layout="constrained")


def _colors(methods: Sequence[str]) -> dict[str, Any]:
    from matplotlib import colormaps

    trained = [m for m in methods if m != "frozen"]
    palette = colormaps["tab10" if len(trained) <= 10 else "tab20"].colors
    colors, index = {}, 0
    for method in methods:
        if method == "frozen":
            colors[method] = "0.45"
        else:
            colors[method] = palette[index % len(palette)]
            index += 1
    return colors


def plot_validation_curves(run_root: Path, path: Path, name: str) -> Path | None:
    from matplotlib.ticker import MaxNLocator

    curves = validation_curves(run_root)
    if not curves:
        return None
    colors = _colors(method_order(run_root))
    fig = _figure(7.0, 4.4)
    ax = fig.add_subplot()
    trained = {m: c for m, c in curves.items() if not (len(c.epochs) == 1 and c.epochs[0] == 0)}
    last = max((int(c.epochs.max()) for c in trained.values()), default=1)
    alpha = 0.2 if len(curves) <= 5 else 0.08  # many overlapping bands: fainter
    for method, c in curves.items():
        label = f"{method} ({c.units} unit{'s' if c.units != 1 else ''})"
        if method not in trained:  # validated once before any training: a flat line
            ax.axhline(100 * c.mean[0], color=colors[method], ls="--", lw=1.5, label=label)
            ax.axhspan(100 * c.low[0], 100 * c.high[0], color=colors[method], alpha=0.12, lw=0)
            continue
        ax.plot(c.epochs, 100 * c.mean, marker="o", ms=4, color=colors[method], label=label)
        ax.fill_between(c.epochs, 100 * c.low, 100 * c.high, color=colors[method], alpha=alpha)
    ax.set_xlim(0.8 if trained else 0, last + 0.2)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation MAP@R (%)")
    subtitle = "mean over seeds × folds, band = min–max"
    if len(trained) < len(curves):
        subtitle += "; dashed = untrained (epoch 0)"
    ax.set_title(f"{name}: validation MAP@R per epoch\n{subtitle}", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def plot_metrics(run_root: Path, path: Path, name: str) -> Path | None:
    from matplotlib.patches import Patch

    values = final_metrics(run_root)
    if not values:
        return None
    metrics = [m for m in BAR_METRICS if any(m in v for v in values.values())]
    bars = list(values)  # (method, evaluation), summary order
    methods = list(dict.fromkeys(m for m, _ in bars))
    colors = _colors(methods)
    width = 0.8 / len(bars)
    fig = _figure(max(6.5, 1.2 + len(metrics) * len(bars) * 0.42), 4.4)
    ax = fig.add_subplot()
    annotate = len(bars) <= 8
    for i, (method, evaluation) in enumerate(bars):
        xs, means, cis = [], [], []
        for j, metric in enumerate(metrics):
            if metric in values[(method, evaluation)]:
                mean, ci = values[(method, evaluation)][metric]
                xs.append(j - 0.4 + width * (i + 0.5))
                means.append(100 * mean)
                cis.append(np.nan if ci is None else 100 * ci)
        ax.bar(
            xs,
            means,
            width * 0.92,
            yerr=np.nan_to_num(cis),
            capsize=3,
            color=colors[method],
            edgecolor="black",
            lw=0.6,
            hatch="///" if evaluation == "concatenated" else None,
            error_kw={"lw": 1},
        )
        if annotate:
            for x, mean, ci in zip(xs, means, cis, strict=True):
                top = min(mean + (0 if np.isnan(ci) else ci), 100.0)
                ax.annotate(
                    f"{mean:.1f}",
                    (x, top),
                    xytext=(0, 2),
                    textcoords="offset points",
                    ha="center",
                    va="bottom",
                    fontsize=7,
                )
    ax.set_xticks(range(len(metrics)), [LABELS.get(m, m) for m in metrics])
    ax.set_xlim(-0.5, len(metrics) - 0.5)
    ax.margins(y=0.12)
    low, high = ax.get_ylim()  # a CI reaching past 0 or 100 % is cut at the axis
    ax.set_ylim(max(low, 0.0), min(high, 108.0))
    split = report_split(run_root)
    classes = "validation classes" if split == "val" else "test classes"
    ax.set_ylabel(f"{'validation' if split == 'val' else 'test'} accuracy (%)")
    seeds = _seeds(run_root)
    ax.set_title(
        f"{name}: {classes}, mean ± 95% CI over seeds {seeds}"
        + ("" if len(seeds) > 1 else " (one seed: no CI)"),
        fontsize=10,
    )
    ax.grid(axis="y", alpha=0.3)
    handles = [Patch(facecolor=colors[m], edgecolor="black", label=m) for m in methods]
    if any(e == "concatenated" for _, e in bars):
        handles += [
            Patch(facecolor="white", edgecolor="black", label="separate (mean of folds)"),
            Patch(facecolor="white", edgecolor="black", hatch="///", label="concatenated folds"),
        ]
    ax.legend(handles=handles, fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


def plot_spectra(run_root: Path, path: Path, name: str) -> Path | None:
    curves = spectra(run_root)
    if not curves:
        return None
    colors = _colors(method_order(run_root))
    decay = _spectral_decay(run_root)
    fig = _figure(7.0, 4.4)
    ax = fig.add_subplot()
    for method, s in curves.items():
        label = method + (f" (ρ = {decay[method]:.3f})" if method in decay else "")
        positive = np.where(s > 0, s, np.nan)  # a zero singular value has no log
        ax.plot(np.arange(1, len(s) + 1), positive, color=colors[method], lw=1.6, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("singular value index (descending)")
    ax.set_ylabel("normalised singular value (sum 1)")
    ax.set_title(
        f"{name}: spectrum of the L2-normalised test embeddings\n"
        "mean over seeds (first fold each); ρ = spectral decay, mean over units (lower: flatter)",
        fontsize=10,
    )
    ax.grid(alpha=0.3, which="both", lw=0.5)
    ax.legend(fontsize=8, loc="upper right")
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path


PLOTS = {
    "val_curves": plot_validation_curves,
    "metrics": plot_metrics,
    "spectra": plot_spectra,
}


def write_plots(
    run_root: str | Path, out_dir: str | Path, name: str | None = None, strict: bool = False
) -> dict[str, Path]:
    """Write ``<out_dir>/<name>_{val_curves,metrics,spectra}.png`` for the run in ``run_root``.

    A plot without data (no embeddings saved, no summary yet) is skipped. A
    plot that fails is skipped with a warning (``strict``: the error is raised),
    so the caller's results are never lost to a plotting problem. Returns
    ``{plot: path}`` of the files written.
    """
    run_root, out_dir = Path(run_root), Path(out_dir)
    name = name or run_root.name
    out_dir.mkdir(parents=True, exist_ok=True)
    written = {}
    for kind, plot in PLOTS.items():
        try:
            path = plot(run_root, out_dir / f"{name}_{kind}.png", name)
        except Exception as error:
            if strict:
                raise
            warnings.warn(f"{name}_{kind}.png not written: {error!r}", stacklevel=2)
            continue
        if path is not None:
            written[kind] = path
    return written


def main(argv: Sequence[str] | None = None) -> dict[str, Path]:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.plots",
        description="Plot a benchmark run: validation curves, final metrics, embedding spectra.",
    )
    parser.add_argument("run_dir", help="a run folder, e.g. runs/omniglot_quick")
    parser.add_argument("--out", default=None, help="where to write the PNGs (the run folder)")
    parser.add_argument("--name", default=None, help="file name prefix (the run folder's name)")
    args = parser.parse_args(argv)
    run_root = Path(args.run_dir)
    if not run_root.is_dir():
        parser.error(f"{run_root} is not a folder")
    written = write_plots(run_root, args.out or run_root, args.name, strict=True)
    for kind in PLOTS:
        print(f"{kind}: {written[kind]}" if kind in written else f"{kind}: no data, skipped")
    return written
