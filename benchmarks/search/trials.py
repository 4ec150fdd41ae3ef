"""A study's trials: which count towards the budget, the best one, their time, the dead.

Only complete and pruned trials count (:func:`counted_trials`, the first ``budget`` of
them by number); a retry keeps its first attempt's number and folder
(:func:`root_number`); :func:`requeue_dead_trials` fails the trials whose process died
and queues each again with its parameters.
"""

from __future__ import annotations

import os
import socket

import optuna
from optuna.trial import TrialState

__all__ = [
    "FINISHED",
    "best_trial",
    "counted_trials",
    "finished_trials",
    "has_heartbeat",
    "requeue_dead_trials",
    "root_number",
    "trial_minutes",
]

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def root_number(trial: optuna.trial.FrozenTrial) -> int:
    """The number of the first attempt of a trial (retries keep its folder).

    A retry queued here carries ``retry_of``; one queued by Optuna's heartbeat
    (``RetryHeartbeatStaleTrialCallback``) carries its ``retry_history``.
    """
    history = trial.system_attrs.get("retry_history") or [trial.number]
    return int(trial.user_attrs.get("retry_of", history[0]))


def has_heartbeat(study: optuna.Study) -> bool:
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
    if has_heartbeat(study):
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


def finished_trials(study: optuna.Study) -> int:
    """How many of the study's trials are complete or pruned."""
    return sum(t.state in FINISHED for t in study.get_trials(deepcopy=False))
