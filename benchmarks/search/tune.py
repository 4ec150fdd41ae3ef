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

Search-space entries map a dotted config key (relative to the method's config)
to one of::

    {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
    {type: int, low: 4, high: 64, step: 4}          # log: true also allowed
    {type: categorical, choices: [kl, mse, [16, 128]]}

``null`` removes an entry inherited from the top-level ``search_space``.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import shlex
import shutil
import socket
import sys
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from itertools import product
from pathlib import Path
from typing import Any, NoReturn

import optuna
import tqdm
import yaml
from optuna.trial import TrialState

from benchmarks.cli import run_command, tune_parser
from benchmarks.protocol.build import check_arguments
from benchmarks.protocol.config import (
    ConfigError,
    UserError,
    apply_override,
    load_config,
    method_config,
)
from benchmarks.protocol.data import load_source
from benchmarks.protocol.execution import (
    compute_threads,
    config_device,
    hide_trainer_warning,
    progress_bars,
    worker_threads,
)
from benchmarks.protocol.layout import CACHE, RESULTS, write_atomic
from benchmarks.protocol.pipeline import DataPipeline
from benchmarks.protocol.preflight import check_methods
from benchmarks.protocol.provenance import environment
from benchmarks.protocol.resume import check_previous
from benchmarks.protocol.runner import select_methods
from benchmarks.protocol.unit import run_unit
from benchmarks.protocol.workers import local_processes
from pml_crt.utils.validation import NonFiniteError

__all__ = [
    "OverBudget",
    "SearchSpaceError",
    "apply_params",
    "best_config",
    "check_search",
    "check_storage_url",
    "best_trial",
    "counted_trials",
    "decode_params",
    "main",
    "make_objective",
    "make_pruner",
    "make_sampler",
    "open_storage",
    "quiet_optuna",
    "report_search",
    "requeue_dead_trials",
    "search",
    "search_space",
    "suggest",
    "trial_config",
    "trial_minutes",
    "tune_method",
    "unit_runner",
]

SPACE_TYPES = ("float", "int", "categorical")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
STARTUP_TIMEOUT_S = 600.0  # how long the workers of a study wait for each other to start
JOURNAL = "optuna.journal"


class SearchSpaceError(ConfigError):
    """A search-space entry that cannot be sampled or does not fit the config."""


def _check_entry(key: str, spec: Any, where: str) -> dict[str, Any]:
    name = f"{where}search_space[{key!r}]"
    if not isinstance(spec, Mapping) or spec.get("type") not in SPACE_TYPES:
        raise SearchSpaceError(f"{name} must be a mapping with type one of {SPACE_TYPES}")
    kind = spec["type"]
    allowed = {"float": {"low", "high", "log", "step"}, "int": {"low", "high", "log", "step"}}
    allowed["categorical"] = {"choices"}
    unknown = set(spec) - allowed[kind] - {"type"}
    if unknown:
        raise SearchSpaceError(f"{name} has unknown keys {sorted(unknown)} for type {kind}")
    if kind == "categorical":
        choices = spec.get("choices")
        if not isinstance(choices, list) or not choices:
            raise SearchSpaceError(f"{name}: choices must be a non-empty list")
        return {"type": kind, "choices": list(choices)}
    number = float if kind == "float" else int
    low, high = spec.get("low"), spec.get("high")
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (low, high)):
        raise SearchSpaceError(f"{name}: low and high must be numbers, got {low!r}, {high!r}")
    if kind == "int" and not all(float(v).is_integer() for v in (low, high)):
        raise SearchSpaceError(f"{name}: an int range needs integer low and high")
    log = bool(spec.get("log", False))
    if not low < high or (log and low <= 0):
        raise SearchSpaceError(f"{name}: needs low < high (and low > 0 with log), got {spec}")
    entry = {"type": kind, "low": number(low), "high": number(high), "log": log}
    if spec.get("step") is not None:
        if log:
            raise SearchSpaceError(f"{name}: step and log cannot be combined")
        entry["step"] = number(spec["step"])
    return entry


def search_space(config: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The checked search space of one method's config (``method_config``), in key order."""
    where = f"methods.{config.get('method')}." if config.get("method") else ""
    space = config.get("search_space") or {}
    if not isinstance(space, Mapping):
        raise SearchSpaceError(f"{where}search_space must be a mapping of dotted keys")
    checked = {str(k): _check_entry(str(k), v, where) for k, v in space.items() if v is not None}
    for key, entry in checked.items():
        example = entry["choices"][0] if entry["type"] == "categorical" else entry["low"]
        try:
            apply_params(config, {key: example})
        except (ValueError, KeyError, IndexError) as error:
            message = f"{where}search_space[{key!r}] does not fit the config: {error}"
            raise SearchSpaceError(message) from None
    return checked


def _encoded_choices(entry: Mapping[str, Any]) -> list[Any]:
    """Optuna's categorical values are scalars: other YAML values travel as JSON text."""
    return [
        c if c is None or isinstance(c, (bool, int, float, str)) else json.dumps(c)
        for c in entry["choices"]
    ]


def suggest(trial: optuna.Trial, space: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Sample every entry of ``space``; returns ``{dotted key: value}``."""
    params: dict[str, Any] = {}
    for key, entry in space.items():
        if entry["type"] == "categorical":
            encoded = _encoded_choices(entry)
            value = trial.suggest_categorical(key, encoded)
            params[key] = entry["choices"][encoded.index(value)]
        else:
            suggest_number = trial.suggest_float if entry["type"] == "float" else trial.suggest_int
            options = {"log": entry["log"]}
            if "step" in entry:
                options["step"] = entry["step"]
            params[key] = suggest_number(key, entry["low"], entry["high"], **options)
    return params


def decode_params(space: Mapping[str, Mapping[str, Any]], raw: Mapping[str, Any]) -> dict[str, Any]:
    """Optuna's stored ``trial.params`` back to config values (JSON-encoded choices decoded)."""
    params = {}
    for key, value in raw.items():
        entry = space.get(key)
        if entry is not None and entry["type"] == "categorical":
            value = entry["choices"][_encoded_choices(entry).index(value)]
        params[key] = value
    return params


def apply_params(config: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` with each ``{dotted key: value}`` set (the parents must exist)."""
    result = json.loads(json.dumps(config))
    for key, value in params.items():
        keys = key.split(".")
        node: Any = result
        for part in keys[:-1]:
            node = node[int(part)] if isinstance(node, list) else node[part]
            if not isinstance(node, (dict, list)):
                raise ValueError(f"{key}: {part} is {node!r}, not a mapping or list")
        apply_override(result, keys, value)
    return result


def trial_config(method: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """The unit config of a trial: the params applied, validation classes only."""
    tune = method["tune"]
    config = apply_params(method, params)
    config["seeds"], config["folds"] = list(tune["seeds"]), list(tune["folds"])
    config["eval"]["split"] = "val"  # the test classes are never embedded
    config["eval"]["save_embeddings"] = False
    return config


def _a_value(entry: Mapping[str, Any]) -> Any:
    """One value of a search-space entry: its first choice, or its lower bound."""
    return entry["choices"][0] if entry["type"] == "categorical" else entry["low"]


def check_search(
    config: Mapping[str, Any], names: Sequence[str], spaces: Mapping[str, Mapping[str, Any]]
) -> None:
    """Everything :func:`search` can check before its first trial (a ``UserError`` if not).

    The data root, each method's arguments and batch
    (:func:`~benchmarks.protocol.preflight.check_methods` on the tuning folds), and every
    search-space key with a value of its space put in, so that a key the method's class
    does not take is named before any trial.
    """
    source = load_source(config["dataset"])
    check_methods(config, names, source.num_classes, config["tune"]["folds"])
    for name in names:
        for key, entry in spaces[name].items():
            method = apply_params(method_config(config, name), {key: _a_value(entry)})
            try:
                check_arguments(method)
            except ConfigError as error:
                raise SearchSpaceError(f"{name}: search_space key {key!r}: {error}") from None


def study_name(config: Mapping[str, Any], method: str) -> str:
    return f"{config['name']}/{method}"


def check_storage_url(storage: str) -> None:
    """Raise a one-line ``UserError`` unless the RDB URL ``storage`` can be used now.

    Its database driver must be installed (SQLAlchemy maps a bare ``postgresql://`` to
    psycopg 3, which pml-crt does not install; ``postgresql+psycopg2://`` uses the
    ``psycopg2-binary`` of the ``test`` extra) and its server must answer.
    """
    import sqlalchemy

    try:
        url = sqlalchemy.engine.make_url(storage)
        dialect = url.get_dialect()
    except (sqlalchemy.exc.ArgumentError, sqlalchemy.exc.NoSuchModuleError) as error:
        scheme = storage.split("://")[0]
        raise UserError(
            f"--storage {scheme}://...: not a database URL SQLAlchemy knows ({error})"
        ) from None
    shown = url.render_as_string(hide_password=True)
    try:
        dialect.import_dbapi()
    except ImportError as error:
        fix = (
            "use postgresql+psycopg2://... (pip install psycopg2-binary)"
            if url.get_backend_name() == "postgresql"
            else f"install the driver for {url.drivername}"
        )
        raise UserError(
            f"--storage {shown}: its database driver is not installed ({error}); {fix}"
        ) from None
    engine = sqlalchemy.create_engine(url, connect_args=_connect_timeout(url))
    try:
        with engine.connect():
            pass
    except sqlalchemy.exc.DBAPIError as error:
        reason = str(error.orig).strip().splitlines()[0] if error.orig else str(error)
        raise UserError(
            f"--storage {shown}: cannot connect ({reason}); start the server or fix the URL"
        ) from None
    finally:
        engine.dispose()


def _connect_timeout(url: Any) -> dict[str, Any]:
    """A short connection timeout, for the drivers that take one."""
    return {"connect_timeout": 10} if url.get_backend_name() == "postgresql" else {}


def open_storage(storage: str, heartbeat: int | None = None) -> optuna.storages.BaseStorage:
    """An RDB URL (``postgresql://...``, ``sqlite:///...``) or the path of a journal file.

    With ``heartbeat`` (seconds) an RDB storage runs Optuna's heartbeat: a running trial
    whose worker, on any machine, stopped beating for ``2 * heartbeat`` seconds is
    failed and queued again by Optuna's ``RetryHeartbeatStaleTrialCallback``. A journal file has
    no heartbeat; :func:`requeue_dead_trials` looks for dead processes on this host.
    """
    if "://" in storage:
        if heartbeat is None:
            return optuna.storages.RDBStorage(storage)
        return optuna.storages.RDBStorage(
            storage,
            heartbeat_interval=int(heartbeat),
            grace_period=2 * int(heartbeat),
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(),
        )
    backend = optuna.storages.journal.JournalFileBackend(storage)
    return optuna.storages.journal.JournalStorage(backend)


def make_sampler(tune: Mapping[str, Any], trials_so_far: int) -> optuna.samplers.TPESampler:
    """TPE seeded by ``tune.seed`` and the number of trials before this one.

    Re-seeding per trial makes the sequence of proposals a function of the
    study's history only, so a resumed search proposes what an uninterrupted
    one would have.
    """
    return optuna.samplers.TPESampler(
        seed=int(tune["seed"]) + trials_so_far, **dict(tune.get("sampler") or {})
    )


def make_pruner(tune: Mapping[str, Any]) -> optuna.pruners.BasePruner:
    """``tune.pruner``: ``median`` (MedianPruner), ``successive_halving`` or ``none``."""
    spec = dict(tune.get("pruner") or {"name": "none"})
    kwargs = dict(spec.get("kwargs") or {})
    pruners = {
        "median": optuna.pruners.MedianPruner,
        "successive_halving": optuna.pruners.SuccessiveHalvingPruner,
        "none": optuna.pruners.NopPruner,
    }
    if spec.get("name") not in pruners:
        raise ValueError(
            f"tune.pruner.name must be one of {sorted(pruners)}, got {spec.get('name')!r}"
        )
    return pruners[spec["name"]](**kwargs)


def root_number(trial: optuna.trial.FrozenTrial) -> int:
    """The number of the first attempt of a trial (retries keep its folder).

    A retry queued here carries ``retry_of``; one queued by Optuna's heartbeat
    (``RetryHeartbeatStaleTrialCallback``) carries its ``retry_history``.
    """
    history = trial.system_attrs.get("retry_history") or [trial.number]
    return int(trial.user_attrs.get("retry_of", history[0]))


def _beats(study: optuna.Study) -> bool:
    """Whether the study's storage runs Optuna's heartbeat (an RDB storage opened with one)."""
    storage = study._storage  # noqa: SLF001 (Optuna exposes no public accessor)
    return getattr(storage, "get_heartbeat_interval", lambda: None)() is not None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_dead_trials(study: optuna.Study) -> list[int]:
    """Fail the trials whose process died on this host and queue each failed trial again.

    A trial is queued again (same parameters, ``retry_of`` its first attempt)
    unless it ran over the budget or another attempt of it is still alive.
    Returns the first-attempt numbers queued. Call it before any worker starts.
    With a heartbeat storage, Optuna's own check finds the dead trials, on any host
    (and queues them again itself); without one, a trial is dead when its process on
    this host is.
    """
    if _beats(study):
        optuna.storages.fail_stale_trials(study)
    else:
        host = socket.gethostname()
        for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            pid = trial.user_attrs.get("pid")
            if trial.user_attrs.get("host") == host and pid and not _pid_alive(int(pid)):
                study.tell(trial.number, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    alive = {root_number(t) for t in trials if t.state != TrialState.FAIL}
    queued = []
    for trial in trials:
        root = root_number(trial)
        if trial.state != TrialState.FAIL or trial.user_attrs.get("over_budget") or root in alive:
            continue
        study.enqueue_trial(trial.params, user_attrs={"retry_of": root})
        alive.add(root)
        queued.append(root)
    return queued


def counted_trials(study: optuna.Study, budget: int) -> list[optuna.trial.FrozenTrial]:
    """The first ``budget`` complete or pruned trials, by number: what the report counts."""
    return sorted(study.get_trials(states=FINISHED), key=lambda t: t.number)[:budget]


def best_trial(study: optuna.Study, budget: int) -> optuna.trial.FrozenTrial | None:
    complete = [t for t in counted_trials(study, budget) if t.state == TrialState.COMPLETE]
    return max(complete, key=lambda t: (t.value, -t.number)) if complete else None


def trial_minutes(study: optuna.Study) -> float:
    """The run time of every finished attempt of the study, summed, in minutes.

    Attempts that died and were run again count with the time each attempt took.
    """
    return (
        sum(
            (t.datetime_complete - t.datetime_start).total_seconds()
            for t in study.get_trials(deepcopy=False)
            if t.datetime_complete is not None and t.datetime_start is not None
        )
        / 60
    )


def _pruning_reporter(
    trial: optuna.Trial, offset: int, where: str, reported: set[int]
) -> Callable[[int, float], None]:
    """Report a unit's validation after ``epoch`` at step ``offset + epoch``; prune if told.

    Steps in ``reported`` (an earlier attempt's, or this unit's before a resume)
    are not reported twice.
    """

    def on_validation(epoch: int, value: float) -> None:
        step = offset + epoch
        if step not in reported:
            trial.report(value, step)
            reported.add(step)
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {epoch} of {where}")

    return on_validation


class OverBudget(Exception):
    """A trial that another worker's trials left no budget for; it runs nothing."""


UnitRunner = Callable[[Mapping[str, Any], int, int, Path, Callable[[int, float], None]], dict]


def _stop_diverged(trial: optuna.Trial, reason: str) -> NoReturn:
    """End a trial whose training diverged as pruned: a hopeless setting, counted in the budget."""
    trial.set_user_attr("diverged", reason)
    raise optuna.TrialPruned(f"diverged ({reason})")


def make_objective(
    method: Mapping[str, Any],
    space: Mapping[str, Mapping[str, Any]],
    folder: Path,
    budget: int,
    run_unit: UnitRunner,
) -> Callable[[optuna.Trial], float]:
    """The objective of one method's study.

    ``run_unit(config, seed, fold, unit_folder, on_validation)`` trains one unit
    and returns its results; ``on_validation(epoch, value)`` is called after
    each validation with the primary metric's value.
    """
    primary = method["eval"]["primary_metric"]
    units = list(product(method["tune"]["seeds"], method["tune"]["folds"]))
    epochs = int(method["training"]["num_epochs"])

    def objective(trial: optuna.Trial) -> float:
        study = trial.study
        trials = study.get_trials(deepcopy=False)  # one read of the storage per trial
        earlier = [t for t in trials if t.number < trial.number and t.state != TrialState.FAIL]
        if len(earlier) >= budget:
            trial.set_user_attr("over_budget", True)
            raise OverBudget(f"trial {trial.number}: the budget of {budget} trials is used")
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        root = root_number(next(t for t in trials if t.number == trial.number))
        reported: dict[int, float] = {}  # earlier attempts' validations, for the pruner
        for attempt in trials:
            if attempt.state == TrialState.FAIL and root_number(attempt) == root:
                reported.update(attempt.intermediate_values)
        for step, value in sorted(reported.items()):
            trial.report(value, step)
        if reported and trial.should_prune():  # where the attempt stopped, as it would have
            raise optuna.TrialPruned(f"pruned after step {max(reported)} (earlier attempt)")
        config = trial_config(method, suggest(trial, space))
        values = []
        for index, (seed, fold) in enumerate(units):
            where = f"seed {seed} fold {fold}"
            on_validation = _pruning_reporter(trial, index * epochs, where, set(reported))
            unit = folder / f"trial{root:04d}" / f"seed{seed}" / f"fold{fold}"
            try:
                result = run_unit(config, int(seed), int(fold), unit, on_validation)
            except NonFiniteError as error:
                _stop_diverged(trial, f"{where}: {error}")
            values.append(float(result["val"][primary]))
            if not math.isfinite(values[-1]):
                _stop_diverged(trial, f"{where}: validation {primary} is {values[-1]}")
        return math.fsum(values) / len(values)

    return objective


def finished_trials(study: optuna.Study) -> int:
    """How many of the study's trials are complete or pruned."""
    return sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))


def tune_method(
    config: Mapping[str, Any],
    method_name: str,
    storage: optuna.storages.BaseStorage,
    folder: Path,
    run_unit: UnitRunner,
    budget: int,
    on_trial: Callable[[optuna.Study], None] | None = None,
) -> optuna.Study:
    """Run trials of one method's study until ``budget`` trials are complete or pruned."""
    method = method_config(config, method_name)
    space = search_space(method)
    tune = method["tune"]
    name = study_name(config, method_name)
    study = optuna.create_study(
        study_name=name, storage=storage, direction="maximize", load_if_exists=True
    )
    objective = make_objective(method, space, folder / method_name, budget, run_unit)
    while True:
        if _beats(study):  # a worker that died elsewhere: its trial is failed and queued again
            optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        finished = finished_trials(study)
        waiting = any(t.state == TrialState.WAITING for t in trials)
        running = sum(t.state == TrialState.RUNNING for t in trials)
        if finished >= budget or (not waiting and finished + running >= budget):
            return study
        study = optuna.load_study(
            study_name=name,
            storage=storage,
            sampler=make_sampler(tune, sum(t.state != TrialState.FAIL for t in trials)),
            pruner=make_pruner(tune),
        )
        study.optimize(objective, n_trials=1, catch=(OverBudget,))
        if on_trial is not None:
            on_trial(study)


def unit_runner(config: Mapping[str, Any], out: Path, device: Any, progress: bool) -> UnitRunner:
    """:func:`benchmarks.protocol.unit.run_unit` for a trial's units, with the data loaded once.

    A unit that finished before (``results.json``, same config) is read back,
    not trained again: a re-queued trial continues where its attempt stopped.
    """
    data = DataPipeline(
        config["dataset"], log=lambda message: None, progress=progress, store=out / CACHE
    )
    hub_dir = Path(config["trunk"].get("hub_dir") or out / ".torch_hub")

    def run_trial_unit(
        unit_config: Mapping[str, Any],
        seed: int,
        fold: int,
        folder: Path,
        on_validation: Callable[[int, float], None],
    ) -> dict[str, Any]:
        if (folder / RESULTS).exists():
            check_previous(folder, unit_config, seed, fold)
            return json.loads((folder / RESULTS).read_text())
        return run_unit(
            unit_config,
            seed,
            fold,
            folder,
            data,
            device,
            hub_dir,
            log=lambda message: None,
            on_validation=on_validation,
        )

    return run_trial_unit


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
    best = {name: _best_params(studies[name], spaces[name], budget) for name in studies}
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


def _best_params(
    study: optuna.Study, space: Mapping[str, Mapping[str, Any]], budget: int
) -> dict[str, Any]:
    trial = best_trial(study, budget)
    return {} if trial is None else decode_params(space, trial.params)


def best_config(
    config: Mapping[str, Any],
    best: Mapping[str, Mapping[str, Any]],
    methods: Sequence[str],
    budget: int,
) -> dict[str, Any]:
    """``config`` with each searched method's best parameters, for the final runs on test classes.

    It holds exactly the ``methods`` the search was asked for: those in ``best``
    (searched, with ``budget`` trials each) and those without a search space
    (the untrained baselines, which keep their config); ``tune.trials``,
    ``tune.tuned_methods`` and ``tune.untuned_methods`` say so, for the final
    table's sentence. Every config section a parameter lives in is written out
    whole, as the method resolved it, so ``best.yaml`` needs no merge rules.
    """
    tuned = json.loads(json.dumps(config))
    tuned.pop("search_space", None)
    tuned["name"] = f"{config['name']}_tuned"
    tuned["tune"] = {
        **tuned["tune"],
        "trials": int(budget),
        "tuned_from": str(config["name"]),
        "tuned_methods": [name for name in methods if name in best],
        "untuned_methods": [name for name in methods if name not in best],
    }
    if tuned.get("methods"):
        tuned["methods"] = {name: tuned["methods"][name] for name in methods}
    for partial in (tuned.get("methods") or {}).values():
        (partial or {}).pop("search_space", None)
    for name, params in best.items():
        resolved = apply_params(method_config(config, name), params)
        sections = {key: resolved[key] for key in {k.split(".")[0] for k in params}}
        if tuned.get("methods"):
            tuned["methods"][name] = {**(tuned["methods"].get(name) or {}), **sections}
        else:
            tuned.update(sections)
    return tuned


def _space_text(entry: Mapping[str, Any]) -> str:
    if entry["type"] == "categorical":
        return "one of " + ", ".join(f"`{json.dumps(c)}`" for c in entry["choices"])
    text = f"{entry['type']} in [{entry['low']:g}, {entry['high']:g}]"
    if entry.get("log"):
        text += ", log scale"
    if "step" in entry:
        text += f", step {entry['step']:g}"
    return text


IMPORTANCE_TRIALS = 20  # below this many complete trials, importances are mostly noise


def _readable(value: Any) -> str:
    """A parameter for reading: floats to 3 significant digits (best.yaml keeps them whole)."""
    return f"{value:.3g}" if isinstance(value, float) else json.dumps(value)


def _save_plots(
    studies: Mapping[str, optuna.Study], budget: int, folder: Path, prefix: str
) -> list[str]:
    """Optuna's optimisation history and parameter importances per method, and the best
    trials' validation curves; returns the file names written to ``folder``."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    written = []
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    for name, study in studies.items():
        complete = [t for t in counted_trials(study, budget) if t.state == TrialState.COMPLETE]
        plots = [("history", optuna_plots.plot_optimization_history)]
        if len(complete) >= 2 and any(
            len({str(t.params.get(k)) for t in complete}) > 1 for k in complete[0].params
        ):
            plots.append(("importance", optuna_plots.plot_param_importances))
        for kind, plot in plots:
            axes = plot(study)
            title = name
            if kind == "importance":
                title += f" ({len(complete)} complete trials)"
                if len(complete) < IMPORTANCE_TRIALS:
                    title += f": too few to rank parameters reliably (say {IMPORTANCE_TRIALS}+)"
            axes.figure.suptitle(title, y=1.02)
            path = f"{prefix}_{name}_{kind}.png"
            axes.figure.savefig(folder / path, dpi=100, bbox_inches="tight")
            plt.close(axes.figure)
            written.append(path)
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, study in studies.items():
        trial = best_trial(study, budget)
        if trial is not None and trial.intermediate_values:
            steps = sorted(trial.intermediate_values)
            values = [100 * trial.intermediate_values[s] for s in steps]
            axes.plot(steps, values, marker="o", label=f"{name} (trial {trial.number})")
    axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    axes.set_xlabel("epoch (folds one after another)")
    axes.set_ylabel("validation MAP@R (%)")
    axes.set_title("Validation curve of each method's best trial")
    if axes.lines:
        axes.legend()
    path = f"{prefix}_val_curves.png"
    figure.savefig(folder / path, dpi=100, bbox_inches="tight")
    plt.close(figure)
    return [*written, path]


def report_search(
    config: Mapping[str, Any],
    methods: Sequence[str],
    studies: Mapping[str, optuna.Study],
    spaces: Mapping[str, Mapping[str, Mapping[str, Any]]],
    budget: int,
    folder: Path,
    publish: str | Path | None,
    command: str | None = None,
) -> str:
    """Write ``best.yaml``, ``report.md`` and the plots to ``folder`` (and ``publish``).

    ``methods``: every method the search was asked for, ``studies`` those with a search.
    """
    name = str(config["name"])
    best = {m: _best_params(study, spaces[m], budget) for m, study in studies.items()}
    tuned = best_config(config, best, methods, budget)
    header = f"# best parameters of {name} on validation classes (benchmarks/tune.py)\n"
    write_atomic(folder / "best.yaml", header + yaml.safe_dump(tuned, sort_keys=False))
    tune = config["tune"]
    env = environment()
    lines = [
        f"# {name}: every method tuned with the same budget on validation classes",
        "",
        f"Command: `{command or 'benchmarks.search.tune.search(...) from Python'}`  ",
        f"Machine: {env['processor']}, {env['cpu_count']} CPUs; commit `{env['git_commit']}`; "
        f"{env['started']}.  ",
        f"Budget: {budget} trials per method (complete or pruned; an attempt that died is run "
        "again from its resume point, not counted twice; a trial whose training diverged to "
        "NaN ends as pruned). Objective: mean validation "
        f"{config['eval']['primary_metric']} over folds {tune['folds']} and seeds "
        f"{tune['seeds']}; the test classes were never embedded. Sampler: Optuna TPE, seed "
        f"{tune['seed']} plus the trial's index; pruner: {tune['pruner']}.",
        "",
        "| method | trials (complete + pruned) | trial time, summed | best validation MAP@R "
        "| best trial | best parameters (rounded; best.yaml has them whole) |",
        "|---|---|---|---|---|---|",
    ]
    for method, study in studies.items():
        counted = counted_trials(study, budget)
        pruned = sum(t.state == TrialState.PRUNED for t in counted)
        diverged = sum("diverged" in t.user_attrs for t in counted)
        minutes = trial_minutes(study)
        trial = best_trial(study, budget)
        value = "-" if trial is None else f"{100 * trial.value:.2f}"
        params = ", ".join(f"`{k}` = `{_readable(v)}`" for k, v in best[method].items())
        number = "-" if trial is None else str(trial.number)
        if trial is not None and root_number(trial) != trial.number:  # a retry, in its folder
            number += f" (folder trial{root_number(trial):04d})"
        lines.append(
            f"| {method} | {len(counted) - pruned} + {pruned}"
            f"{f' ({diverged} diverged)' if diverged else ''} | {minutes:.1f} min | {value} | "
            f"{number} | {params or '-'} |"
        )
    lines += ["", "## Search spaces", "", "| method | key | space |", "|---|---|---|"]
    for method in studies:
        for key, entry in spaces[method].items():
            lines.append(f"| {method} | `{key}` | {_space_text(entry)} |")
    lines += [
        "",
        "The final runs on test classes: "
        f"`python -m benchmarks.run --config {folder / 'best.yaml'}`.",
        "",
    ]
    prefix = f"{name}_tuning"
    plots = _save_plots(studies, budget, folder, prefix)
    lines += [f"![{path}]({path})" for path in plots] + [""]
    text = "\n".join(lines)
    write_atomic(folder / f"{prefix}.md", text)
    if publish is not None:
        target = Path(publish)
        target.mkdir(parents=True, exist_ok=True)
        for path in [f"{prefix}.md", *plots]:
            shutil.copyfile(folder / path, target / path)
        shutil.copyfile(folder / "best.yaml", target / f"{prefix}_best.yaml")
    return text


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
