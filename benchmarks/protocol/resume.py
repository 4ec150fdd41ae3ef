"""Resuming: a unit's resume points, rolling a unit folder back to one, and reuse checks.

A finished unit (``results.json``) is reused only when its stored config matches in
every key that changes results (:func:`check_previous`); an unfinished one continues
from its last resume point (:func:`prepare_unit_folder`) or starts over.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from pytorch_metric_learning import samplers
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import logging_presets

from . import distributed as ddp
from .config import DEFAULTS, UserError, deep_merge
from .layout import EMBEDDINGS, MARKER, MODELS, RESUME, Log, write_atomic
from .provenance import environment

__all__ = [
    "check_previous",
    "load_resume_state",
    "prepare_unit_folder",
    "semantic_config",
    "write_resume_point",
]

# Keys that do not change a unit's results: a re-run may differ in them and still skip.
_NON_SEMANTIC = {
    ("seeds",),  # a unit is one (seed, fold): the lists of others may grow
    ("folds",),
    ("threads",),
    ("device",),
    ("dataset", "root"),
    ("dataset", "download"),
    ("trunk", "weights_path"),
    ("trunk", "hub_dir"),
    ("training", "num_workers"),
    ("training", "log_freq"),
    ("eval", "batch_size"),
    ("eval", "prefer_faiss"),
    ("tune",),  # how a search runs; a unit's config already holds the parameters it chose
}


def semantic_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``config`` without the keys that do not change a unit's results."""
    config = json.loads(json.dumps(config))
    for path in _NON_SEMANTIC:
        node = config
        for key in path[:-1]:
            node = node.get(key) or {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return config


def check_previous(folder: Path, config: Mapping[str, Any], seed: int, fold: int) -> None:
    """Refuse to reuse a finished unit whose stored config differs in a key that matters."""
    stored_path = folder / "config.yaml"
    if not stored_path.exists():
        return
    # A unit run before a config key existed stored no value for it: it ran with the
    # key's default, so both sides are completed with DEFAULTS before comparing.
    stored = deep_merge(DEFAULTS, yaml.safe_load(stored_path.read_text()), False)
    current = deep_merge(DEFAULTS, {**config, "seed": seed, "fold": fold}, False)
    current = json.loads(json.dumps(current))
    if semantic_config(stored) != semantic_config(current):
        raise UserError(
            f"{folder} was run with a different config (see its config.yaml). Use another "
            "--out or config name, or delete that folder to re-run it."
        )


# --------------------------------------------------------------------------- resuming a unit
#
# A unit's "completed epoch" is a test epoch (``epoch % test_interval == 0``) whose
# record-keeper rows, model/optimizer/scheduler/loss/miner files and RNG + sampler state
# are all on disk. HookContainer's end-of-epoch hook (stock) writes, in this order: the
# record-keeper rows of the epoch (``save_records``: CSV files, then logs.db), then
# ``models/*_<epoch>.pth`` (deleting ``*_<epoch - test_interval>.pth``), then the best
# checkpoint (deleting the previous best). After it returns, ``write_resume_point``
# hard-links the checkpoint files into ``resume/models<epoch>/`` (they survive the
# deletions of the next epoch), then writes ``resume/resume.json`` atomically, LAST: the
# epoch, the RNG states, the sampler's label order, and how far every log reached (CSV
# byte sizes, SQLite max row id per table). A kill anywhere before the marker's
# ``os.replace`` leaves the previous marker in force; on resume everything newer than it
# (log rows, checkpoint files, embeddings) is dropped and the epoch is redone.


def _rng_state() -> dict[str, Any]:
    version, internal, gauss = random.getstate()
    kind, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(cached)],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def _set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state:
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _log_positions(logs: Path) -> dict[str, dict[str, int]]:
    """How far the record-keeper logs reach: CSV byte sizes and SQLite max row id per table."""
    csvs = {p.name: p.stat().st_size for p in sorted(logs.glob("*.csv"))}
    tables: dict[str, int] = {}
    db = logs / "logs.db"
    if db.exists():
        with sqlite3.connect(db) as conn:
            names = conn.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            ).fetchall()
            for (name,) in names:
                (top,) = conn.execute(f'SELECT coalesce(max(id), 0) FROM "{name}"').fetchone()
                tables[name] = int(top)
        conn.close()
    return {"csv": csvs, "db": tables}


def _truncate_logs(logs: Path, positions: Mapping[str, Mapping[str, int]]) -> None:
    """Drop every log row written after ``positions`` (CSV and SQLite), ids included."""
    logs.mkdir(parents=True, exist_ok=True)
    for path in logs.glob("*.csv"):
        size = positions["csv"].get(path.name)
        if size is None:
            path.unlink()
        elif path.stat().st_size > size:
            with path.open("r+b") as f:
                f.truncate(size)
    db = logs / "logs.db"
    if not db.exists():
        return
    with sqlite3.connect(db) as conn:
        names = conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
        ).fetchall()
        has_sequence = bool(
            conn.execute(
                "SELECT 1 FROM sqlite_master WHERE type='table' AND name='sqlite_sequence'"
            ).fetchall()
        )
        for (name,) in names:
            top = positions["db"].get(name)
            if top is None:
                conn.execute(f'DROP TABLE "{name}"')
                if has_sequence:
                    conn.execute("DELETE FROM sqlite_sequence WHERE name=?", (name,))
                continue
            conn.execute(f'DELETE FROM "{name}" WHERE id > ?', (top,))
            if has_sequence:  # AUTOINCREMENT: the next row gets id top + 1, as uninterrupted
                conn.execute("UPDATE sqlite_sequence SET seq=? WHERE name=?", (top, name))
    conn.close()


def _link_or_copy(source: Path, target: Path) -> None:
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def write_resume_point(
    folder: Path, trainer: Any, sampler: samplers.MPerClassSampler, stopped: bool
) -> bool:
    """Write ``resume/`` for the epoch the trainer just finished; ``False`` if not resumable.

    Called after HookContainer's end-of-epoch hook has saved the epoch's records and
    checkpoint files. The marker goes last, atomically.
    """
    epoch = int(trainer.epoch)
    iterator = getattr(trainer, "dataloader_iter", None)
    if getattr(iterator, "_num_yielded", None) != len(trainer.dataloader):
        # The next epoch would continue a half-used index list: not reproducible from here.
        return False
    resume, models = folder / RESUME, folder / MODELS
    resume.mkdir(exist_ok=True)
    name = f"models{epoch}"
    staging = resume / f".{name}.tmp"
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir()
    for path in sorted(models.glob("*.pth")):
        _link_or_copy(path, staging / path.name)
    if (resume / name).exists():
        shutil.rmtree(resume / name)
    os.replace(staging, resume / name)
    marker = {
        "epoch": epoch,
        "global_iteration": int(trainer.get_global_iteration()),
        "stopped": bool(stopped),
        "models": name,
        "sampler_labels": [int(label) for label in sampler.labels],
        "rng": _rng_state(),
        "logs": _log_positions(folder / "logs"),
    }
    write_atomic(resume / MARKER, json.dumps(marker))
    for path in resume.iterdir():
        if path.name not in (MARKER, name):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return True


def _read_resume_point(folder: Path, unit_config: Mapping[str, Any]) -> dict[str, Any] | None:
    """The marker of an unfinished unit run under the same config, else ``None``."""
    try:
        marker = json.loads((folder / RESUME / MARKER).read_text())
        stored = yaml.safe_load((folder / "config.yaml").read_text())
    except (OSError, ValueError, yaml.YAMLError):
        return None
    if not isinstance(stored, dict) or semantic_config(stored) != semantic_config(unit_config):
        return None
    if not isinstance(marker, dict) or not {"epoch", "models", "rng", "logs"} <= set(marker):
        return None
    if not (folder / RESUME / str(marker["models"])).is_dir():
        return None
    return marker


def _restore_resume_point(folder: Path, marker: Mapping[str, Any]) -> None:
    """Roll the unit folder back to the marker: checkpoint files, logs; drop newer outputs."""
    resume, models = folder / RESUME, folder / MODELS
    for path in resume.iterdir():
        if path.name not in (MARKER, marker["models"]):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if models.exists():
        shutil.rmtree(models)
    models.mkdir()
    for path in sorted((resume / marker["models"]).glob("*.pth")):
        shutil.copy2(path, models / path.name)  # a copy: the resume point stays untouched
    _truncate_logs(folder / "logs", marker["logs"])
    (folder / EMBEDDINGS).unlink(missing_ok=True)


def load_resume_state(
    trainer: Any,
    hooks: logging_presets.HookContainer,
    sampler: samplers.MPerClassSampler,
    folder: Path,
    marker: Mapping[str, Any],
    device: torch.device,
) -> None:
    """Load the marker epoch's trainer objects, sampler order and RNG states.

    Models go into the module inside DDP (checkpoints hold the unwrapped state).
    """
    for name in hooks.saveable_trainer_objects:
        objects = getattr(trainer, name, None)
        if objects:
            objects = {key: ddp.unwrap(value) for key, value in objects.items()}
            c_f.load_dict_of_models(objects, marker["epoch"], str(folder / MODELS), device)
    by_value = {int(label): label for label in sampler.labels}
    sampler.labels = [by_value[label] for label in marker["sampler_labels"]]
    hash_map = folder / "logs" / "hash_map.json"
    if hash_map.exists() and hooks.record_keeper is not None:
        hooks.record_keeper.hash_map.update(json.loads(hash_map.read_text()))
    _set_rng_state(marker["rng"])


def _resumed_env(folder: Path, marker: Mapping[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    """The unit's previous ``env.json`` with this resume appended to its ``resumes``."""
    try:
        previous = json.loads((folder / "env.json").read_text())
    except (OSError, ValueError):
        previous = {}
    resumes = previous.get("resumes", [])
    resumes.append({"epoch": marker["epoch"], **{k: env[k] for k in ("started", "command")}})
    return {**previous, "resumes": resumes} if previous else {**env, "resumes": resumes}


def prepare_unit_folder(
    config: Mapping[str, Any],
    seed: int,
    fold: int,
    folder: Path,
    device: torch.device,
    log: Log,
    launch: ddp.Launch,
) -> dict[str, Any] | None:
    """Rank 0 rolls the unit folder back to its resume point or starts it afresh.

    Returns the resume marker (on every rank: rank 0's), ``None`` for a fresh start.
    """
    marker = None
    if launch.is_main:
        unit_config = json.loads(json.dumps({**config, "seed": seed, "fold": fold}))
        marker = _read_resume_point(folder, unit_config) if folder.exists() else None
        env = {**environment(seed, device), "world_size": launch.world_size}
        if marker is not None:
            _restore_resume_point(folder, marker)
            env = _resumed_env(folder, marker, env)
            log(f"resuming {folder} after epoch {marker['epoch']}")
        else:
            if folder.exists():
                shutil.rmtree(folder)  # an unfinished unit without a resume point: start over
            folder.mkdir(parents=True)
            write_atomic(folder / "config.yaml", yaml.safe_dump(unit_config, sort_keys=False))
        write_atomic(folder / "env.json", json.dumps(env, indent=2))
    return launch.broadcast(marker)
