"""Shared helpers of the perf scripts: machine facts, interleaved timing, JSON, the baseline."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

__all__ = [
    "DEFAULT_OUT",
    "REPO_ROOT",
    "Run",
    "coded_residual_heads_only",
    "command_line",
    "interleaved_times",
    "load_average",
    "load_baseline",
    "machine_info",
    "primary_clock",
    "summarize",
    "write_json",
]

DEFAULT_OUT = Path("benchmarks/results/perf")
REPO_ROOT = Path(__file__).resolve().parents[2]


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages (``os.getloadavg``)."""
    return [round(v, 2) for v in os.getloadavg()]


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (``platform.processor()`` elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except ImportError:
        return None
    return getattr(mod, "__version__", "unknown")


def machine_info() -> dict[str, Any]:
    """CPU model, core counts, torch threads, library versions, load average, time."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    try:
        with open("/proc/meminfo") as f:
            mem_kib = int(next(line for line in f if line.startswith("MemTotal")).split()[1])
    except (OSError, StopIteration, ValueError):
        mem_kib = None
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": usable,
        "memory_gib": None if mem_kib is None else round(mem_kib / 2**20, 1),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "pytorch_metric_learning": _version("pytorch_metric_learning"),
        "faiss": _version("faiss"),
        "numpy": _version("numpy"),
        "load_average_start": load_average(),
        "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def command_line(module: str) -> str:
    """The command that reproduces this run (``python -m module args...``)."""
    return " ".join(["python", "-m", module, *sys.argv[1:]])


def load_baseline(rev: str, into: Path) -> ModuleType:
    """Import ``pml_crt`` of git revision ``rev`` as the package ``pml_crt_before``.

    The package is extracted with ``git archive`` into the folder ``into``,
    which goes first on ``sys.path``; the working tree's ``pml_crt`` stays
    importable next to it.
    """
    archive = subprocess.run(
        ["git", "archive", rev, "pml_crt"], cwd=REPO_ROOT, capture_output=True, check=True
    ).stdout
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(into, filter="data")
    (into / "pml_crt").rename(into / "pml_crt_before")
    sys.path.insert(0, str(into))
    return importlib.import_module("pml_crt_before")


def coded_residual_heads_only(cls: type) -> dict[str, Any]:
    """``{"global_pooling": None}`` where ``cls`` takes that argument, else ``{}``.

    The GeM branch of ``CRT`` and ``MultiHeadCRT`` became their default after the
    revisions these scripts compare with, which have no such argument; with this, both
    revisions build the same model (coded-residual heads only), so a ratio measures the
    code.
    """
    return {"global_pooling": None} if "global_pooling" in inspect.signature(cls).parameters else {}


def interleaved_times(
    fns: Mapping[str, Callable[[], Any]],
    rounds: int,
    warmup: int = 1,
) -> dict[str, dict[str, list[float]]]:
    """Seconds per call of every function, measured side by side.

    Each round runs every function once; the order rotates from round to round
    so that no function always runs first or after the same neighbour. Noise
    from other processes therefore hits all functions alike, and ratios of
    medians are more stable than the times themselves.

    Returns:
        ``{name: {"wall": [...], "cpu": [...]}}``: wall-clock seconds
        (``time.perf_counter``) and this process's CPU seconds
        (``time.process_time``, user + system, all threads). With one torch
        thread on a machine shared with other jobs, CPU time is the stable
        measure of the work done; wall time includes waiting for a core.
    """
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            wall, cpu = time.perf_counter(), time.process_time()
            fns[name]()
            times[name]["cpu"].append(time.process_time() - cpu)
            times[name]["wall"].append(time.perf_counter() - wall)
    return times


def primary_clock() -> str:
    """``"cpu"`` with one torch thread (stable under load), else ``"wall"``."""
    return "cpu" if torch.get_num_threads() == 1 else "wall"


def summarize(samples: Mapping[str, list[float]] | list[float]) -> dict[str, Any]:
    """Median and minimum of timings (seconds) per clock; ``median_s`` of :func:`primary_clock`."""
    if not isinstance(samples, Mapping):
        samples = {"wall": list(samples)}
    out: dict[str, Any] = {"n": len(next(iter(samples.values())))}
    for clock, values in samples.items():
        out[f"{clock}_median_s"] = statistics.median(values)
        out[f"{clock}_min_s"] = min(values)
    clock = primary_clock() if primary_clock() in samples else next(iter(samples))
    out["clock"] = clock
    out["median_s"] = out[f"{clock}_median_s"]
    return out


def write_json(data: Mapping[str, Any], path: Path) -> Path:
    """Write ``data`` as indented JSON, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    return path


@dataclass
class Run:
    """One run of a perf script: its module, start time and the machine at the start.

    Create it after ``torch.set_num_threads`` (:func:`machine_info` records
    the number of threads).
    """

    module: str
    started: float = field(default_factory=time.perf_counter)
    info: dict[str, Any] = field(default_factory=machine_info)

    def elapsed(self) -> float:
        """Wall-clock seconds since the start."""
        return time.perf_counter() - self.started

    def write(
        self, settings: Mapping[str, Any], data: Mapping[str, Any], path: Path
    ) -> dict[str, Any]:
        """Write the run's JSON to ``path``, say where, and return it.

        In order: ``script``, ``command`` (:func:`command_line`), the run's
        ``settings`` (its options), ``machine`` (:func:`machine_info` with the
        load average at the end), the measured ``data``, ``elapsed_s``.
        """
        result = {
            "script": self.module,
            "command": command_line(self.module),
            **settings,
            "machine": {**self.info, "load_average_end": load_average()},
            **data,
            "elapsed_s": self.elapsed(),
        }
        path = write_json(result, path)
        print(f"wrote {path} in {result['elapsed_s']:.0f} s")
        return result
