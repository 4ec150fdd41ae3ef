"""Where results come from: versions, machine, commit, command, and the units' commits.

:func:`environment` is every unit's ``env.json`` (and the machine line of published
tables and tuning reports); :func:`published_provenance` is the paragraph under a
published table.
"""

from __future__ import annotations

import functools
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pml_crt
from benchmarks.perf.common import cpu_model

from .layout import RESULTS

__all__ = [
    "environment",
    "git_commit",
    "published_provenance",
    "trained_unit_times",
    "unit_provenance",
    "unit_seconds",
]


@functools.cache
def git_commit() -> str | None:
    """HEAD (``-dirty`` with uncommitted changes) when this process first asks.

    Asked once per process, at its first unit: that is the code the process
    imported, even if commits land while it runs.
    """
    repo = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "-C", str(repo), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("-dirty" if dirty else "")


def _faiss_version() -> str | None:
    try:
        import faiss
    except ImportError:
        return None
    return getattr(faiss, "__version__", "unknown")


def environment(seed: int | None = None, device: torch.device | None = None) -> dict[str, Any]:
    """Versions, machine and threads, for ``env.json``."""
    import pytorch_metric_learning
    import torchvision

    return {
        "seed": seed,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "pml_crt": pml_crt.__version__,
        "faiss": _faiss_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": cpu_model(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device) if device is not None else None,
        "cuda": torch.cuda.get_device_name(device)
        if device is not None and device.type == "cuda"
        else None,
        "git_commit": git_commit(),
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


def _unit_commits(run_root: Path) -> dict[tuple[str, int | None], int]:
    """How many units of the run folder ran each (commit, torch thread count) (``env.json``)."""
    counts: dict[tuple[str, int | None], int] = {}
    for env_file in sorted(run_root.glob("*/seed*/fold*/env.json")):
        try:
            env = json.loads(env_file.read_text())
        except (OSError, ValueError):
            continue
        key = (str(env.get("git_commit")), env.get("torch_threads"))
        counts[key] = counts.get(key, 0) + 1
    return counts


def unit_seconds(run_root: Path, method: str = "*") -> list[float]:
    """The ``total_time_s`` of every finished unit of the run folder (of one ``method``)."""
    seconds = []
    for results_file in sorted(run_root.glob(f"{method}/seed*/fold*/{RESULTS}")):
        try:
            seconds.append(float(json.loads(results_file.read_text())["total_time_s"]))
        except (OSError, ValueError, KeyError):
            continue
    return seconds


def trained_unit_times(run_root: Path) -> list[tuple[float, float, float]]:
    """``(train_time_s, eval_time_s, total_time_s)`` of every finished unit that trained."""
    times = []
    for results_file in sorted(run_root.glob(f"*/seed*/fold*/{RESULTS}")):
        try:
            result = json.loads(results_file.read_text())
            row = tuple(float(result[k]) for k in ("train_time_s", "eval_time_s", "total_time_s"))
        except (OSError, ValueError, KeyError):
            continue
        if result.get("trained", True):  # an untrained unit's "training" is its validation
            times.append(row)
    return times


def _median_range(values: list[float]) -> str:
    """``"193 s (174-732)"``: the median and the range, in whole seconds."""
    return f"{statistics.median(values):.0f} s ({min(values):.0f}-{max(values):.0f})"


def unit_provenance(run_root: Path | None) -> str:
    """The commits the units of a run folder ran (``env.json``) and their total time, as lines."""
    if run_root is None:
        return ""
    counts, seconds = _unit_commits(run_root), unit_seconds(run_root)
    lines = ""
    if counts:
        listed = ", ".join(
            f"`{commit}` ({n} units{'' if threads is None else f', {threads} torch threads'})"
            for (commit, threads), n in sorted(
                counts.items(), key=lambda c: (c[0][0], c[0][1] or 0)
            )
        )
        lines += f"The units ran the code of commit {listed} (each unit's `env.json`).\n"
    if seconds:
        lines += (
            f"Time of the {len(seconds)} finished units, summed: {sum(seconds) / 60:.1f} min "
            "(each unit's `total_time_s`, which includes the caches a unit built for its "
            "process, or waited for while another process built them).\n"
        )
    trained = trained_unit_times(run_root)
    if trained:
        train, evaluate, total = zip(*trained, strict=True)
        rest = [t - a - b for a, b, t in trained]
        lines += (
            f"Per trained unit, median (range): training {_median_range(list(train))}, "
            f"testing {_median_range(list(evaluate))}, total {_median_range(list(total))}; "
            f"the rest of the total, {_median_range(rest)}, is building the model and "
            "the caches (or waiting for another process to build them).\n"
        )
    return lines


def published_provenance(
    name: str, device: torch.device, command: str, run_root: Path | None
) -> str:
    """The paragraph under a published table: command, commit, units, machine, versions."""
    env = environment(device=device)
    return (
        f"\n\nProduced by `{command}`"
        f" at commit `{env['git_commit']}` on {env['started']}.\n"
        f"{unit_provenance(run_root)}"
        f"Machine: {env['processor']}, {env['cpu_count']} CPUs, {env['torch_threads']} torch "
        f"threads, device {env['device']}{' (' + env['cuda'] + ')' if env['cuda'] else ''}. "
        f"Versions: python {env['python']}, torch {env['torch']}, torchvision "
        f"{env['torchvision']}, pytorch-metric-learning {env['pytorch_metric_learning']}, "
        f"pml-crt {env['pml_crt']}, faiss {env['faiss']}.\n"
        f"Per-seed and per-fold values: `{name}.csv`.\n"
    )
