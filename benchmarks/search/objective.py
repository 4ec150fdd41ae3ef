"""The objective of one method's study: a trial trains its units on validation classes.

:func:`make_objective` samples the trial's parameters, trains the units of
``tune.seeds`` x ``tune.folds`` (in the trial's folder, so a retried trial resumes
them), reports every validation to the pruner and returns the mean validation
``eval.primary_metric``; a diverged trial ends as pruned, one over the budget as
:class:`OverBudget`. A pruned trial's checkpoints and resume points are deleted
(it never runs again); its configs and logs stay. :func:`unit_runner` is the protocol's
:func:`~benchmarks.protocol.unit.run_unit` for those units, with the data loaded once.
"""

from __future__ import annotations

import json
import math
import os
import socket
from collections.abc import Callable, Mapping
from itertools import product
from pathlib import Path
from typing import Any, NoReturn

import optuna
from optuna.trial import FrozenTrial, TrialState

from benchmarks.protocol.layout import CACHE, RESULTS, drop_checkpoints
from benchmarks.protocol.pipeline import DataPipeline
from benchmarks.protocol.resume import check_previous
from benchmarks.protocol.unit import run_unit
from pml_crt.utils.validation import NonFiniteError

from .space import suggest, trial_config
from .trials import root_number

__all__ = ["OverBudget", "UnitRunner", "make_objective", "unit_runner"]


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
        trial_folder = folder / f"trial{root:04d}"  # every attempt of the trial works here
        try:
            return trial_value(trial, trials, root, trial_folder)
        except optuna.TrialPruned:
            drop_checkpoints(trial_folder)  # pruned is final: never resumed
            raise

    def trial_value(
        trial: optuna.Trial, trials: list[FrozenTrial], root: int, trial_folder: Path
    ) -> float:
        """Train the trial's units (its earlier attempts' reports first); the mean value."""
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
            unit = trial_folder / f"seed{seed}" / f"fold{fold}"
            try:
                result = run_unit(config, int(seed), int(fold), unit, on_validation)
            except NonFiniteError as error:
                _stop_diverged(trial, f"{where}: {error}")
            values.append(float(result["val"][primary]))
            if not math.isfinite(values[-1]):
                _stop_diverged(trial, f"{where}: validation {primary} is {values[-1]}")
        return math.fsum(values) / len(values)

    return objective


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
