"""Write ``benchmarks/results/perf.md`` and its plots from the perf scripts' JSON.

Usage::

    python -m benchmarks.perf.report [--quick] [--results benchmarks/results/perf]
                                     [--md benchmarks/results/perf.md]

Reads ``head_cost.json``, ``compile.json``, ``eval_scale.json`` and
``model_changes.json`` (the ``*_quick.json`` files with ``--quick``) from
``--results``, whichever exist, and writes the Markdown report plus PNG plots
(matplotlib, Agg) next to the JSON. Every number in the report is read from
those files; the text around them only names what they are.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .common import DEFAULT_OUT  # noqa: E402

MiB = 2**20
FACTOR_LABEL = {"B": "batch B", "side": "positions N", "C": "channels C", "K": "prototypes K"}
FACTOR_LABEL["D"] = "embedding D"
FLOP_TARGET = 0.5
NETVLAD_TARGET = 1.5


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def mib(nbytes: float) -> str:
    return f"{nbytes / MiB:.1f}"


def ratio(x: float) -> str:
    return f"{x:.2f}"


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


def point_label(entry: dict) -> str:
    p = entry["point"]
    return f"B={p['B']}, N={p['side']}x{p['side']}, C={p['C']}, K={p['K']}, D={p['D']}"


def machine_section(runs: dict[str, dict]) -> str:
    first = next(iter(runs.values()))["machine"]
    out = ["## Machine and reproduction", ""]
    out.append(
        table(
            [
                "CPU",
                "logical CPUs",
                "usable CPUs",
                "memory (GiB)",
                "python",
                "torch",
                "PML",
                "faiss",
            ],
            [
                [
                    first["cpu_model"],
                    first["logical_cpus"],
                    first["usable_cpus"],
                    first["memory_gib"],
                    first["python"],
                    first["torch"],
                    first["pytorch_metric_learning"],
                    first["faiss"],
                ]
            ],
        )
    )
    out += [
        "",
        "Each script's run (load average = 1, 5, 15 minute averages of `os.getloadavg`):",
        "",
    ]
    rows = []
    for name, run in runs.items():
        m = run["machine"]
        rows.append(
            [
                name,
                f"`{run['command']}`",
                m["torch_threads"],
                m["started"],
                f"{run['elapsed_s']:.0f}",
                " / ".join(f"{v:.2f}" for v in m["load_average_start"]),
                " / ".join(f"{v:.2f}" for v in m["load_average_end"]),
            ]
        )
    out.append(
        table(
            ["result", "command", "torch threads", "started", "took (s)", "load start", "load end"],
            rows,
        )
    )
    out += [
        "",
        "`python -m benchmarks.perf.report` then writes this file. Timings are medians over "
        "rounds in which the compared functions run side by side in rotating order. With one "
        "torch thread the clock is the process's CPU time (`time.process_time`, user + system), "
        "which stays stable while other jobs share the cores; wall-clock medians are in the "
        "JSON files.",
        "",
    ]
    return "\n".join(out)


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


def op_role(op: str, shapes: str, point: dict) -> str:
    """Which part of a CRT/NetVLAD head an operator with these input shapes belongs to."""
    B, N, C, K, D = point["B"], point["side"] ** 2, point["C"], point["K"], point["D"]
    d = min(C, 512)
    dims = {int(t) for t in shapes.replace("[", " ").replace("]", " ").replace(",", " ").split()}
    if op in ("aten::mm", "aten::addmm") and K * d in dims and D in dims:
        return "fusion Linear(K*d, D)"
    if op in ("aten::mm", "aten::addmm") and {C, d} <= dims and B * N in dims:
        return "input projection Linear(C, d)"
    if op in ("aten::mm", "aten::addmm") and {C, D} <= dims and B in dims:
        return "Linear(C, D)"
    if op == "aten::bmm":
        return "A^T X or its gradient"
    if op == "aten::copy_" and B * N * C == prod_of(shapes):
        return "layout copy (B, C, H, W) <-> (B, N, C)"
    if op in ("aten::eq", "aten::ne", "aten::all", "aten::abs", "aten::isfinite") and (
        B * N * C == prod_of(shapes)
    ):
        return "input check isfinite(x).all()"
    return ""


def prod_of(shapes: str) -> int:
    first = shapes.split("]")[0].strip("[ ")
    out = 1
    for t in first.split(","):
        t = t.strip()
        if t.isdigit():
            out *= int(t)
    return out


def _head_cost_base(hc: dict) -> list[str]:
    """The base point: every head's time, FLOPs, FLOP rate, peak memory and parameters."""
    base = hc["points"][0]
    out = [
        "",
        "### Base point",
        "",
        'FLOPs are matrix-product FLOPs counted by `FlopCounterMode` ("formula" says whether '
        "they equal the hand formula of `benchmarks/perf/flops.py`); the matmul column is a "
        "plain square matmul of the same FLOP count timed in the same rounds. Peak memory is "
        "live tensor bytes created during forward + backward (`benchmarks/perf/memory.py`).",
        "",
    ]
    rows = []
    for head in hc["heads"]:
        e = base["heads"][head]
        rows.append(
            [
                head,
                ms(e["time"]["median_s"]),
                ratio(e["time_vs_avg"]),
                f"{e['flops'] / 1e9:.3f}",
                "yes" if e["flops"] == e["flops_formula"] else f"no ({e['flops_formula']})",
                f"{e['gflops_per_s']:.1f}",
                f"{e['matmul_gflops_per_s']:.1f}",
                ratio(e["flops_rate_vs_matmul"]),
                mib(e["peak_bytes"]),
                f"{e['parameters'] / 1e6:.2f}",
            ]
        )
    out.append(
        table(
            [
                "head",
                "ms",
                "x avg",
                "GFLOP",
                "formula",
                "GFLOP/s",
                "matmul GFLOP/s",
                "FLOP/s ratio",
                "peak MiB",
                "params (M)",
            ],
            rows,
        )
    )
    return out + [
        "",
        f"Rounds at this point: {base['rounds']}; load average then: {base['load_average']}.",
    ]


def _head_cost_sweeps(hc: dict, folder: Path, rel: str) -> list[str]:
    """One factor varied at a time: times, CRT / NetVLAD, FLOP rates; the sweep plots."""
    out = ["", "### One factor at a time", ""]
    rows = []
    for p in hc["points"]:
        rows.append(
            [
                p["factor"],
                point_label(p),
                *(ms(p["heads"][h]["time"]["median_s"]) for h in hc["heads"]),
                ratio(p["crt_vs_netvlad"]),
                *(ratio(p["heads"][h]["flops_rate_vs_matmul"]) for h in hc["heads"]),
                mib(p["heads"]["crt"]["peak_bytes"]),
            ]
        )
    out.append(
        table(
            ["varied", "point"]
            + [f"{h} ms" for h in hc["heads"]]
            + ["CRT / NetVLAD"]
            + [f"{h} FLOP/s ratio" for h in hc["heads"]]
            + ["CRT peak MiB"],
            rows,
        )
    )
    time_png, rate_png = plot_sweeps(hc, folder)
    return out + ["", f"![time]({rel}/{time_png})", "", f"![FLOP/s ratio]({rel}/{rate_png})", ""]


def _head_cost_targets(hc: dict) -> list[str]:
    """The FLOP-rate and CRT-vs-NetVLAD targets: measured at base, over the grid, how often met."""
    base = hc["points"][0]
    rows = []
    for head in hc["heads"]:
        ratios = [p["heads"][head]["flops_rate_vs_matmul"] for p in hc["points"]]
        met = sum(r >= FLOP_TARGET for r in ratios)
        rows.append(
            [
                f"{head}: FLOP/s >= {FLOP_TARGET} x matmul",
                f"{ratio(base['heads'][head]['flops_rate_vs_matmul'])} at base; "
                f"{ratio(min(ratios))} to {ratio(max(ratios))} over the grid",
                f"{met} of {len(ratios)} points",
            ]
        )
    crt_nv = [p["crt_vs_netvlad"] for p in hc["points"]]
    rows.append(
        [
            f"CRT time <= {NETVLAD_TARGET} x NetVLAD (equal K, d)",
            f"{ratio(base['crt_vs_netvlad'])} at base; "
            f"{ratio(min(crt_nv))} to {ratio(max(crt_nv))} over the grid",
            f"{sum(r <= NETVLAD_TARGET for r in crt_nv)} of {len(crt_nv)} points",
        ]
    )
    return ["### Targets", "", table(["target", "measured", "met"], rows)]


def _head_cost_trunk(trunk: dict | None) -> list[str]:
    """The heads' share of a MobileNetV2 training step (when measured)."""
    if not trunk:
        return []
    out = [
        "",
        "### Share of a MobileNetV2 training step",
        "",
        f'`FeatureMapTrunk("mobilenet_v2")` (random weights), batch {trunk["B"]} at '
        f"{trunk['image_side']} px, forward + backward + SGD step: "
        f"{ms(trunk['trunk']['median_s'])} ms (median of {trunk['trunk']['n']}). "
        f"Heads on its {trunk['feature_map'][0]}x{trunk['feature_map'][1]}x"
        f"{trunk['feature_map'][2]} map, timed in the same rounds "
        f"(K={trunk['K']}, D={trunk['D']}; `crt` is `CRT(1280)` with default options, "
        f'`crt_sum` the same with `fusion="sum"`, `multihead` the default '
        f"`MultiHeadCRT(1280)`):",
        "",
    ]
    rows = [
        [
            h,
            ms(e["time"]["median_s"]),
            ratio(e["vs_trunk"]),
            f"{100 * e['share_of_step']:.1f}%",
        ]
        for h, e in trunk["heads"].items()
    ]
    return out + [table(["head", "ms", "x trunk step", "share of trunk + head"], rows), ""]


def _head_cost_profiles(hc: dict) -> list[str]:
    """The top ops of every profiled head (when profiled)."""
    if not hc.get("profiles"):
        return []
    out = ["", "### Where the time goes (torch.profiler, base point)", ""]
    for head, prof in hc["profiles"].items():
        out += [f"`{head}`: {prof['self_cpu_ms_per_step']:.1f} ms self CPU per step.", ""]
        rows = [
            [
                r["op"],
                op_role(r["op"], r["input_shapes"], hc["base"]),
                f"`{r['input_shapes']}`",
                f"{r['calls_per_step']:g}",
                f"{r['self_cpu_ms_per_step']:.2f}",
                f"{100 * r['share']:.1f}%",
            ]
            for r in prof["top"]
        ]
        out += [
            table(["op", "role", "input shapes", "calls/step", "ms/step", "share"], rows),
            "",
        ]
    return out


def _head_cost_memory(hc: dict, folder: Path, rel: str) -> list[str]:
    """Memory slopes per swept variable, the least-squares memory model and its plot."""
    out = ["### Memory", ""]
    out += [
        "Peak = forward + backward, parameter gradients included (CRT's fusion weight "
        "gradient alone is `4*K*d*D` bytes); saved = bytes alive after the forward pass "
        "(what autograd keeps for backward, plus the output). Slopes of linear fits, against "
        "what one materialised `(B, N, K, d)` float32 residual tensor would add per unit:",
        "",
    ]
    rows = []
    for _, sweep in hc["memory_sweeps"].items():
        fit, fwd = sweep["crt_fit"], sweep["crt_forward_fit"]
        rows.append(
            [
                sweep["variable"],
                ", ".join(str(r[sweep["variable"]]) for r in sweep["rows"]),
                f"{fit['slope_bytes'] / MiB:.3f} (R² {fit['r2']:.4f})",
                f"{fwd['slope_bytes'] / MiB:.3f} (R² {fwd['r2']:.4f})",
                f"{sweep['residual_tensor_slope_bytes'] / MiB:.3f}",
            ]
        )
    out.append(
        table(
            [
                "varied",
                "values",
                "CRT peak, MiB per unit",
                "CRT saved, MiB per unit",
                "(B, N, K, d) tensor, MiB per unit",
            ],
            rows,
        )
    )
    out += [""]
    for fit in hc["memory_fit"].values():
        out += [
            f"Non-negative least squares of CRT's {fit['measure'].replace('_', ' ')} over all "
            f"{fit['n_points']} measured configurations (bytes per element of each term): "
            f"R² {fit['r2']:.5f}, largest relative error {100 * fit['max_relative_error']:.1f}%.",
            "",
            table(fit["terms"], [[f"{c:.3g}" for c in fit["bytes_per_element"]]]),
            "",
        ]
    return out + [f"![memory]({rel}/{plot_memory(hc, folder)})", ""]


def _head_cost_input_check(hc: dict) -> list[str]:
    """``isfinite(x).all()`` against ``aminmax(x)``, and its share of a head step at base."""
    base = hc["points"][0]
    rows = []
    base_crt = base["heads"]["crt"]["time"]["median_s"]
    base_avg = base["heads"]["avg"]["time"]["median_s"]
    for c in hc["input_check"]:
        p = c["point"]
        row = [
            f"({p['B']}, {p['C']}, {p['side']}, {p['side']})",
            ms(c["isfinite_all"]["median_s"]),
            ms(c["aminmax"]["median_s"]),
            ratio(c["isfinite_all"]["median_s"] / c["aminmax"]["median_s"]),
        ]
        if p == hc["base"]:
            row += [
                f"{100 * c['isfinite_all']['median_s'] / base_avg:.1f}%",
                f"{100 * c['isfinite_all']['median_s'] / base_crt:.1f}%",
            ]
        else:
            row += ["", ""]
        rows.append(row)
    headers = [
        "input",
        "`isfinite(x).all()` ms",
        "`aminmax(x)` ms",
        "speed-up",
        "share of avg head step",
        "share of CRT step",
    ]
    return ["### The input check", "", table(headers, rows)]


def _head_cost_allocator(alloc: dict) -> list[str]:
    """CRT's step time and page faults under each allocator setting."""
    out = [
        "",
        "### Allocator",
        "",
        f"CRT at {point_label({'point': alloc['point']})}, {alloc['steps']} steps per fresh "
        f"process, {alloc['repeats']} processes per setting in alternation:",
        "",
    ]
    rows = [
        [
            f"`{name}`",
            ms(e["median_s"]),
            ratio(e["vs_default"]),
            f"{e['faults_per_step']:.0f}",
        ]
        for name, e in alloc["settings"].items()
    ]
    out.append(table(["setting", "ms per step", "x default", "minor page faults per step"], rows))
    return out + [""]


def head_cost_section(hc: dict, folder: Path, rel: str) -> str:
    out = ["## 1. What a head costs (forward + backward)", ""]
    out.append(f"Command: `{hc['command']}`. Base point: {point_label(hc['points'][0])}.")
    out += _head_cost_base(hc)
    out += _head_cost_sweeps(hc, folder, rel)
    out += _head_cost_targets(hc)
    out += _head_cost_trunk(hc.get("trunk_step"))
    out += _head_cost_profiles(hc)
    out += _head_cost_memory(hc, folder, rel)
    out += _head_cost_input_check(hc)
    out += _head_cost_allocator(hc["allocator"])
    return "\n".join(out)


def compile_section(cp: dict) -> str:
    out = ["## 2. `torch.compile` (inductor, CPU)", "", f"Command: `{cp['command']}`.", ""]
    rows = []
    for c in cp["cases"]:
        rows.append(
            [
                c["case"],
                str(tuple(c["input_shape"])),
                f"{c['first_call_s']:.1f}",
                f"{c['graph_count']} / {c['graph_break_count']}",
                "; ".join(c["break_reasons"]) or "-",
                ms(c["eager"]["median_s"]),
                ms(c["compiled"]["median_s"]),
                ratio(c["compiled_vs_eager"]),
                f"{c['max_abs_diff_output']:.1e}",
                f"{c['max_abs_diff_param_grads']:.1e} (of {c['max_abs_param_grad']:.1e})",
            ]
        )
    out.append(
        table(
            [
                "case",
                "input",
                "first call s (cold compile)",
                "graphs / breaks",
                "break reasons",
                "eager ms",
                "compiled ms",
                "compiled / eager",
                "max abs diff, output",
                "max abs diff, parameter grads",
            ],
            rows,
        )
    )
    out.append("")
    return "\n".join(out)


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


def eval_section(es: dict, folder: Path, rel: str) -> str:
    cs = es["class_size"]
    out = [
        "## 3. Evaluation at SOP scale",
        "",
        f"Command: `{es['command']}`. {es['num_images']:,} synthetic unit-norm {es['dim']}-d "
        f"embeddings in {es['num_classes']:,} classes of {cs['min']} to {cs['max']} images "
        f"(mean {cs['mean']:.2f}); `AccuracyCalculator(include=(P@1, R-Precision, MAP@R), "
        f'k="max_bin_count")`, one fresh process per method, {es["threads"]} thread(s) for '
        "torch and faiss.",
        "",
    ]
    clock = es["clock"]
    fastest = min(es["methods"], key=lambda m: m[clock])
    rows = []
    for m in es["methods"]:
        rows.append(
            [
                m["method"],
                f"{m['cpu_s']:.1f}",
                f"{m['wall_s']:.1f}",
                ratio(m[clock] / fastest[clock]),
                f"{m['peak_rss_mib'] / 1024:.2f}",
                f"{m['extra_peak_rss_mib'] / 1024:.2f}",
                *(f"{m['metrics'][k]:.5f}" for k in sorted(m["metrics"])),
            ]
        )
    metric_names = sorted(es["methods"][0]["metrics"])
    out.append(
        table(
            ["method", "CPU s", "wall s", "x fastest", "peak RSS GiB", "extra GiB", *metric_names],
            rows,
        )
    )
    comp = es["comparison"]
    out += [
        "",
        "Largest difference of each metric across methods: "
        + ", ".join(f"{k} {v:.2e}" for k, v in comp["max_abs_diff"].items())
        + (" (they agree)." if comp["agree"] else " (they DISAGREE)."),
        "",
        f"Fastest: `{fastest['method']}`.",
        "",
        f"![eval]({rel}/{plot_eval(es, folder)})",
        "",
    ]
    lc = es.get("label_counting")
    if lc:
        out += [
            "### Label counting inside `AccuracyCalculator`",
            "",
            "Before the k-NN search PML counts each label's matches in the reference set. With "
            "its default `EQUALITY` it broadcasts a (classes, N) comparison and sums it as "
            "int64; `pml_crt.utils.make_accuracy_calculator` passes `labels_equal` (the same "
            "comparison as a different function), which makes PML count one class at a time. "
            "Extra peak RSS of the counting alone, fresh process each:",
            "",
        ]
        rows = [
            [
                r["method"],
                f"{r['num_images']:,}",
                f"{r['num_classes']:,}",
                f"{r['cpu_s']:.2f}",
                f"{r['extra_peak_rss_mib']:.0f}",
            ]
            for r in lc["rows"] + [lc["per_class_at_full_size"]]
        ]
        out.append(table(["counting", "N", "classes", "CPU s", "extra peak MiB"], rows))
        out += [
            "",
            f"Stock counting costs {lc['stock_bytes_per_pair']:.2f} bytes per (class, image) "
            f"pair (least squares through 0); at N = {lc['full_size']:,} with "
            f"{lc['full_classes']:,} classes that is {lc['stock_extrapolated_gib']:.1f} GiB.",
            "",
        ]
    return "\n".join(out)


def step_time_section(st: dict) -> str:
    """Section 5: one training step of the library now against a baseline revision."""
    out = [
        "## 5. One training step, now vs a baseline revision",
        "",
        f'Command: `{st["command"]}` ("baseline" = `pml_crt` at git `{st["baseline_rev"]}`; '
        f"device {st['device']}). Forward, backward and SGD step with PML's Multi-Similarity "
        "loss and miner; both sides timed back to back in rotating order. The ratio is the "
        "geometric mean of the per-round ratios with its 95% CI; host reads are the "
        "device-to-host reads of one step (a synchronisation each on an accelerator).",
        "",
    ]
    rows = []
    for c in st["cases"]:
        paired = c["now_vs_baseline_paired"]
        syncs = c["host_syncs"]
        rows.append(
            [
                c["case"],
                str(tuple(c["input_shape"])),
                ms(c["baseline"]["median_s"]),
                ms(c["now"]["median_s"]),
                f"{ratio(paired['geomean'])} [{ratio(paired['ci95_low'])}, "
                f"{ratio(paired['ci95_high'])}]",
                f"{syncs['baseline']['total']} -> {syncs['now']['total']}",
                ", ".join(f"{x:.1f}" for x in c["load_average"]),
            ]
        )
    header = ["step", "input", "baseline ms", "now ms", "now / baseline", "host reads", "load"]
    out += [table(header, rows), ""]
    return "\n".join(out)


def changes_section(mc: dict) -> str:
    out = [
        "## 4. Model-code changes, before vs after",
        "",
        f'Command: `{mc["command"]}` ("before" = `pml_crt` at git `{mc["baseline_rev"]}`).',
        "",
    ]
    rows = [
        [
            c["case"],
            str(tuple(c["input_shape"])),
            ms(c["before"]["median_s"]),
            ms(c["after"]["median_s"]),
            ratio(c["after_vs_before"]),
            mib(c["peak_bytes_before"]),
            mib(c["peak_bytes_after"]),
            f"{c['max_abs_diff_output']:.1e}",
            f"{c['max_abs_diff_grads']:.1e}",
        ]
        for c in mc["cases"]
    ]
    out.append(
        table(
            [
                "module",
                "input",
                "before ms",
                "after ms",
                "after / before",
                "before peak MiB",
                "after peak MiB",
                "max abs diff, output",
                "max abs diff, grads",
            ],
            rows,
        )
    )
    out.append("")
    return "\n".join(out)


def _flop_rate_summary(hc: dict) -> list[str]:
    """Which heads reach the FLOP-rate target at base; CRT / NetVLAD over the grid."""
    base = hc["points"][0]
    heads = base["heads"]
    met = [h for h in hc["heads"] if heads[h]["flops_rate_vs_matmul"] >= FLOP_TARGET]
    crt_nv = [p["crt_vs_netvlad"] for p in hc["points"]]
    return [
        f"- Base point ({point_label(base)}): forward + backward FLOP/s reaches "
        f">= {FLOP_TARGET} x a plain matmul of the same FLOPs for "
        + (", ".join(f"`{h}` ({ratio(heads[h]['flops_rate_vs_matmul'])})" for h in met) or "none")
        + "; not for "
        + (
            ", ".join(
                f"`{h}` ({ratio(heads[h]['flops_rate_vs_matmul'])})"
                for h in hc["heads"]
                if h not in met
            )
            or "none"
        )
        + ".",
        f"- CRT / NetVLAD time at equal K and d: {ratio(min(crt_nv))} to {ratio(max(crt_nv))} "
        f"over the {len(crt_nv)} grid points (target <= {NETVLAD_TARGET}).",
    ]


def _trunk_and_profile_summary(hc: dict) -> list[str]:
    """The heads' share of a trunk step and the fusion's share of CRT's time (when measured)."""
    out = []
    trunk = hc.get("trunk_step")
    if trunk:
        out.append(
            f"- Share of a MobileNetV2 training step (batch {trunk['B']}, 224 px): "
            + ", ".join(f"`{h}` {100 * e['share_of_step']:.1f}%" for h, e in trunk["heads"].items())
            + "."
        )
    prof = (hc.get("profiles") or {}).get("crt")
    if prof:
        fusion = [
            r
            for r in prof["top"]
            if op_role(r["op"], r["input_shapes"], hc["base"]).startswith("fusion")
        ]
        out.append(
            f"- Where CRT's time goes at the base point: the fusion `Linear(K*d, D)` "
            f"(forward and both gradients) takes {100 * sum(r['share'] for r in fusion):.0f}% "
            "of the profiled self CPU time; its weight gradient alone "
            f"{100 * max((r['share'] for r in fusion), default=0):.0f}%."
        )
    return out


def _allocator_check_memory_summary(hc: dict) -> list[str]:
    """The allocator's page faults, the finite-input check's cost, CRT's memory model."""
    heads = hc["points"][0]["heads"]
    alloc = hc["allocator"]["settings"]
    best = min(alloc, key=lambda k: alloc[k]["median_s"])
    check = next(c for c in hc["input_check"] if c["point"] == hc["base"])
    fwd = hc["memory_fit"]["forward"]
    return [
        f"- CRT's step takes {alloc['default']['faults_per_step']:.0f} minor page faults "
        f"with the default allocator; `{best}` cuts the step to "
        f"{ratio(alloc[best]['vs_default'])} x.",
        "- The finite-input check: `isfinite(x).all()` would take "
        f"{100 * check['isfinite_all']['median_s'] / heads['avg']['time']['median_s']:.0f}% "
        f"of the average-pool head's step; the heads use `aminmax`, "
        f"{ratio(check['isfinite_all']['median_s'] / check['aminmax']['median_s'])} x faster.",
        f"- CRT's saved activations fit `{' + '.join(fwd['terms'])}` (bytes per element "
        + ", ".join(f"{c:.3g}" for c in fwd["bytes_per_element"])
        + f") with R² {fwd['r2']:.6f}: no `B*N*K*d` term.",
    ]


def _eval_summary(es: dict) -> list[str]:
    """The fastest k-NN evaluation, agreement, peak memory and PML's label counting."""
    clock = es["clock"]
    fastest = min(es["methods"], key=lambda m: m[clock])
    others = [m for m in es["methods"] if m is not fastest]
    out = [
        f"- k-NN evaluation of {es['num_images']:,} embeddings: fastest `{fastest['method']}`"
        + (
            " ("
            + ", ".join(f"`{m['method']}` {ratio(m[clock] / fastest[clock])} x" for m in others)
            + ")"
            if others
            else ""
        )
        + f"; metrics agree: {es['comparison']['agree']}; largest peak RSS "
        f"{max(m['peak_rss_mib'] for m in es['methods']) / 1024:.1f} GiB."
    ]
    lc = es.get("label_counting")
    if lc:
        out.append(
            f"- PML's stock label counting would need {lc['stock_extrapolated_gib']:.1f} GiB "
            f"at {lc['full_size']:,} embeddings (machine: {es['machine']['memory_gib']} GiB); "
            f"per class it took {lc['per_class_at_full_size']['cpu_s']:.1f} s and "
            f"{lc['per_class_at_full_size']['extra_peak_rss_mib']:.0f} MiB."
        )
    return out


def summary_section(runs: dict[str, dict]) -> str:
    """Headline facts, each computed from the JSON."""
    out = ["## Summary", ""]
    hc = runs.get("head_cost")
    if hc:
        out += _flop_rate_summary(hc)
        out += _trunk_and_profile_summary(hc)
        out += _allocator_check_memory_summary(hc)
    cp = runs.get("compile")
    if cp:
        out.append(
            "- `torch.compile` / eager step time: "
            + ", ".join(f"`{c['case']}` {ratio(c['compiled_vs_eager'])}" for c in cp["cases"])
            + "."
        )
    es = runs.get("eval_scale")
    if es:
        out += _eval_summary(es)
    mc = runs.get("model_changes")
    if mc:
        out.append(
            "- Model-code changes, after / before: "
            + ", ".join(f"`{c['case']}` {ratio(c['after_vs_before'])}" for c in mc["cases"])
            + "."
        )
    out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="use the *_quick.json results")
    parser.add_argument("--results", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--md", type=Path, default=None, help="default: <results>/../perf.md")
    args = parser.parse_args(argv)
    suffix = "_quick" if args.quick else ""
    folder = args.results
    md = args.md or folder.parent / ("perf_quick.md" if args.quick else "perf.md")
    runs = {}
    for name in ("head_cost", "compile", "eval_scale", "model_changes", "step_time"):
        data = load(folder / f"{name}{suffix}.json")
        if data is not None:
            runs[name] = data
    if not runs:
        raise SystemExit(f"no results in {folder}")
    rel = os.path.relpath(folder, md.parent)
    parts = [
        "# pml-crt performance",
        "",
        "Generated by `python -m benchmarks.perf.report"
        + (" --quick" if args.quick else "")
        + "` from the JSON in "
        f"`{folder}`; do not edit by hand. Scripts and methods: `benchmarks/perf/`.",
        "",
        summary_section(runs),
        machine_section(runs),
    ]
    if "head_cost" in runs:
        parts.append(head_cost_section(runs["head_cost"], folder, rel))
    if "compile" in runs:
        parts.append(compile_section(runs["compile"]))
    if "eval_scale" in runs:
        parts.append(eval_section(runs["eval_scale"], folder, rel))
    if "model_changes" in runs:
        parts.append(changes_section(runs["model_changes"]))
    if "step_time" in runs:
        parts.append(step_time_section(runs["step_time"]))
    md.parent.mkdir(parents=True, exist_ok=True)
    md.write_text("\n".join(parts).rstrip() + "\n")
    print(f"wrote {md}")
    return md


if __name__ == "__main__":
    main()
