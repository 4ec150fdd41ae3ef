"""The plots of ``perf.md`` (matplotlib, Agg), each written next to the JSON it draws.

:func:`plot_sweeps` and :func:`plot_memory` draw ``head_cost.json`` (each head's time and
FLOP rate as one factor varies; CRT's and NetVLAD's memory), :func:`plot_eval`
``eval_scale.json``; each returns the file name it wrote.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .report_common import FLOP_TARGET, MiB  # noqa: E402

__all__ = ["plot_eval", "plot_memory", "plot_sweeps", "save_figure"]

FACTOR_LABEL = {"B": "batch B", "side": "positions N", "C": "channels C", "K": "prototypes K"}
FACTOR_LABEL["D"] = "embedding D"


def plot_sweeps(hc: dict, folder: Path) -> tuple[str, str]:
    factors = [f for f in FACTOR_LABEL if any(p["factor"] == f for p in hc["points"])]
    base = next(p for p in hc["points"] if p["factor"] == "base")
    fig_t, axes_t = plt.subplots(1, len(factors), figsize=(4 * len(factors), 3.6))
    fig_r, axes_r = plt.subplots(1, len(factors), figsize=(4 * len(factors), 3.6))
    for ax_t, ax_r, factor in zip(axes_t, axes_r, factors, strict=True):
        pts = sorted(
            [p for p in hc["points"] if p["factor"] == factor] + [base],
            key=lambda p: p["point"][factor],
        )
        xs = [p["point"][factor] ** 2 if factor == "side" else p["point"][factor] for p in pts]
        for head in hc["heads"]:
            ax_t.plot(xs, [1000 * p["heads"][head]["time"]["median_s"] for p in pts], "o-")
            ax_r.plot(xs, [p["heads"][head]["flops_rate_vs_matmul"] for p in pts], "o-")
        ax_r.axhline(FLOP_TARGET, color="grey", ls="--", lw=1)
        for ax in (ax_t, ax_r):
            ax.set_xscale("log")
            ax.set_xticks(xs, [str(x) for x in xs])
            ax.minorticks_off()
            ax.set_xlabel(FACTOR_LABEL[factor])
        ax_t.set_yscale("log")
    axes_t[0].set_ylabel("forward + backward (ms)")
    axes_r[0].set_ylabel("FLOP/s / matmul FLOP/s")
    for axes in (axes_t, axes_r):
        axes[-1].legend(hc["heads"], fontsize=8)
    return save_figure(fig_t, folder / "head_time.png"), save_figure(
        fig_r, folder / "head_flops_rate.png"
    )


def plot_memory(hc: dict, folder: Path) -> str:
    sweeps = hc["memory_sweeps"]
    fig, axes = plt.subplots(1, len(sweeps), figsize=(5.5 * len(sweeps), 4))
    for ax, (_, sweep) in zip(axes, sweeps.items(), strict=True):
        var = sweep["variable"]
        xs = [r[var] for r in sweep["rows"]]
        ax.plot(xs, [r["crt_peak_bytes"] / MiB for r in sweep["rows"]], "o-", label="CRT peak")
        ax.plot(
            xs, [r["netvlad_peak_bytes"] / MiB for r in sweep["rows"]], "s-", label="NetVLAD peak"
        )
        ax.plot(xs, [r["crt_forward_bytes"] / MiB for r in sweep["rows"]], "^-", label="CRT saved")
        fit = sweep["crt_fit"]
        ax.plot(
            xs,
            [(fit["slope_bytes"] * x + fit["intercept_bytes"]) / MiB for x in xs],
            "k:",
            label=f"CRT peak, linear fit (R² {fit['r2']:.4f})",
        )
        ax.plot(
            xs,
            [r["residual_tensor_bytes"] / MiB for r in sweep["rows"]],
            "r--",
            label="one (B, N, K, d) float32 tensor",
        )
        ax.set_xlabel(var)
        ax.set_ylabel("MiB")
        ax.set_yscale("log")
        ax.legend(fontsize=8)
    return save_figure(fig, folder / "crt_memory.png")


def save_figure(fig: Any, png: Path) -> str:
    """Lay out, write and close a pyplot figure; return the file name."""
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return png.name


def plot_eval(es: dict, folder: Path) -> str:
    methods = es["methods"]
    names = [m["method"] for m in methods]
    clock = es["clock"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax1.barh(names, [m[clock] for m in methods])
    ax1.set_xlabel(f"{clock[:-2]} seconds, get_accuracy")
    ax2.barh(names, [m["peak_rss_mib"] / 1024 for m in methods], label="peak RSS")
    ax2.barh(names, [m["baseline_rss_mib"] / 1024 for m in methods], label="before the call")
    ax2.set_xlabel("GiB")
    ax2.legend(fontsize=8)
    return save_figure(fig, folder / "eval_scale.png")
