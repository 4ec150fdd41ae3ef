"""The MLRC table's report: MLRC's Table 4 layout with MultiHeadCRT beside every loss.

:func:`mlrc_markdown` is ``<name>_mlrc.md`` (Musgrave, Belongie and Lim, ECCV 2020): a
row per loss and embedder with P@1, R-Precision and MAP@R as mean ± 95% CI over seeds,
"separate" (mean of fold models) and, where more than one fold ran, "concatenated";
the paired MAP@R difference MultiHeadCRT minus linear per loss and its verdict; every
method's budget (:class:`MethodBudget`); the measured wall time; and MLRC's own
published numbers in a separate block (:func:`published_block`). :func:`plot_mlrc`
draws ``<name>_mlrc.png``. Methods pair by name (:func:`loss_rows`): ``<loss>_linear``
and ``<loss>_crt``; ``frozen`` is MLRC's "Pretrained" row.
``python -m benchmarks.mlrc_table`` (:mod:`benchmarks.search.mlrc_table`) writes it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

from benchmarks.protocol.build import caches_frozen_stages
from benchmarks.protocol.config import ConfigError, method_names
from benchmarks.protocol.provenance import environment
from pml_crt.utils.stats import format_mean_ci, mean_ci95

from .markdown import markdown_table
from .paired import difference_text, paired_differences, seed_table, verdict

__all__ = [
    "EVALUATIONS",
    "MLRC_LOSSES",
    "MLRC_PUBLISHED",
    "LossRow",
    "MethodBudget",
    "evaluation_table",
    "loss_rows",
    "mlrc_markdown",
    "plot_mlrc",
    "published_block",
    "verdict_summary",
]

# Config prefix -> MLRC's row label, in the order of MLRC's Table 4.
MLRC_LOSSES = {
    "contrastive": "Contrastive",
    "triplet": "Triplet",
    "ntxent": "NTXent",
    "proxynca": "ProxyNCA",
    "margin": "Margin",
    "normalized_softmax": "N. Softmax",
    "cosface": "CosFace",
    "arcface": "ArcFace",
    "fastap": "FastAP",
    "snr": "SNR",
    "ms": "MS",
    "ms_miner": "MS+Miner",
    "softtriple": "SoftTriple",
}


PRETRAINED = "frozen"


SUFFIXES = {"linear": "_linear", "crt": "_crt"}


EMBEDDER_LABELS = {"linear": "linear", "crt": "MultiHeadCRT"}


METRICS = {
    "precision_at_1": "P@1",
    "r_precision": "R-Precision",
    "mean_average_precision_at_r": "MAP@R",
}


MAP_R = "mean_average_precision_at_r"


EVALUATIONS = {"separate": "separate (mean of fold models)", "concatenated": "concatenated folds"}


# MLRC, Table 4, "Concatenated (512-dim)": P@1, R-Precision, MAP@R in percent
# (BN-Inception, ImageNet weights, 227 px, 4 folds of 128-d, 50 Bayesian-optimisation trials).
MLRC_PUBLISHED: dict[str, dict[str, tuple[float, float, float]]] = {
    "CUB200": {
        "Pretrained": (51.05, 24.85, 14.21),
        "Contrastive": (68.13, 37.24, 26.53),
        "Triplet": (64.24, 34.55, 23.69),
        "NTXent": (66.61, 35.96, 25.09),
        "ProxyNCA": (65.69, 35.14, 24.21),
        "Margin": (63.60, 33.94, 23.09),
        "N. Softmax": (65.65, 35.99, 25.25),
        "CosFace": (67.32, 37.49, 26.70),
        "ArcFace": (67.50, 37.31, 26.45),
        "FastAP": (63.17, 34.20, 23.53),
        "SNR": (66.44, 36.56, 25.75),
        "MS": (65.04, 35.40, 24.70),
        "MS+Miner": (67.73, 37.37, 26.52),
        "SoftTriple": (67.27, 37.34, 26.51),
    },
    "Cars196": {
        "Pretrained": (46.89, 13.77, 5.91),
        "Contrastive": (81.87, 35.11, 24.89),
        "Triplet": (79.13, 33.71, 23.02),
        "NTXent": (80.99, 34.96, 24.40),
        "ProxyNCA": (83.56, 35.62, 25.38),
        "Margin": (81.16, 34.82, 24.21),
        "N. Softmax": (83.16, 36.20, 26.00),
        "CosFace": (85.52, 37.32, 27.57),
        "ArcFace": (85.44, 37.02, 27.22),
        "FastAP": (78.45, 33.61, 23.14),
        "SNR": (82.02, 35.22, 25.03),
        "MS": (85.14, 38.09, 28.07),
        "MS+Miner": (83.67, 37.08, 27.01),
        "SoftTriple": (84.49, 37.03, 27.08),
    },
}


class LossRow(NamedTuple):
    """One row group of the table: MLRC's label and the config's method per embedder."""

    label: str
    linear: str | None
    crt: str | None


class MethodBudget(NamedTuple):
    """What one method was given: trials counted, and the summed trial and unit time."""

    complete: int
    pruned: int
    tuning_min: float
    final_min: float


def loss_rows(methods: Sequence[str]) -> list[LossRow]:
    """The table's rows for ``methods``: "Pretrained", MLRC's losses in order, then others.

    Raises :class:`~benchmarks.protocol.config.ConfigError` for a method that is neither
    ``frozen`` nor ``<loss>_linear`` / ``<loss>_crt``.
    """
    present = set(methods)
    stray = sorted(
        m for m in present if m != PRETRAINED and not m.endswith(tuple(SUFFIXES.values()))
    )
    if stray:
        raise ConfigError(
            f"methods {stray} are neither {PRETRAINED!r} nor '<loss>_linear' / '<loss>_crt'"
        )
    prefixes = {m.removesuffix(s) for m in present for s in SUFFIXES.values() if m.endswith(s)}
    ordered = [p for p in MLRC_LOSSES if p in prefixes] + sorted(prefixes - set(MLRC_LOSSES))
    rows = [LossRow("Pretrained", PRETRAINED, None)] if PRETRAINED in present else []
    for prefix in ordered:
        linear, crt = (f"{prefix}{s}" for s in SUFFIXES.values())
        rows.append(
            LossRow(
                MLRC_LOSSES.get(prefix, prefix),
                linear if linear in present else None,
                crt if crt in present else None,
            )
        )
    return rows


# --------------------------------------------------------------------------- the table


def _metric_cells(per_seed: Mapping[int, Mapping[str, float]] | None) -> list[str]:
    if not per_seed:
        return ["-"] * len(METRICS)
    return [format_mean_ci([v[m] for v in per_seed.values()]) for m in METRICS]


def _budget_cells(budget: MethodBudget | None) -> list[str]:
    if budget is None:
        return ["-", "-", "-"]
    return [
        f"{budget.complete} + {budget.pruned}",
        f"{budget.tuning_min:.1f} min",
        f"{budget.final_min:.1f} min",
    ]


def _paired(table: Mapping[str, Mapping[int, Any]], row: LossRow) -> tuple[float, float] | None:
    """MAP@R of ``crt - linear`` paired by seed: (mean, 95% CI half-width), or None."""
    if row.linear not in table or row.crt not in table:
        return None
    (entry,) = paired_differences(table, pairs=[(row.crt, row.linear)])
    return entry[MAP_R]


def _paired_cells(table: Mapping[str, Mapping[int, Any]], row: LossRow) -> list[str]:
    """``ΔMAP@R`` (pts) of ``crt - linear`` paired by seed, and its verdict."""
    paired = _paired(table, row)
    if paired is None:
        return ["-", "-"]
    return [difference_text(*paired), verdict(*paired)]


def verdict_summary(
    rows: Sequence[Mapping[str, Any]], groups: Sequence[LossRow], evaluation: str
) -> str:
    """One sentence: for which losses MultiHeadCRT's paired MAP@R is better, level, worse."""
    table = seed_table(rows, evaluation, METRICS)
    by_verdict: dict[str, list[str]] = {}
    for group in groups:
        paired = _paired(table, group)
        if paired is not None:
            by_verdict.setdefault(verdict(*paired), []).append(group.label)
    listed = [
        f"{word} for {', '.join(by_verdict[word])}"
        for word in ("better", "no difference", "worse", "one seed: no verdict")
        if word in by_verdict
    ]
    return (
        f"Where MultiHeadCRT helps ({EVALUATIONS[evaluation]}, paired MAP@R against the "
        f"linear embedder of the same loss): {'; '.join(listed) or 'no pair ran'}."
    )


def evaluation_table(
    rows: Sequence[Mapping[str, Any]],
    groups: Sequence[LossRow],
    budgets: Mapping[str, MethodBudget],
    evaluation: str,
) -> str:
    """One evaluation's markdown table: two rows per loss, linear then MultiHeadCRT."""
    table = seed_table(rows, evaluation, METRICS)
    header = ["method", "embedder", *METRICS.values()]
    header += ["ΔMAP@R CRT − linear (pts)", "verdict", "trials (complete + pruned)"]
    header += ["trial time, summed", "final units' time, summed"]
    body = []
    for group in groups:
        if group.linear == PRETRAINED:
            cells = [group.label, "untrained trunk + average pooling"]
            cells += _metric_cells(table.get(PRETRAINED)) + ["-", "-"]
            body.append(cells + _budget_cells(budgets.get(PRETRAINED)))
            continue
        for kind in SUFFIXES:
            method = getattr(group, kind)
            cells = [group.label if kind == "linear" else "", EMBEDDER_LABELS[kind]]
            cells += _metric_cells(table.get(method))
            cells += _paired_cells(table, group) if kind == "crt" else ["", ""]
            cells += _budget_cells(budgets.get(method))
            body.append(cells)
    return markdown_table(header, body)


def published_block(config: Mapping[str, Any]) -> str:
    """MLRC's published 512-dim numbers and why they are not comparable with ours."""
    header = ["method"] + [f"{d} {label}" for d in MLRC_PUBLISHED for label in METRICS.values()]
    body = [
        [label, *(f"{v:.2f}" for d in MLRC_PUBLISHED for v in MLRC_PUBLISHED[d][label])]
        for label in MLRC_PUBLISHED["CUB200"]
    ]
    images, trunk = config["images"], config["trunk"]
    ours = (
        f"{config['dataset']['name']} at {images.get('resize')} px through a "
        f"{trunk['name']} trunk, {len(config['folds'])} of {config['num_folds']} folds, "
        f"{config['tune']['trials']} trials per method"
    )
    return (
        "## MLRC's published numbers (not comparable with the table above)\n\n"
        "Musgrave, Belongie and Lim (ECCV 2020), Table 4, concatenated 512-dim, percent.\n\n"
        + markdown_table(header, body)
        + "\n\nThey are not comparable with ours: MLRC trained an ImageNet BN-Inception at "
        "227 px on all training classes of CUB200 and Cars196 with 4 folds and 50 "
        f"Bayesian-optimisation trials per loss, while this table is {ours}; only the order "
        "of the methods can be set side by side.\n"
    )


def mlrc_markdown(
    config: Mapping[str, Any],
    rows: Sequence[Mapping[str, Any]],
    budgets: Mapping[str, MethodBudget],
    wall: Mapping[str, float],
    command: str,
    tuned_name: str,
) -> str:
    """The whole report: budget, one table per evaluation, MLRC's numbers, provenance."""
    name, tune_cfg = config["name"], config["tune"]
    groups = loss_rows(method_names(config))
    seeds = sorted({int(r["seed"]) for r in rows})
    env = environment()
    evaluations = [e for e in EVALUATIONS if any(r["evaluation"] == e for r in rows)]
    pruner = tune_cfg["pruner"]["name"]
    pruning = "no pruning" if pruner == "none" else f"{pruner} pruning"
    if caches_frozen_stages(config):
        unseen = (
            "the test classes never reach a search: their images pass only once through the "
            "trunk's frozen, cached ImageNet stages"
        )
    else:
        unseen = "the test classes never embedded"
    parts = [
        f"# {name}: the Metric Learning Reality Check table, linear embedder vs MultiHeadCRT",
        "",
        f"Budget, the same for every method: {tune_cfg['trials']} trials of "
        "`python -m benchmarks.tune` on validation classes (folds "
        f"{tune_cfg['folds']}, seeds {tune_cfg['seeds']}, {pruning}; {unseen}), "
        "then the best trial's configuration trained for seeds "
        f"{list(config['seeds'])} x folds {list(config['folds'])} and tested on the test "
        "classes. Trials counted and time per method are in the last columns.",
        "",
        f"Measured wall time: {wall['total_min']:.1f} min over {int(wall['invocations'])} "
        f"invocation(s) of the command below (tuning {wall['tune_min']:.1f} min, final units "
        f"{wall['final_min']:.1f} min) on {env['processor']}, {env['cpu_count']} CPUs.",
    ]
    for evaluation in evaluations:
        parts += [
            "",
            f"## Test classes, {EVALUATIONS[evaluation]}",
            "",
            evaluation_table(rows, groups, budgets, evaluation),
            "",
            verdict_summary(rows, groups, evaluation),
        ]
    parts += [
        "",
        f"Percent; mean ± 95% CI (Student t) over seeds {seeds}. ΔMAP@R: MultiHeadCRT minus "
        "linear, paired by seed, mean ± 95% CI of the per-seed differences in percentage "
        "points; a verdict needs the whole interval on one side of zero. Per-seed values: "
        f"`{tuned_name}.csv`; the search: `{name}_tuning.md`.",
        "",
        f"![linear vs MultiHeadCRT MAP@R]({name}_mlrc.png)",
        "",
        published_block(config),
        f"Produced by `{command}` at commit `{env['git_commit']}` on {env['started']}.",
        "",
    ]
    return "\n".join(parts)


def plot_mlrc(
    rows: Sequence[Mapping[str, Any]], groups: Sequence[LossRow], path: Path, title: str
) -> Path:
    """Per loss, linear and MultiHeadCRT test MAP@R ("separate") with 95% CI bars."""
    from .plots import DPI, _figure

    table = seed_table(rows, "separate", METRICS)

    def mean_half(method: str | None) -> tuple[float, float] | None:
        if method not in table:
            return None
        mean, half = mean_ci95([v[MAP_R] for v in table[method].values()])
        return 100 * mean, 0.0 if math.isnan(half) else 100 * half

    losses = [g for g in groups if g.linear != PRETRAINED]
    fig = _figure(7.0, 1.2 + 0.42 * len(losses))
    ax = fig.add_subplot()
    pretrained = mean_half(PRETRAINED)
    if pretrained is not None:
        ax.axvline(pretrained[0], color="0.45", ls="--", lw=1.2, label="Pretrained (untrained)")
        ax.axvspan(pretrained[0] - pretrained[1], sum(pretrained), color="0.45", alpha=0.12)
    styles = {"linear": ("C0", "o", -0.15), "crt": ("C1", "s", 0.15)}
    for kind, (color, marker, offset) in styles.items():
        ys, xs, errors = [], [], []
        for i, group in enumerate(losses):
            value = mean_half(getattr(group, kind))
            if value is not None:
                ys.append(i + offset)
                xs.append(value[0])
                errors.append(value[1])
        ax.errorbar(
            xs, ys, xerr=errors, fmt=marker, color=color, capsize=3, label=EMBEDDER_LABELS[kind]
        )
    ax.set_yticks(range(len(losses)), [g.label for g in losses])
    ax.invert_yaxis()
    ax.set_xlabel("test MAP@R (%), mean ± 95% CI over seeds")
    ax.set_title(title, fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    return path
