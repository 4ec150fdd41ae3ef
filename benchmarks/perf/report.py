"""Write ``benchmarks/results/perf.md`` and its plots from the perf scripts' JSON.

Usage::

    python -m benchmarks.perf.report [--quick] [--results benchmarks/results/perf]
                                     [--md benchmarks/results/perf.md]

Reads ``head_cost.json``, ``compile.json``, ``eval_scale.json`` and
``model_changes.json`` (the ``*_quick.json`` files with ``--quick``) from
``--results``, whichever exist, and writes the Markdown report plus PNG plots
(matplotlib, Agg) next to the JSON. Every number in the report is read from
those files; the text around them only names what they are. This module reads them
and writes the summary and the machine; the sections are
:mod:`~benchmarks.perf.report_head_cost` and :mod:`~benchmarks.perf.report_comparisons`,
the plots :mod:`~benchmarks.perf.report_plots`.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from benchmarks.reports.markdown import markdown_table

from .common import DEFAULT_OUT
from .report_common import FLOP_TARGET, NETVLAD_TARGET, point_label, ratio
from .report_comparisons import changes_section, compile_section, eval_section, step_time_section
from .report_head_cost import head_cost_section, op_role


def load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.exists() else None


MACHINE_FIELDS = (
    ("CPU", "cpu_model"),
    ("logical CPUs", "logical_cpus"),
    ("usable CPUs", "usable_cpus"),
    ("memory (GiB)", "memory_gib"),
    ("python", "python"),
    ("torch", "torch"),
    ("PML", "pytorch_metric_learning"),
    ("faiss", "faiss"),
)


def machine_rows(runs: dict[str, dict]) -> list[list]:
    """One row per distinct machine: the results measured on it, then its fields."""
    by_machine: dict[tuple, list[str]] = {}
    for name, run in runs.items():
        key = tuple(run["machine"][field] for _, field in MACHINE_FIELDS)
        by_machine.setdefault(key, []).append(name)
    return [[", ".join(names), *key] for key, names in by_machine.items()]


def machine_section(runs: dict[str, dict]) -> str:
    out = ["## Machine and reproduction", ""]
    out.append(
        markdown_table(["results", *(label for label, _ in MACHINE_FIELDS)], machine_rows(runs))
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
        markdown_table(
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
        "JSON files. Every ratio compares functions timed in the same run; times from results "
        "measured on different machines (the first table) are not comparable with each other.",
        "",
    ]
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
