"""One method's study: TPE and the pruner, and trials until the budget is used.

:func:`tune_method` runs trials of one study (in this process; several processes may
run it on the same storage) until ``budget`` trials are complete or pruned. The sampler
is re-seeded per trial (:func:`make_sampler`), so a resumed search proposes what an
uninterrupted one would have.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from benchmarks.protocol.config import method_config

from .objective import OverBudget, UnitRunner, make_objective
from .space import search_space
from .storage import study_name
from .trials import finished_trials, has_heartbeat

__all__ = ["make_pruner", "make_sampler", "tune_method"]


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
        if has_heartbeat(study):  # a worker that died elsewhere: failed and queued again
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
