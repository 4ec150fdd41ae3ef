"""Learning-rate robustness: each head's validation MAP@R over a grid of head learning rates.

    python -m benchmarks.lr_sweep --config benchmarks/configs/<name>.yaml
        [--methods NAME ...] [--lrs 1e-5 1e-4 1e-3 1e-2] [--seeds 0 1 2]
        [--out runs/] [--set KEY=VALUE ...] [--publish DIR] [--no-progress]

Every chosen method of the config is run once per learning rate, with the same
budget, on validation classes only (``eval.split: val``): the default optimiser
(the heads' and parametric losses') gets the learning rate, and the trunk keeps
the optimiser it has in the config (its ``trunk`` one, or else the default one
at the config's learning rate), so only the head's learning rate varies and a
collapse at a high rate is the head's, not the trunk's. The
runs are ordinary runner units in ``<out>/<name>_lr_sweep/`` (resumable); the
published files are the runner's table (``<name>_lr_sweep.md``/``.csv``) plus a
pivot, ``<name>_lr_sweep_by_lr.md``, one row per head and one column per
learning rate, and its plot ``<name>_lr_sweep_by_lr.png``.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from benchmarks.cli import run_command
from benchmarks.protocol.config import load_config, method_config
from benchmarks.protocol.layout import write_atomic
from benchmarks.protocol.runner import run_benchmark, select_methods
from benchmarks.reports.markdown import markdown_table

__all__ = ["lr_label", "main", "pivot_table", "sweep_config"]

PRIMARY = "mean_average_precision_at_r"


def lr_label(lr: float) -> str:
    """``1e-3`` -> ``"lr1e-03"``: a method-name suffix that sorts and reads back."""
    return f"lr{lr:.0e}"


def sweep_config(
    config: Mapping[str, Any], methods: Sequence[str], lrs: Sequence[float]
) -> dict[str, Any]:
    """``config`` with one method per (method, learning rate), on validation classes."""
    swept: dict[str, Any] = {}
    for name in methods:
        base = method_config(config, name)
        default = base["optimizers"]["default"]
        trunk = base["optimizers"].get("trunk") or default
        for lr in lrs:
            method = copy.deepcopy(config["methods"][name])
            optimizers = method.setdefault("optimizers", {})
            optimizers["default"] = {**default, "kwargs": {**default["kwargs"], "lr": lr}}
            optimizers["trunk"] = copy.deepcopy(trunk)
            swept[f"{name}_{lr_label(lr)}"] = method
    out = {k: copy.deepcopy(v) for k, v in config.items() if k != "methods"}
    out["name"] = f"{config['name']}_lr_sweep"
    out["eval"] = {**config["eval"], "split": "val"}
    out["methods"] = swept
    return out


def pivot_table(
    summary: Sequence[Mapping[str, Any]], methods: Sequence[str], lrs: Sequence[float]
) -> str:
    """Markdown: validation MAP@R (percent, mean ± 95% CI) per head and learning rate."""
    cells = {
        entry["method"]: entry[PRIMARY]
        for entry in summary
        if entry.get("evaluation", "separate") == "separate"
    }
    header = ["head"] + [f"{lr:g}" for lr in lrs] + ["best lr", "lrs within 2 points of best"]
    body = []
    for name in methods:
        values = [cells.get(f"{name}_{lr_label(lr)}") for lr in lrs]
        row = [name]
        for value in values:
            if value is None:
                row.append("-")
            else:
                half = value["ci95"]
                row.append(
                    f"{100 * value['mean']:.2f}" + ("" if half is None else f" ± {100 * half:.2f}")
                )
        means = [None if v is None else v["mean"] for v in values]
        known = [m for m in means if m is not None]
        if known:
            best = max(known)
            row.append(f"{lrs[means.index(best)]:g}")
            row.append(
                ", ".join(
                    f"{lr:g}"
                    for lr, m in zip(lrs, means, strict=True)
                    if m is not None and best - m <= 0.02
                )
            )
        else:
            row += ["-", "-"]
        body.append(row)
    return markdown_table(header, body) + "\n"


def plot_sweep(
    summary: Sequence[Mapping[str, Any]], methods: Sequence[str], lrs: Sequence[float], path: Path
) -> None:
    """Validation MAP@R against the learning rate (log axis), one line per head, CI bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = {e["method"]: e[PRIMARY] for e in summary if e.get("evaluation") == "separate"}
    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    for name in methods:
        points = [(lr, cells.get(f"{name}_{lr_label(lr)}")) for lr in lrs]
        points = [(lr, v) for lr, v in points if v is not None]
        if not points:
            continue
        axis.errorbar(
            [lr for lr, _ in points],
            [100 * v["mean"] for _, v in points],
            yerr=[100 * (v["ci95"] or 0.0) for _, v in points],
            marker="o",
            capsize=3,
            label=name,
        )
    axis.set_xscale("log")
    axis.set_xlabel("head learning rate (Adam)")
    axis.set_ylabel("validation MAP@R (%)")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.lr_sweep", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--config", required=True)
    parser.add_argument("--methods", nargs="+", default=None, help="heads to sweep (default: all)")
    parser.add_argument("--lrs", nargs="+", type=float, default=[1e-5, 1e-4, 1e-3, 1e-2])
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", default="runs")
    parser.add_argument("--publish", default=None, metavar="DIR")
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--workers", type=int, default=1, help="local processes that share the units (default 1)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    command = "python -m benchmarks.lr_sweep " + shlex.join(sys.argv[1:] if argv is None else argv)

    def sweep() -> dict[str, Any]:
        config = load_config(args.config, args.overrides)
        names = [n for n in select_methods(config, args.methods) if _trained(config, n)]
        swept = sweep_config(config, names, args.lrs)
        result = run_benchmark(
            swept,
            args.out,
            progress=not args.no_progress,
            publish=args.publish,
            command=command,
            workers=args.workers,
        )
        text = (
            f"## {swept['name']}: validation MAP@R by head learning rate\n\n"
            + pivot_table(result["summary"], names, args.lrs)
            + f"\nValidation classes only; table, provenance and seeds: `{swept['name']}.md`. "
            f"Command: `{command}`.\n"
        )
        folder = Path(result["root"])
        write_atomic(folder / f"{swept['name']}_by_lr.md", text)
        plot_sweep(result["summary"], names, args.lrs, folder / f"{swept['name']}_by_lr.png")
        if args.publish is not None:
            target = Path(args.publish)
            write_atomic(target / f"{swept['name']}_by_lr.md", text)
            plot_sweep(result["summary"], names, args.lrs, target / f"{swept['name']}_by_lr.png")
        print(text)
        return result

    return run_command("benchmarks.lr_sweep", sweep, f"resume with: {command}")


def _trained(config: Mapping[str, Any], name: str) -> bool:
    """A method with something to train (not the frozen trunk)."""
    return method_config(config, name)["embedder"].get("type") != "frozen"
