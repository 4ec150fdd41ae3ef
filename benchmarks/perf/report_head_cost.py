"""Section 1 of ``perf.md``: what a head costs, from ``head_cost.json``.

:func:`head_cost_section` gives the base point (time, FLOPs, FLOP rate, peak memory), one
factor varied at a time, the targets, the heads' share of a MobileNetV2 step, the
profiled operators (each named by :func:`op_role`), CRT's memory model, the input
check and the allocator settings.
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.reports.markdown import markdown_table

from .report_common import FLOP_TARGET, NETVLAD_TARGET, MiB, mib, ms, point_label, ratio
from .report_plots import plot_memory, plot_sweeps

__all__ = ["head_cost_section", "op_role"]


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
        markdown_table(
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
        markdown_table(
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
    return ["### Targets", "", markdown_table(["target", "measured", "met"], rows)]


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
    return out + [markdown_table(["head", "ms", "x trunk step", "share of trunk + head"], rows), ""]


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
            markdown_table(["op", "role", "input shapes", "calls/step", "ms/step", "share"], rows),
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
        markdown_table(
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
            markdown_table(fit["terms"], [[f"{c:.3g}" for c in fit["bytes_per_element"]]]),
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
    return ["### The input check", "", markdown_table(headers, rows)]


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
    out.append(
        markdown_table(["setting", "ms per step", "x default", "minor page faults per step"], rows)
    )
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
