"""A run folder's layout: which unit folders a config has, their file names, atomic writes.

``<out>/<config name>/<method>/seed<k>/fold<p>/`` holds one unit: ``config.yaml``,
``env.json``, ``logs/``, ``models/`` (:data:`MODELS`), ``results.json`` once it
finished (:data:`RESULTS`), its test embeddings (:data:`EMBEDDINGS`) and, while
unfinished, its resume point (``resume/resume.json``, :mod:`benchmarks.protocol.resume`).
A unit that can never finish (a pruned search trial's) keeps its config and logs,
not its checkpoints (:func:`drop_checkpoints`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from .build import is_frozen_method

__all__ = [
    "CACHE",
    "EMBEDDINGS",
    "MARKER",
    "MODELS",
    "RESULTS",
    "RESUME",
    "Log",
    "drop_checkpoints",
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
MODELS = "models"  # the trainer's checkpoints (PML's hooks save and load them there)

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


def drop_checkpoints(folder: Path) -> None:
    """Delete the checkpoints and resume points under ``folder`` (one unit's or a trial's).

    For units that will never run again, a pruned trial's: its models and resume
    point are tens of MB per unit that nothing can use. Config and logs stay.
    """
    for name in (MODELS, RESUME):
        for path in list(folder.rglob(name)):
            if path.is_dir():
                shutil.rmtree(path)


def unit_folds(config: Mapping[str, Any]) -> list[int]:
    """The folds a method runs: all of ``folds``, or only the first for the frozen baseline.

    The frozen baseline never sees training data, so its fold models would
    be identical.
    """
    folds = [int(f) for f in config["folds"]]
    return folds[:1] if is_frozen_method(config) else folds


def unit_dir(root: Path, method: str, seed: int, fold: int) -> Path:
    return root / method / f"seed{seed}" / f"fold{fold}"
