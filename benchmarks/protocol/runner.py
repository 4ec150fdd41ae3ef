"""Run a benchmark config: the MLRC protocol with stock PML parts.

    python -m benchmarks.run --config benchmarks/configs/omniglot_quick.yaml
    python -m benchmarks.run --config benchmarks/configs/cub_compare.yaml \\
        --set seeds=[0,1] --set training.num_epochs=5 --out runs/

For every seed, method and fold (a "unit") it trains with
``trainers.MetricLossOnly`` (``MPerClassSampler`` batches, the method's PML
loss and miner), validates every ``test_interval`` epochs with
``testers.GlobalEmbeddingSpaceTester`` through ``logging_presets.HookContainer``
(record-keeper logs, best checkpoint by validation MAP@R, early stopping with
``patience``), reloads the best checkpoint and evaluates it on the test
classes. Results land in ``<out>/<config name>/<method>/seed<k>/fold<p>/``;
a unit whose ``results.json`` exists is skipped, and an unfinished one continues
from its last completed epoch (``resume/resume.json``), so an interrupted run is
resumed by running the same command again. At the end the per-fold results
are combined ("separate": mean over fold models; "concatenated": the fold
models' L2-normalised embeddings concatenated) and a markdown table (mean ±
95% CI over seeds) is printed and written to ``table.md`` and ``results.csv``.

This module is the command line and the loop over units, in this process or shared out
to local workers; in this package a unit is :mod:`~benchmarks.protocol.unit`, the
device, threads and progress bars :mod:`~benchmarks.protocol.execution`, the worker
processes :mod:`~benchmarks.protocol.workers`, resuming
:mod:`~benchmarks.protocol.resume`, tables and publishing
:mod:`~benchmarks.protocol.results`, provenance :mod:`~benchmarks.protocol.provenance`,
the data :mod:`~benchmarks.protocol.pipeline` and the run folder's file names
:mod:`~benchmarks.protocol.layout`.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import queue
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import tqdm

from benchmarks.cli import run_command, run_parser

from . import distributed as ddp
from .build import is_frozen_method
from .config import ConfigError, UserError, load_config, method_config, method_names
from .evaluation import report_split
from .execution import (
    compute_threads,
    config_device,
    hide_trainer_warning,
    progress_bars,
    worker_threads,
)
from .layout import CACHE, RESULTS, Log, unit_dir, unit_folds
from .pipeline import DataPipeline
from .preflight import check_methods
from .results import combine, publish_results, table_header, write_results
from .resume import check_previous
from .unit import run_unit
from .workers import LOG_FORMAT, local_processes

__all__ = ["cli_command", "main", "run_benchmark", "select_methods"]


# --------------------------------------------------------------------------- running


def select_methods(config: Mapping[str, Any], methods: Sequence[str] | None) -> list[str]:
    """The config's method names, in config order, restricted to ``methods`` when given."""
    names = method_names(config)
    if methods:
        unknown = [m for m in methods if m not in names]
        if unknown:
            raise UserError(f"--methods: unknown methods {unknown}; the config has {names}")
        names = [m for m in names if m in methods]
    return names


def run_benchmark(
    config: Mapping[str, Any],
    out: str | Path = "runs",
    methods: Sequence[str] | None = None,
    log: Log = print,
    progress: bool = True,
    publish: str | Path | None = None,
    command: str | None = None,
    workers: int = 1,
) -> dict[str, Any]:
    """Run (or resume) every unit of ``config`` and write the combined results.

    With ``workers`` > 1 the units are shared out, one at a time, to that many local
    processes (each with an equal share of the cores unless the config pins ``threads``,
    :func:`worker_threads`); their log lines reach ``log`` through this process.

    With ``publish``, the table and its provenance (``command``, by default this
    process's command line) also go to ``publish/<name>.md`` and the per-unit
    values to ``publish/<name>.csv``.

    Under ``torchrun`` every rank trains every unit (DDP, :mod:`benchmarks.protocol.distributed`)
    and rank 0 writes the results; the other ranks return ``None``. The config's
    ``threads`` holds for the run only (:func:`compute_threads`). Without ``progress`` no
    progress bar is drawn, PML's included (:func:`progress_bars`); under ``torchrun``
    only rank 0 draws them.

    Returns ``{"rows", "summary", "table", "root", "wall_time_s", "units_run", "units_skipped"}``.
    """
    if workers < 1:
        raise UserError(f"--workers must be a positive integer, got {workers}")
    if workers > 1 and ddp.launched_by_torchrun():
        raise UserError("--workers starts local processes; under torchrun leave it at 1")
    config = worker_threads(config, workers)
    with compute_threads(config.get("threads")):
        launch, device = ddp.start(config_device(config))
        try:
            with progress_bars(progress and launch.is_main):
                return _run_units(
                    config, out, methods, log, progress, publish, command, launch, device, workers
                )
        finally:
            ddp.stop(launch)


@dataclass
class _Run:
    """What every unit of one invocation shares."""

    config: Mapping[str, Any]
    root: Path
    data: DataPipeline
    device: torch.device
    hub_dir: Path
    log: Log
    launch: ddp.Launch


def _check_folds(config: Mapping[str, Any]) -> list[int]:
    """The config's ``folds``, each checked to be one of its ``num_folds``."""
    folds = [int(f) for f in config["folds"]]
    if not folds or any(not 0 <= f < int(config["num_folds"]) for f in folds):
        raise ConfigError(f"folds must be a non-empty list of ints in [0, {config['num_folds']})")
    return folds


def _processes(launch: ddp.Launch) -> str:
    """``"<n> processes x "`` under ``torchrun``, else nothing: a prefix of the thread count."""
    return f"{launch.world_size} processes x " if launch.distributed else ""


def _run_one(run: _Run, seed: int, name: str, fold: int, tag: str) -> bool:
    """Run (or skip, when finished before) one unit; whether it ran."""
    method = method_config(run.config, name)
    folder = unit_dir(run.root, name, seed, fold)
    done = run.launch.is_main and (folder / RESULTS).exists()
    if done:
        check_previous(folder, method, seed, fold)
    if run.launch.broadcast(done):
        run.log(f"{tag}: done before, skipped")
        return False
    run.log(f"{tag}: {'evaluating' if is_frozen_method(method) else 'training'}")
    result = run_unit(
        method, seed, fold, folder, run.data, run.device, run.hub_dir, run.log, run.launch
    )
    if result is None:  # not rank 0
        return True
    split = report_split(run.config)
    reported = result[split]
    run.log(
        f"{tag}: {split} P@1 {100 * reported.get('precision_at_1', float('nan')):.2f} "
        f"MAP@R {100 * reported.get('mean_average_precision_at_r', float('nan')):.2f} "
        f"(best epoch {result['best_epoch']} of {result['epochs_run']}, "
        f"{result['total_time_s']:.0f} s)"
    )
    return True


Unit = tuple[int, str, int, str]  # seed, method, fold, the log tag


def _run_all(
    run: _Run, names: Sequence[str], folds: Sequence[int], workers: int, progress: bool
) -> tuple[int, int]:
    """Every unit (seed x method x fold), in turn or over ``workers`` processes;
    ``(units run, units skipped)``."""
    config = run.config
    cells = [
        (seed, name, fold)
        for seed in config["seeds"]
        for name in names
        for fold in unit_folds(method_config(config, name))
    ]
    units = [
        (seed, name, fold, f"[{index}/{len(cells)}] seed {seed} {name} fold {fold}")
        for index, (seed, name, fold) in enumerate(cells, 1)
    ]
    done = [(unit_dir(run.root, u[1], u[0], u[2]) / RESULTS).exists() for u in units]
    pending = [unit for unit, finished in zip(units, done, strict=True) if not finished]
    spawned = min(workers, len(pending))  # nothing to train: no process to start
    where = f"{spawned} processes x " if spawned > 1 else _processes(run.launch)
    run.log(
        f"{config['name']}: {len(units)} units ({len(config['seeds'])} seeds x {len(names)} "
        f"methods x folds {list(folds)}) on {run.device}, {where}"
        f"{torch.get_num_threads()} threads -> {run.root}"
    )
    if spawned <= 1:
        ran = [_run_one(run, *unit) for unit in units]
        return sum(ran), len(ran) - sum(ran)
    # finished units are checked here, so a changed config stops the run before any process
    skipped = sum(
        not _run_one(run, *unit) for unit, finished in zip(units, done, strict=True) if finished
    )
    return _run_in_workers(run, pending, spawned, progress), skipped


def _unit_worker(
    config: Mapping[str, Any],
    root: Path,
    hub_dir: Path,
    store: Path | None,
    units: Sequence[Unit],
    taken: Any,
    messages: multiprocessing.Queue,
) -> None:
    """One of ``workers`` processes: run ``units[taken]``, advancing the shared ``taken``,
    until none is left.

    Messages: log lines (``str``); a :class:`UserError` as ``("error", text)``; last
    ``("ran", units run)``. Ctrl-C ends it with status 130.
    """
    hide_trainer_warning()
    device = config_device(config)
    ran = 0
    try:
        with compute_threads(config.get("threads")), progress_bars(False):
            data = DataPipeline(config["dataset"], log=messages.put, progress=False, store=store)
            run = _Run(config, root, data, device, hub_dir, messages.put, ddp.SINGLE_PROCESS)
            while True:
                with taken.get_lock():
                    index = taken.value
                    taken.value += 1
                if index >= len(units):
                    break
                ran += _run_one(run, *units[index])
    except UserError as error:
        messages.put(("error", str(error)))
    except KeyboardInterrupt:
        raise SystemExit(130) from None
    messages.put(("ran", ran))


def _run_in_workers(run: _Run, units: Sequence[Unit], workers: int, progress: bool) -> int:
    """``units`` (none finished before) shared out to ``workers`` spawned processes, with a
    bar over finished units; how many ran.

    A worker's :class:`UserError` stops every worker and is raised here; after a worker
    crashed, no unit is handed out any more and the others finish the one they are on.
    """
    context = multiprocessing.get_context("spawn")
    taken, messages = context.Value("i", 0), context.Queue()
    finished = [unit_dir(run.root, name, seed, fold) / RESULTS for seed, name, fold, _ in units]
    ran = 0

    def handle(message: str | tuple[str, Any]) -> None:
        nonlocal ran
        if isinstance(message, str):
            run.log(message)
        elif message[0] == "error":
            raise UserError(message[1])
        else:
            ran += int(message[1])

    args = (run.config, run.root, run.hub_dir, run.data.store, list(units), taken, messages)
    with (
        local_processes(_unit_worker, args, workers) as processes,
        tqdm.tqdm(
            total=len(units), desc=str(run.config["name"]), unit="unit", disable=not progress
        ) as bar,
    ):
        while any(process.is_alive() for process in processes):
            try:
                handle(messages.get(timeout=1.0))
            except queue.Empty:
                if any(process.exitcode not in (None, 0) for process in processes):
                    with taken.get_lock():
                        taken.value = len(units)
            bar.n = sum(path.exists() for path in finished)
            bar.refresh()
        while True:  # what the last workers sent just before they ended
            try:
                handle(messages.get_nowait())
            except queue.Empty:
                break
    return ran


def _run_units(
    config: Mapping[str, Any],
    out: str | Path,
    methods: Sequence[str] | None,
    log: Log,
    progress: bool,
    publish: str | Path | None,
    command: str | None,
    launch: ddp.Launch,
    device: torch.device,
    workers: int,
) -> dict[str, Any] | None:
    """:func:`run_benchmark`'s body, under its threads, progress bars and processes."""
    start = time.time()
    if not launch.is_main:
        log = _quiet
    root = Path(out) / str(config["name"])
    names = select_methods(config, methods)
    folds = _check_folds(config)
    hub_dir = Path(config["trunk"].get("hub_dir") or Path(out) / ".torch_hub")
    data = DataPipeline(config["dataset"], log=log, progress=progress, store=Path(out) / CACHE)
    source = data.source  # a missing dataset fails here, before any unit
    check_methods(config, names, source.num_classes, folds)  # before any folder is made
    if launch.is_main:
        root.mkdir(parents=True, exist_ok=True)
    run = _Run(config, root, data, device, hub_dir, log, launch)
    run_count, skipped = _run_all(run, names, folds, workers, progress)
    if not launch.is_main:
        return None
    rows, summary, table = combine(config, root)
    wall = time.time() - start
    heading = table_header(config, source, list(dict.fromkeys(row["method"] for row in rows)))
    footer = (
        f"\n\nThis invocation: {run_count} units run, {skipped} skipped, {wall:.0f} s wall "
        f"on {device} ({f'{workers} processes x ' if workers > 1 else _processes(launch)}"
        f"{torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs)."
    )
    metrics = list(config["eval"]["metrics"])
    write_results(root, heading + table + footer + "\n", rows, summary, metrics)
    if publish is not None:
        command = command or cli_command(sys.argv[1:])
        publish_results(
            Path(publish), config["name"], heading + table, rows, metrics, device, command, root
        )
    log("")
    log(heading + table + footer)
    published = f" and {Path(publish) / (str(config['name']) + '.md')}" if publish else ""
    log(f"\nThe table: {root / 'table.md'}{published}")
    return {
        "rows": rows,
        "summary": summary,
        "table": table,
        "root": root,
        "wall_time_s": wall,
        "units_run": run_count,
        "units_skipped": skipped,
    }


def _quiet(message: str) -> None:
    """The log of ranks other than 0: they print nothing."""


# --------------------------------------------------------------------------- command line


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return run_parser().parse_args(argv)


def cli_command(args: Sequence[str]) -> str:
    """The command line that runs this module with ``args``."""
    return "python -m benchmarks.run " + shlex.join(args)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The command line (``argv``, default ``sys.argv[1:]``): load the config and run it.

    A :class:`~benchmarks.protocol.config.UserError` (bad ``--config``, ``--set``, key, value or
    method name, missing data) prints ``benchmarks.run: error: <message>`` as one line
    to stderr and exits with status 2, as argparse does; Ctrl-C prints how to resume
    the run and exits with 130. Any other exception is a bug and propagates.
    """
    args = parse_args(argv)
    command = cli_command(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(format=LOG_FORMAT)
    logging.getLogger("PML").setLevel(logging.INFO if args.verbose else logging.WARNING)
    hide_trainer_warning()
    again = (
        f"the same torchrun command again to resume (its processes ran: {command})"
        if ddp.launched_by_torchrun()
        else f"the same command again to resume:\n  {command}"
    )
    interrupted = f"interrupted. Finished units and completed epochs are kept; run {again}"

    def benchmark() -> dict[str, Any] | None:
        return run_benchmark(
            load_config(args.config, args.overrides),
            args.out,
            methods=args.methods,
            log=lambda s: print(s, flush=True),
            progress=not args.no_progress,
            publish=args.publish,
            command=command,
            workers=args.workers,
        )

    return run_command("benchmarks.run", benchmark, interrupted)
