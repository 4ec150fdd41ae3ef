"""What can be checked before the first unit or trial, so that a user error costs nothing.

``benchmarks.run`` and ``benchmarks.tune`` call :func:`check_methods` after loading the
config and the data listing and before they create a folder: a typo in a ``kwargs`` or
a batch size the classes cannot fill is then one line (exit 2), with no run folder, no
trial and no traceback left behind.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .build import check_arguments
from .config import ConfigError, method_config
from .splits import mlrc_split

__all__ = ["check_batch", "check_methods"]


def check_batch(
    split_name: str, classes: int, config: Mapping[str, Any], world_size: int = 1
) -> None:
    """Refuse a batch size that ``MPerClassSampler`` (or the processes) cannot split."""
    batch, m = int(config["training"]["batch_size"]), int(config["training"]["m"])
    if batch % m or m * classes < batch:
        raise ConfigError(
            f"training.batch_size={batch} must be a multiple of training.m={m} and at most "
            f"m * (number of {split_name} classes = {classes}) = {m * classes}"
        )
    if batch % world_size:
        raise ConfigError(
            f"training.batch_size={batch} (the global batch) must be a multiple of the number "
            f"of processes, {world_size}"
        )


def check_methods(
    config: Mapping[str, Any], names: Sequence[str], num_classes: int, folds: Sequence[int]
) -> None:
    """Check each method's arguments and its batch against every fold's training classes.

    Args:
        config: the whole config.
        names: the methods that will run.
        num_classes: classes of the dataset (train+val and test halves together).
        folds: the folds that will train.
    """
    for name in names:
        method = method_config(config, name)
        check_arguments(method)
        for fold in folds:
            split = mlrc_split(
                num_classes,
                int(fold),
                int(config["num_folds"]),
                config["dataset"].get("class_order_seed"),
            )
            check_batch("train", len(split.train), method)
