"""A run folder's layout: which unit folders a config has, their file names, atomic writes.

``<out>/<config name>/<method>/seed<k>/fold<p>/`` holds one unit: ``config.yaml``,
``env.json``, ``logs/``, ``models/``, ``results.json`` once it finished
(:data:`RESULTS`), its test embeddings (:data:`EMBEDDINGS`) and, while unfinished,
its resume point (``resume/resume.json``, :mod:`benchmarks.protocol.resume`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .build import is_frozen_method

__all__ = [
    "CACHE",
    "EMBEDDINGS",
    "MARKER",
    "RESULTS",
    "RESUME",
    "Log",
    "save_atomic",
    "unit_dir",
    "unit_folds",
    "write_atomic",
]

RESULTS = "results.json"
CACHE = ".cache"  # <out>/.cache/: the frozen trunk blocks' outputs, shared by runs and searches
EMBEDDINGS = "test_embeddings.pt"
RESUME = "resume"  # a unit's resume points: resume/resume.json + resume/models<epoch>/
MARKER = "resume.json"

Log = Callable[[str], None]


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` through a temporary file and ``os.replace``."""
    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def unit_folds(config: Mapping[str, Any]) -> list[int]:
    """The folds a method runs: all of ``folds``, or only the first for the frozen baseline.

    The frozen baseline never sees training data, so its fold models would
    be identical.
    """
    folds = [int(f) for f in config["folds"]]
    return folds[:1] if is_frozen_method(config) else folds


def unit_dir(root: Path, method: str, seed: int, fold: int) -> Path:
    return root / method / f"seed{seed}" / f"fold{fold}"
