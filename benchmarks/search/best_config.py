"""``best.yaml``: the config with each searched method's best parameters, for the final runs."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from benchmarks.protocol.config import method_config

from .space import apply_params, decode_params
from .trials import best_trial

__all__ = ["best_config", "best_params"]


def best_params(
    study: optuna.Study, space: Mapping[str, Mapping[str, Any]], budget: int
) -> dict[str, Any]:
    """The parameters of ``study``'s best counted trial as config values; ``{}`` if none."""
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
        # in the order of the search space (a set would order them by PYTHONHASHSEED)
        sections = {key: resolved[key] for key in dict.fromkeys(k.split(".")[0] for k in params)}
        if tuned.get("methods"):
            tuned["methods"][name] = {**(tuned["methods"].get(name) or {}), **sections}
        else:
            tuned.update(sections)
    return tuned
