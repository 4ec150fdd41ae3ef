"""Sections 2 to 5 of ``perf.md``: timings side by side, one JSON file each.

``torch.compile`` against eager (:func:`compile_section`), the k-NN evaluation methods
at SOP scale (:func:`eval_section`), the model code after against before a change
(:func:`changes_section`) and one training step now against a baseline revision
(:func:`step_time_section`).
"""

from __future__ import annotations

from pathlib import Path

from benchmarks.reports.markdown import markdown_table

from .report_common import mib, ms, ratio
from .report_plots import plot_eval

__all__ = ["changes_section", "compile_section", "eval_section", "step_time_section"]


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
        markdown_table(
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
        markdown_table(
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
        out.append(markdown_table(["counting", "N", "classes", "CPU s", "extra peak MiB"], rows))
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
    out += [markdown_table(header, rows), ""]
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
        markdown_table(
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
