"""How a process runs units: its device, CPU threads, share of the cores, progress bars.

A config's ``device`` (:func:`config_device`) and ``threads`` (:func:`compute_threads`,
restored afterwards) hold while its units run; each of ``K`` local worker processes gets
an equal share of the cores this process may use unless ``threads`` pins the count
(:func:`worker_threads`); :func:`progress_bars` hides every tqdm bar, PML's included,
and :func:`hide_trainer_warning` the warning PML's trainer raises on every logged loss.
``benchmarks.run`` and ``benchmarks.tune`` set up their processes with these.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Iterator, Mapping
from typing import Any

import torch
import tqdm

from .config import ConfigError

__all__ = [
    "available_cores",
    "compute_threads",
    "config_device",
    "hide_trainer_warning",
    "progress_bars",
    "worker_threads",
]


def config_device(config: Mapping[str, Any]) -> torch.device:
    """The config's ``device``; ``auto`` is CUDA when available, else the CPU."""
    name = str(config.get("device", "auto"))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


@contextlib.contextmanager
def compute_threads(count: int | None) -> Iterator[None]:
    """Run the block with ``count`` CPU threads in torch and faiss; ``None``: as they are.

    Results depend on the thread count (it changes how sums are split, so their rounding),
    hence ``threads`` in a config pins both. The caller's counts are restored afterwards.
    """
    if count is None:
        yield
        return
    if count < 1:
        raise ConfigError(f"threads must be a positive integer or null, got {count!r}")
    try:
        import faiss
    except ImportError:
        faiss = None
    before = torch.get_num_threads(), faiss.omp_get_max_threads() if faiss else None
    torch.set_num_threads(count)
    if faiss is not None:
        faiss.omp_set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before[0])
        if faiss is not None:
            faiss.omp_set_num_threads(before[1])


def hide_trainer_warning() -> None:
    """Hide the warning PML's trainer raises each time it formats a loss that requires grad
    into its progress bar; a spawned process does not inherit its parent's filters."""
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True")


def available_cores() -> int:
    """The cores this process may run on: its affinity mask (a container's CPU set, a
    ``taskset``) where the OS has one, else every core of the machine."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def worker_threads(config: Mapping[str, Any], workers: int) -> dict[str, Any]:
    """``config`` for one of ``workers`` local processes: an equal share of the cores this
    process may use (:func:`available_cores`) unless ``threads`` pins the count."""
    if workers == 1 or config.get("threads") is not None:
        return dict(config)
    return {**config, "threads": max(1, available_cores() // workers)}


class _HiddenBar(tqdm.tqdm):
    """A tqdm bar that draws nothing, whatever its caller asks."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **{**kwargs, "disable": True})


@contextlib.contextmanager
def progress_bars(shown: bool) -> Iterator[None]:
    """Run the block with (``shown``) or without every tqdm progress bar.

    PML's trainers and testers create their bars inside ``train`` and
    ``compute_all_embeddings`` with no option to hide them (and tqdm reads
    ``TQDM_DISABLE`` only when it is imported), so without bars ``tqdm.tqdm``,
    which they call, is a bar that draws nothing until the block ends.
    """
    if shown:
        yield
        return
    original = tqdm.tqdm
    tqdm.tqdm = _HiddenBar
    try:
        yield
    finally:
        tqdm.tqdm = original
