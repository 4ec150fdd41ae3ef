"""Benchmark configuration: YAML files, defaults, ``--set`` overrides and methods.

A config is a nested dict (see ``DEFAULTS`` for every key and its default and
``benchmarks/README.md`` for the schema). ``methods`` maps a method name to a
partial config that is deep-merged onto the rest of the config; see
:func:`deep_merge` for the one rule that is not a plain recursive update.
"""

from __future__ import annotations

import copy
import difflib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "DEFAULTS",
    "ConfigError",
    "MissingFileError",
    "UserError",
    "apply_override",
    "deep_merge",
    "load_config",
    "method_config",
    "method_names",
    "parse_override",
    "yaml_load",
]

DEFAULTS: dict[str, Any] = {
    "name": None,  # run folder name; default: the config file's stem
    "seeds": [0],
    "num_folds": 4,
    "folds": [0, 1, 2, 3],
    "device": "auto",  # auto | cpu | cuda | cuda:N
    "threads": None,  # CPU threads of torch and faiss; None keeps their defaults
    "dataset": {
        "name": "omniglot",  # omniglot | cub | cars196 | sop
        "root": "../shared/data",
        "download": False,
        "max_classes": None,  # keep only the first N sorted classes (tiny slices)
        # None: MLRC's split of the sorted classes; an int: the classes shuffled with this
        # seed first (benchmarks.protocol.splits.class_order), then split the same way
        "class_order_seed": None,
    },
    "images": {
        "resize": 28,  # torchvision Resize (shorter side); None: keep the size
        "crop": None,  # CenterCrop at eval (and train without augmentation)
        "augmentation": "none",  # none | mlrc (RandomResizedCrop + flip on train data)
        "rrc_scale": [0.16, 1.0],
        "hflip": True,
        "normalize": "imagenet",  # imagenet | invert (1 - x, Omniglot) | none
    },
    "cache": {
        "images": True,  # decode + resize once into an in-memory uint8 tensor
        "features": True,  # cache the frozen trunk blocks' outputs (no augmentation only)
        # with images.augmentation: run the frozen blocks once over this many augmented views
        # of every training image; each training access draws one (0: augment every epoch)
        "train_views": 0,
        "feature_dtype": "float32",
    },
    "trunk": {
        "name": "small_convnet",  # small_convnet | a pml_crt.trunks.available_trunks() name
        "weights": None,  # torchvision weights, e.g. IMAGENET1K_V1
        "weights_path": None,  # a local .pth for `weights`, put into hub_dir/checkpoints
        "hub_dir": None,  # torch hub dir for weights_path; default <out>/.torch_hub
        "frozen_blocks": 0,
        "freeze_batchnorm": False,
        "kwargs": {},
    },
    "embedder": {
        "type": "GlobalPoolEmbedder",  # GlobalPoolEmbedder | NetVLAD | CRT | MultiHeadCRT | frozen
        "kwargs": {},
        # NetVLAD / CRT / MultiHeadCRT: {max_descriptors, iterations} runs k-means of the
        # embedder's descriptors on the unit's training classes before training
        # (pml_crt.models.prototype_init.init_from_data); {} takes its defaults.
        "init_from_data": None,
    },
    "loss": {
        "name": "MultiSimilarityLoss",  # a class of pytorch_metric_learning.losses
        "kwargs": {},
        # MultiHeadCRT only: options of pml_crt.losses.MultiHeadLoss
        "consistency_weight": 1.0,
        "consistency": None,
        "head_weights": None,
    },
    "miner": None,  # None or {"name": <pytorch_metric_learning.miners class>, "kwargs": {}}
    "optimizers": {
        # default for every model / parametric loss not listed; entries may be None (frozen)
        "default": {"name": "Adam", "kwargs": {"lr": 1e-3}},
    },
    "training": {
        "batch_size": 32,
        "m": 4,
        "iterations_per_epoch": 100,
        "num_epochs": 10,
        "patience": 2,  # early stopping on validation MAP@R (HookContainer)
        "test_interval": 1,
        "num_workers": 0,
        "log_freq": 50,
        "keep_checkpoints": "best",  # best | all
    },
    "eval": {
        "batch_size": 256,
        "metrics": [
            "precision_at_1",
            "r_precision",
            "mean_average_precision_at_r",
            "recall_at_1",
            "recall_at_2",
            "recall_at_4",
            "recall_at_8",
            "spectral_decay",
            "embedding_density",
        ],
        "primary_metric": "mean_average_precision_at_r",
        # "test": report the test classes; "val": report the validation classes and never
        # embed the test classes (ablations that choose defaults use this).
        "split": "test",
        "prefer_faiss": True,
        "save_embeddings": True,  # needed for the "concatenated" evaluation
    },
    "methods": None,  # {method name: partial config merged onto the rest}
    # python -m benchmarks.tune: {dotted config key: space} sampled per trial; a method's
    # own search_space merges onto this one (see benchmarks/tune.py for the entries).
    "search_space": None,
    "tune": {
        "trials": 20,  # per method: complete + pruned trials
        "seeds": [0],  # each trial trains these seeds x folds on validation classes
        "folds": [0],
        "seed": 0,  # TPE's seed (plus the trial's index)
        "sampler": {},  # optuna.samplers.TPESampler keyword arguments
        "pruner": {"name": "median", "kwargs": {"n_startup_trials": 5, "n_warmup_steps": 1}},
        # RDB storage (--storage URL): a worker's heartbeat period, in seconds; a trial
        # without a heartbeat for twice as long is failed and queued again (Optuna's own).
        "heartbeat_interval": 60,
        "tuned_from": None,  # set in best.yaml: the name of the config whose search it holds
        "tuned_methods": None,  # set in best.yaml: the methods it holds the search's best of
        "untuned_methods": None,  # set in best.yaml: the methods with no search space
    },
}

# The type of each key whose default is None (which it may stay); every other key takes
# its default's type, and a list default also gives its items' type.
_TYPES_OF_NONE_DEFAULTS: dict[tuple[str, ...], type] = {
    ("name",): str,
    ("threads",): int,
    ("dataset", "max_classes"): int,
    ("dataset", "class_order_seed"): int,
    ("images", "crop"): int,
    ("trunk", "weights"): str,
    ("trunk", "weights_path"): str,
    ("trunk", "hub_dir"): str,
    ("loss", "consistency"): dict,
    ("embedder", "init_from_data"): dict,
    ("tune", "tuned_from"): str,
    ("tune", "tuned_methods"): list,
    ("tune", "untuned_methods"): list,
    ("loss", "head_weights"): list,
    ("miner",): dict,
    ("methods",): dict,
    ("search_space",): dict,
}
# Keys with another default that also take null.
_NULLABLE = {
    ("images", "resize"),  # null: keep the size
    ("training", "patience"),  # null: no early stopping
}
# Sections with free-form contents: not checked below their top level.
_FREE_FORM = {
    "kwargs",
    "optimizers",
    "consistency",
    "miner",
    "methods",
    "search_space",
    "sampler",
    "init_from_data",
}

_NAMED_KEYS = ("type", "name")


class UserError(Exception):
    """A mistake the user fixes in the command line, the config or the files it names.

    ``python -m benchmarks.run`` prints its message on one line and exits with status 2;
    every other exception is a bug and keeps its traceback.
    """


class ConfigError(UserError, ValueError):
    """An unreadable config file, a bad ``--set``, an unknown key or a bad value."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the config or command line names does not exist."""


class _Loader(yaml.SafeLoader):
    """A safe YAML loader that also reads ``1e-6`` (no dot) as a float."""


_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+][0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_Loader.yaml_implicit_resolvers = {
    key: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:float"]
    for key, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def yaml_load(text: str) -> Any:
    """``yaml.safe_load`` that also reads ``1e-6`` as a float (YAML 1.1 would keep a string)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)


def deep_merge(
    base: Mapping[str, Any], override: Mapping[str, Any], replace_on_kind_change: bool = True
) -> dict[str, Any]:
    """``base`` updated recursively by ``override`` (neither is modified).

    Dicts merge key by key; anything else (lists included) replaces. With
    ``replace_on_kind_change`` (how methods merge onto the shared config), a
    dict whose ``type`` or ``name`` differs from the one it would merge into
    replaces it whole, so that a method switching ``embedder.type`` from
    ``GlobalPoolEmbedder`` to ``MultiHeadCRT`` does not inherit ``pooling``
    among its kwargs, nor a new optimizer the old one's kwargs. Without it (how a
    config merges onto ``DEFAULTS``), such a dict keeps the base's other keys but
    never its ``kwargs``, which belong to the class the base named (a ``pruner:
    {name: none}`` does not inherit the median pruner's arguments).
    """
    merged = copy.deepcopy(dict(base))
    for key, value in override.items():
        old = merged.get(key)
        if isinstance(value, Mapping) and isinstance(old, Mapping) and _switches_kind(old, value):
            if replace_on_kind_change:
                merged[key] = copy.deepcopy(value)
                continue
            old = {k: v for k, v in old.items() if k != "kwargs"}
        if isinstance(value, Mapping) and isinstance(old, Mapping):
            merged[key] = deep_merge(old, value, replace_on_kind_change)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def _switches_kind(old: Mapping[str, Any], new: Mapping[str, Any]) -> bool:
    return any(k in new and k in old and new[k] != old[k] for k in _NAMED_KEYS)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"training.batch_size=64"`` -> ``(["training", "batch_size"], 64)``.

    The value is parsed as YAML (``null``, ``true``, ``[0, 1]``, ``{lr: 1e-4}``,
    ``1e-4``); anything YAML cannot parse stays a string.
    """
    if "=" not in text:
        raise ConfigError(f"an override must look like key.sub=value, got {text!r}")
    key, raw = text.split("=", 1)
    keys = key.strip().split(".")
    if not all(re.fullmatch(r"[A-Za-z0-9_\-]+", k) for k in keys):
        raise ConfigError(f"bad override key {key!r} in {text!r}")
    try:
        value = yaml_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    return keys, value


def apply_override(config: dict[str, Any], keys: list[str], value: Any) -> None:
    """Set ``config[k0][k1]...[kn] = value`` in place, creating dicts on the way.

    Integer keys index into lists (``methods.crt.embedder.kwargs.heads.0=[8, 64]``).
    """
    node: Any = config
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = node[int(key)]
            continue
        if node.get(key) is None:
            node[key] = {}
        elif not isinstance(node[key], (dict, list)):
            path = ".".join(keys[: depth + 1])
            raise ConfigError(f"cannot set {'.'.join(keys)}: {path} is {node[key]!r}, not a dict")
        node = node[key]
    if isinstance(node, list):
        node[int(keys[-1])] = value
    else:
        node[keys[-1]] = value


def _check_schema(
    config: Mapping[str, Any],
    reference: Mapping[str, Any] = DEFAULTS,
    path: tuple[str, ...] = (),
    where: str = "",
) -> None:
    """Raise ``ConfigError`` for a key ``reference`` lacks or a value of the wrong type.

    ``config`` is (part of) a user config, checked against the ``reference`` section of
    ``DEFAULTS`` at ``path``; messages name the key as ``where`` + key.
    """
    for key, value in config.items():
        if key not in reference:
            close = difflib.get_close_matches(str(key), [str(k) for k in reference], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"unknown config key {where}{key}{hint}")
        default, keys = reference[key], (*path, key)
        _check_type(f"{where}{key}", value, default, keys)
        if isinstance(default, dict) and isinstance(value, Mapping) and key not in _FREE_FORM:
            _check_schema(value, default, keys, f"{where}{key}.")


def _check_type(name: str, value: Any, default: Any, keys: tuple[str, ...]) -> None:
    """Raise ``ConfigError`` unless ``value`` has the type of the key ``keys`` (or is null)."""
    nullable = default is None or keys in _NULLABLE
    if value is None and nullable:
        return
    expected = _TYPES_OF_NONE_DEFAULTS[keys] if default is None else type(default)
    item = type(default[0]) if expected is list and default else None
    if _is_a(value, expected) and (item is None or all(_is_a(v, item) for v in value)):
        return
    wanted = _type_name(expected) if item is None else f"a list of {_type_name(item)}"
    wanted += " or null" if nullable else ""
    raise ConfigError(f"{name}: expected {wanted}, got {value!r} ({_type_name(type(value))})")


def _type_name(kind: type) -> str:
    return "a mapping" if issubclass(kind, Mapping) else kind.__name__


def _is_a(value: Any, expected: type) -> bool:
    """``isinstance``, where an int is also a float and a bool is neither an int nor a float."""
    if isinstance(value, bool) and expected in (int, float):
        return False
    if expected is float:
        return isinstance(value, (int, float))
    return isinstance(value, Mapping if expected is dict else expected)


def load_config(
    path: str | Path | None = None,
    overrides: Iterable[str] = (),
    data: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """``DEFAULTS``, updated by the YAML file at ``path``, then ``data``, then ``overrides``.

    Missing keys take their defaults (also where a section switches its
    ``name``, e.g. ``dataset.name: cub`` keeps the default ``dataset.root``).

    A missing config file raises ``MissingFileError``; an unreadable one, a bad
    override, an unknown key (with a "did you mean" hint) or a value whose type
    differs from its default's raise ``ConfigError`` naming the key, also inside
    each method's partial config. Both are :class:`UserError`.
    """
    config = copy.deepcopy(DEFAULTS)
    user: dict[str, Any] = {}
    if path is not None:
        if not Path(path).is_file():
            raise MissingFileError(f"config file {str(path)!r} not found")
        try:
            user = yaml_load(Path(path).read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from error
        if not isinstance(user, dict):
            raise ConfigError(f"{path} must hold a YAML mapping, got {type(user).__name__}")
    if data is not None:
        user = deep_merge(user, data, replace_on_kind_change=False)
    for text in overrides:
        keys, value = parse_override(text)
        apply_override(user, keys, value)
    _check_schema(user)
    config = deep_merge(config, user, replace_on_kind_change=False)
    if config["name"] is None:
        config["name"] = Path(path).stem if path is not None else "benchmark"
    methods = config.get("methods")
    if methods is not None:
        if not isinstance(methods, Mapping) or not methods:
            raise ConfigError("methods must be a non-empty mapping {name: partial config}")
        for name, partial in methods.items():
            if not re.fullmatch(r"[A-Za-z0-9_.\-]+", str(name)):
                raise ConfigError(f"method name {name!r} must be usable as a folder name")
            if not isinstance(partial or {}, Mapping):
                raise ConfigError(f"methods.{name} must be a mapping, got {partial!r}")
            _check_schema(partial or {}, where=f"methods.{name}.")
            for forbidden in ("methods", "seeds", "folds", "num_folds", "name", "dataset", "tune"):
                if forbidden in (partial or {}):
                    raise ConfigError(
                        f"methods.{name} sets {forbidden!r}: every method shares the protocol"
                    )
    return config


def method_names(config: Mapping[str, Any]) -> list[str]:
    """The method names in config order (without ``methods``: the embedder type)."""
    if config.get("methods"):
        return [str(name) for name in config["methods"]]
    return [str(config["embedder"]["type"])]


def method_config(config: Mapping[str, Any], name: str) -> dict[str, Any]:
    """The config of one method: ``methods[name]`` merged onto the rest, without ``methods``."""
    base = {k: v for k, v in config.items() if k != "methods"}
    methods = config.get("methods") or {}
    if methods and name not in methods:
        raise KeyError(f"no method {name!r}; the config has {list(methods)}")
    resolved = deep_merge(base, methods.get(name) or {})
    resolved["method"] = name
    return resolved
