"""A method's search space: checked against its config, sampled in a trial, applied back.

Search-space entries map a dotted config key (relative to the method's config) to one
of::

    {type: float, low: 1.0e-5, high: 1.0e-2, log: true}
    {type: int, low: 4, high: 64, step: 4}          # log: true also allowed
    {type: categorical, choices: [kl, mse, [16, 128]]}

``null`` removes an entry inherited from the top-level ``search_space``.
:func:`search_space` checks a method's entries, :func:`suggest` samples them in a
trial, :func:`apply_params` and :func:`trial_config` put the values into the config,
and :func:`check_search` tries every key on the method's classes before any trial.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

import optuna

from benchmarks.protocol.build import check_arguments
from benchmarks.protocol.config import ConfigError, apply_override, method_config
from benchmarks.protocol.data import load_source
from benchmarks.protocol.preflight import check_methods

__all__ = [
    "SearchSpaceError",
    "apply_params",
    "check_search",
    "decode_params",
    "search_space",
    "suggest",
    "trial_config",
]

SPACE_TYPES = ("float", "int", "categorical")


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
