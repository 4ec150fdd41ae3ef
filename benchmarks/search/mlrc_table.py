"""The Metric Learning Reality Check table, with MultiHeadCRT beside every loss.

    python -m benchmarks.mlrc_table --config benchmarks/configs/omniglot7x7_mlrc13.yaml \\
        --workers 2 --publish benchmarks/results

One command, resumable at any point (run it again after an interruption):

1. :func:`benchmarks.search.tune.search` tunes every method with the same trial budget
   (``tune.trials``) on validation classes, ``--workers`` processes per study;
2. :func:`benchmarks.protocol.runner.run_benchmark` trains each method's best
   configuration for the config's seeds and folds and tests it on the test classes, the
   units shared out to ``--workers`` processes (``<name>_tuned.md`` and ``.csv`` with
   ``--publish``);
3. :func:`~benchmarks.reports.mlrc_report.mlrc_markdown` writes ``<name>_mlrc.md`` in
   the layout of MLRC's Table 4 (Musgrave, Belongie and Lim, ECCV 2020): a row per loss
   and embedder with P@1, R-Precision and MAP@R as mean ± 95% CI over seeds, "separate"
   (mean of fold models) and, where more than one fold ran, "concatenated"; the paired
   MAP@R difference MultiHeadCRT minus linear per loss; every method's budget (trials
   counted, summed trial and unit time, :func:`method_budgets`); the measured wall time
   (:class:`WallClock`); and MLRC's own published numbers in a separate block.
   :func:`~benchmarks.reports.mlrc_report.plot_mlrc` draws ``<name>_mlrc.png``: per
   loss, linear and MultiHeadCRT MAP@R with their CI bars.

Methods pair by name: ``<loss>_linear`` (MLRC's embedder, average pooling + Linear) and
``<loss>_crt`` (``MultiHeadCRT`` through ``MultiHeadLoss``); ``frozen`` is MLRC's
"Pretrained" row. Any other method name is an error before anything runs.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from benchmarks.cli import mlrc_table_parser, run_command
from benchmarks.protocol.config import load_config, method_names
from benchmarks.protocol.layout import write_atomic
from benchmarks.protocol.provenance import unit_seconds
from benchmarks.protocol.runner import run_benchmark, select_methods
from benchmarks.reports.mlrc_report import MethodBudget, loss_rows, mlrc_markdown, plot_mlrc

from . import tune
from .trials import counted_trials, trial_minutes

__all__ = ["WallClock", "build_table", "main", "method_budgets"]


def method_budgets(
    studies: Mapping[str, Any], budget: int, run_root: Path, names: Sequence[str]
) -> dict[str, MethodBudget]:
    """Every method's counted trials and summed trial time, and its final units' time."""
    out = {}
    for name in names:
        study = studies.get(name)
        counted = counted_trials(study, budget) if study is not None else []
        pruned = sum(t.state == TrialState.PRUNED for t in counted)
        out[name] = MethodBudget(
            complete=len(counted) - pruned,
            pruned=pruned,
            tuning_min=trial_minutes(study) if study is not None else 0.0,
            final_min=sum(unit_seconds(run_root, name)) / 60,
        )
    return out


class WallClock:
    """The wall time of every invocation, per stage, kept in ``path`` across resumptions."""

    def __init__(self, path: Path, every_s: float = 60.0) -> None:
        self.path = path
        self.every_s = every_s
        self.past = json.loads(path.read_text()) if path.exists() else []
        self.now: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as ``name``, written every ``every_s`` seconds and at its end.

        An invocation killed without warning (no ``finally`` runs) so loses at most
        ``every_s`` seconds of its record.
        """
        before, start = self.now.get(name, 0.0), time.monotonic()
        done = threading.Event()

        def save() -> None:
            self.now[name] = before + (time.monotonic() - start) / 60
            write_atomic(self.path, json.dumps([*self.past, self.now], indent=2))

        def beat() -> None:
            while not done.wait(self.every_s):
                save()

        writer = threading.Thread(target=beat, name=f"wall clock {name}", daemon=True)
        writer.start()
        try:
            yield
        finally:
            done.set()
            writer.join()
            save()

    def totals(self) -> dict[str, float]:
        records = [*self.past, self.now]
        tune_min = sum(r.get("tune", 0.0) for r in records)
        final_min = sum(r.get("final", 0.0) for r in records)
        return {
            "tune_min": tune_min,
            "final_min": final_min,
            "total_min": tune_min + final_min,
            "invocations": len(records),
        }


def build_table(
    config: Mapping[str, Any],
    out: Path,
    workers: int = 1,
    progress: bool = True,
    publish: Path | None = None,
    command: str | None = None,
    log: Callable[[str], None] = print,
    methods: Sequence[str] | None = None,
    trials: int | None = None,
) -> str:
    """Tune, run the best configurations, write ``<name>_mlrc.md`` and its plot; return the text.

    ``methods`` and ``trials`` narrow the table (a try in minutes): only those methods,
    with that many trials each instead of ``tune.trials``.
    """
    names = select_methods(config, methods) if methods else method_names(config)
    budget = int(trials if trials is not None else config["tune"]["trials"])
    groups = loss_rows(names)
    clock = WallClock(out / str(config["name"]) / "mlrc_wall.json")
    command = command or "benchmarks.search.mlrc_table.build_table(...) from Python"
    with clock.stage("tune"):
        searched = tune.search(
            config,
            out,
            methods=names,
            trials=budget,
            workers=workers,
            progress=progress,
            publish=publish,
            log=log,
            command=command,
        )
    tuned = load_config(str(searched["folder"] / "best.yaml"))
    with clock.stage("final"):
        result = run_benchmark(
            tuned,
            out,
            log=log,
            progress=progress,
            publish=publish,
            command=command,
            workers=workers,
        )
    budgets = method_budgets(searched["studies"], budget, Path(result["root"]), names)
    spent = {**config, "tune": {**config["tune"], "trials": budget}}  # what the search spent
    text = mlrc_markdown(spent, result["rows"], budgets, clock.totals(), command, tuned["name"])
    folder = out / str(config["name"])
    for target in [folder, *([publish] if publish is not None else [])]:
        target.mkdir(parents=True, exist_ok=True)
        write_atomic(target / f"{config['name']}_mlrc.md", text)
        plot_mlrc(result["rows"], groups, target / f"{config['name']}_mlrc.png", config["name"])
    log(text)
    reports = [str(target / f"{config['name']}_mlrc.md") for target in [folder, publish] if target]
    log(f"\nThe report: {' and '.join(reports)}")
    return text


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return mlrc_table_parser().parse_args(argv)


def main(argv: Sequence[str] | None = None) -> str | None:
    """The command line; user errors print one line and exit 2, Ctrl-C says how to resume."""
    args = parse_args(argv)
    command = "python -m benchmarks.mlrc_table " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    tune.quiet_optuna()

    def table() -> str:
        config = load_config(args.config, args.overrides)
        return build_table(
            config,
            args.out,
            workers=args.workers,
            progress=not args.no_progress,
            publish=args.publish,
            command=command,
            log=lambda message: print(message, flush=True),
            methods=args.methods,
            trials=args.trials,
        )

    interrupted = f"interrupted; finished trials and units are kept, run again:\n  {command}"
    return run_command("benchmarks.mlrc_table", table, interrupted)
