"""Fair tuning: an Optuna search per method on validation classes, as MLRC tuned every loss.

    python -m benchmarks.tune --config benchmarks/configs/<name>.yaml [--trials N]
        [--methods NAME ...] [--workers K] [--storage URL] [--out runs/]
        [--set KEY=VALUE ...] [--publish DIR] [--no-progress]

Every method of the config gets its own study with the same trial budget
(``tune.trials``, or ``--trials``). A trial samples the method's
``search_space`` (declared next to the method in the YAML; a top-level
``search_space`` applies to every method), trains the runner's units for
``tune.seeds`` x ``tune.folds`` exactly as :func:`benchmarks.protocol.unit.run_unit` does
(early stopping included) with ``eval.split: val``, so the test classes are
never embedded, and returns their mean validation ``eval.primary_metric``
(MAP@R). Each epoch's validation value is reported to the pruner (median or
successive halving), which stops hopeless trials.

The studies live in ``<out>/<name>/tune/optuna.journal`` (Optuna's journal file
storage) or in ``--storage URL`` (an Optuna RDB URL, e.g. PostgreSQL, so that
processes on several machines share them); ``--workers K`` runs K local
processes on each study. Each trial's units (config, record-keeper logs,
checkpoints) are under ``<out>/<name>/tune/<method>/trial<NNNN>/``. A search
that was killed or interrupted resumes when the same command runs again: a
trial whose process died is marked failed and re-queued with its parameters
and its folder, whose units resume from their last validated epoch, so no
trial is lost or run twice. Only complete and pruned trials count towards the
budget.

When every study has its budget, ``best.yaml`` (the config with each method's
best parameters, for ``python -m benchmarks.run --config .../best.yaml``) and
a report (best parameters, budget, search space, the best trial's validation
curve, Optuna's optimisation history and parameter importances) are written to
the tune folder, and with ``--publish DIR`` to ``DIR/<name>_tuning.*``.

This module is the command and the loop over studies; in this package the search
spaces are :mod:`~benchmarks.search.space`, the storage
:mod:`~benchmarks.search.storage`, a study's trials :mod:`~benchmarks.search.trials`,
a trial :mod:`~benchmarks.search.objective`, one study's loop
:mod:`~benchmarks.search.study`, ``best.yaml`` :mod:`~benchmarks.search.best_config`
and the report :mod:`~benchmarks.search.tuning_report`.
"""

from __future__ import annotations

import argparse
import multiprocessing
import shlex
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import optuna
import tqdm
from optuna.trial import TrialState

from benchmarks.cli import run_command, tune_parser
from benchmarks.protocol.config import ConfigError, UserError, load_config, method_config
from benchmarks.protocol.execution import (
    compute_threads,
    config_device,
    hide_trainer_warning,
    progress_bars,
    worker_threads,
)
from benchmarks.protocol.runner import select_methods
from benchmarks.protocol.workers import local_processes

from .best_config import best_params
from .objective import unit_runner
from .space import check_search, search_space
from .storage import JOURNAL, check_storage_url, open_storage, study_name
from .study import tune_method
from .trials import counted_trials, finished_trials, requeue_dead_trials
from .tuning_report import report_search

__all__ = ["main", "quiet_optuna", "search"]

STARTUP_TIMEOUT_S = 600.0  # how long the workers of a study wait for each other to start


def _worker(
    config: Mapping[str, Any],
    method: str,
    storage: str,
    folder: Path,
    out: Path,
    budget: int,
    ready: Any,
) -> None:
    """One worker process of ``--workers K``: trials of one study until the budget is used.

    The workers wait at the barrier ``ready`` until all have started (their imports
    done), so that a slow start does not leave one of them without a trial. A spawned
    process does not inherit its parent's Optuna log level: it sets its own.
    """
    quiet_optuna()
    device = config_device(config)
    with compute_threads(config.get("threads")), progress_bars(False):
        runner = unit_runner(config, out, device, progress=False)
        try:
            ready.wait(timeout=STARTUP_TIMEOUT_S)
        except threading.BrokenBarrierError:  # another worker died while starting
            pass
        storage_ = open_storage(storage, config["tune"]["heartbeat_interval"])
        tune_method(config, method, storage_, folder, runner, budget)


def search(
    config: Mapping[str, Any],
    out: str | Path = "runs",
    methods: Sequence[str] | None = None,
    trials: int | None = None,
    workers: int = 1,
    storage: str | None = None,
    progress: bool = True,
    publish: str | Path | None = None,
    log: Callable[[str], None] = print,
    command: str | None = None,
) -> dict[str, Any]:
    """Tune every method of ``config`` (or ``methods``) and write the report and ``best.yaml``.

    Returns ``{"studies": {method: Study}, "best": {method: params}, "folder": Path}``.
    """
    out = Path(out)
    names = select_methods(config, methods)
    budget = int(trials if trials is not None else config["tune"]["trials"])
    if budget < 1:
        raise ConfigError(f"--trials (tune.trials) must be a positive integer, got {budget}")
    if workers < 1:
        raise UserError(f"--workers must be a positive integer, got {workers}")
    spaces = {name: search_space(method_config(config, name)) for name in names}
    check_search(config, names, spaces)
    if storage is not None and "://" in storage:
        check_storage_url(storage)
    folder = out / str(config["name"]) / "tune"
    folder.mkdir(parents=True, exist_ok=True)
    storage = storage or str(folder / JOURNAL)
    opened = open_storage(storage, config["tune"]["heartbeat_interval"])
    config = worker_threads(config, workers)
    log(
        f"{config['name']}: tuning {names} with {budget} trials each (validation classes, "
        f"folds {config['tune']['folds']}, seeds {config['tune']['seeds']}), {workers} "
        f"worker(s), storage {storage}"
    )
    studies = {}
    for name in names:
        study = optuna.create_study(
            study_name=study_name(config, name),
            storage=opened,
            direction="maximize",
            load_if_exists=True,
        )
        if not spaces[name]:
            log(f"{name}: nothing to tune (no search_space); it keeps its config")
            continue
        requeued = requeue_dead_trials(study)
        if requeued:
            log(f"{name}: trials {requeued} stopped before they finished; running them again")
        with _TrialBar(name, budget, progress) as bar:
            bar.update(study)
            if finished_trials(study) >= budget:
                log(f"{name}: its {budget} trials finished before; nothing to run")
            elif workers == 1:
                device = config_device(config)
                with compute_threads(config.get("threads")), progress_bars(False):
                    runner = unit_runner(config, out, device, progress=progress)
                    tune_method(config, name, opened, folder, runner, budget, bar.update)
            else:
                _run_workers(config, name, storage, folder, out, budget, workers, bar, opened)
        studies[name] = optuna.load_study(study_name=study_name(config, name), storage=opened)
    best = {name: best_params(studies[name], spaces[name], budget) for name in studies}
    report_search(config, names, studies, spaces, budget, folder, publish, command)
    log(
        f"{config['name']}: report {folder / (str(config['name']) + '_tuning.md')}, best "
        f"parameters {folder / 'best.yaml'}; the final runs on the test classes:\n"
        f"  python -m benchmarks.run --config {folder / 'best.yaml'}"
    )
    return {"studies": studies, "best": best, "folder": folder}


class _TrialBar:
    """A progress bar over one study's budget, with the best value so far."""

    def __init__(self, method: str, budget: int, shown: bool) -> None:
        self.budget = budget
        self.bar = tqdm.tqdm(total=budget, desc=f"tuning {method}", unit="trial", disable=not shown)

    def update(self, study: optuna.Study) -> None:
        counted = counted_trials(study, self.budget)
        self.bar.n = len(counted)
        best = max((t.value for t in counted if t.state == TrialState.COMPLETE), default=None)
        pruned = sum(t.state == TrialState.PRUNED for t in counted)
        best_text = "-" if best is None else f"{100 * best:.2f}"
        self.bar.set_postfix_str(f"best val {best_text}, pruned {pruned}")
        self.bar.refresh()

    def __enter__(self) -> _TrialBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.bar.close()


def _run_workers(
    config: Mapping[str, Any],
    method: str,
    storage: str,
    folder: Path,
    out: Path,
    budget: int,
    workers: int,
    bar: _TrialBar,
    opened: optuna.storages.BaseStorage,
) -> None:
    """``workers`` processes on one study; the bar follows the storage until they end."""
    ready = multiprocessing.get_context("spawn").Barrier(workers)
    args = (config, method, storage, folder, out, budget, ready)
    with local_processes(_worker, args, workers) as processes:
        study = optuna.load_study(study_name=study_name(config, method), storage=opened)
        while any(process.is_alive() for process in processes):
            if any(process.exitcode not in (None, 0) for process in processes):
                ready.abort()  # a worker died starting: the others need not wait for it
            bar.update(study)
            time.sleep(1.0)
    bar.update(study)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return tune_parser().parse_args(argv)


def quiet_optuna() -> None:
    """Optuna's log at ERROR and no warning per logged loss tensor: a command line's setting.

    Optuna logs a failed trial (Ctrl-C, a user error) as a WARNING with its traceback
    before it re-raises; the command line then says it in one line, and a bug's own
    traceback still propagates.
    """
    hide_trainer_warning()
    optuna.logging.set_verbosity(optuna.logging.ERROR)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The command line; user errors print one line and exit 2, Ctrl-C says how to resume."""
    args = parse_args(argv)
    command = "python -m benchmarks.tune " + shlex.join(sys.argv[1:] if argv is None else argv)
    quiet_optuna()
    interrupted = "interrupted; finished trials are kept, run the same command again to resume"

    def tune() -> dict[str, Any]:
        return search(
            load_config(args.config, args.overrides),
            args.out,
            methods=args.methods,
            trials=args.trials,
            workers=args.workers,
            storage=args.storage,
            progress=not args.no_progress,
            publish=args.publish,
            log=lambda message: print(message, flush=True),
            command=command,
        )

    return run_command("benchmarks.tune", tune, f"{interrupted}:\n  {command}")
