"""Run a benchmark config: the MLRC protocol with stock PML parts.

    python -m benchmarks.run --config benchmarks/configs/omniglot_quick.yaml
    python -m benchmarks.run --config benchmarks/configs/cub_compare.yaml \\
        --set seeds=[0,1] --set training.num_epochs=5 --out runs/

For every seed, method and fold (a "unit") it trains with
``trainers.MetricLossOnly`` (``MPerClassSampler`` batches, the method's PML
loss and miner), validates every ``test_interval`` epochs with
``testers.GlobalEmbeddingSpaceTester`` through ``logging_presets.HookContainer``
(record-keeper logs, best checkpoint by validation MAP@R, early stopping with
``patience``), reloads the best checkpoint and evaluates it on the test
classes. Results land in ``<out>/<config name>/<method>/seed<k>/fold<p>/``;
a unit whose ``results.json`` exists is skipped, and an unfinished one continues
from its last completed epoch (``resume/resume.json``), so an interrupted run is
resumed by running the same command again. At the end the per-fold results
are combined ("separate": mean over fold models; "concatenated": the fold
models' L2-normalised embeddings concatenated) and a markdown table (mean ±
95% CI over seeds) is printed and written to ``table.md`` and ``results.csv``.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import functools
import io
import json
import logging
import math
import os
import platform
import random
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import numpy as np
import torch
import tqdm
import yaml
from pytorch_metric_learning import samplers, testers, trainers
from pytorch_metric_learning.utils import common_functions as c_f
from pytorch_metric_learning.utils import logging_presets

import pml_crt
from pml_crt.utils import make_accuracy_calculator
from pml_crt.utils.distributed import RankShardSampler
from pml_crt.utils.stats import format_mean_ci, mean_ci95

from . import distributed as ddp
from .build import (
    build_embedder,
    build_loss,
    build_optimizers,
    build_trunk,
    is_frozen_method,
    trunk_is_cacheable,
)
from .cache import CachedDataset, TrunkTail, cache_dataset, cache_module_outputs, frozen_prefix
from .config import ConfigError, UserError, load_config, method_config, method_names
from .data import Source, ToFloat, TransformedDataset, class_subset, load_source, pil_transform
from .metrics import BenchmarkAccuracyCalculator
from .perf.common import cpu_model
from .splits import FoldSplit, mlrc_split

__all__ = ["DataPipeline", "aggregate", "main", "results_table", "run_benchmark", "run_unit"]

TABLE_METRICS = {
    "precision_at_1": "P@1",
    "r_precision": "R-Precision",
    "mean_average_precision_at_r": "MAP@R",
    "recall_at_1": "R@1",
    "spectral_decay": "spectral decay ρ",
    "embedding_density": "density π",
}
# Metrics shown as they are (not as percent), with 3 decimals.
_UNSCALED = {"spectral_decay", "embedding_density"}
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
}
RESULTS = "results.json"
EMBEDDINGS = "test_embeddings.pt"
RESUME = "resume"  # a unit's resume points: resume/resume.json + resume/models<epoch>/
MARKER = "resume.json"

Log = Callable[[str], None]
T = TypeVar("T")


# --------------------------------------------------------------------------- files


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


@functools.cache
def _git_commit() -> str | None:
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


def environment(seed: int | None = None, device: torch.device | None = None) -> dict[str, Any]:
    """Versions, machine and threads, for ``env.json``."""
    import pytorch_metric_learning
    import torchvision

    try:
        import faiss

        faiss_version = getattr(faiss, "__version__", "unknown")
    except ImportError:
        faiss_version = None
    env = {
        "seed": seed,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "pytorch_metric_learning": pytorch_metric_learning.__version__,
        "pml_crt": pml_crt.__version__,
        "faiss": faiss_version,
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
        "git_commit": _git_commit(),
        "command": " ".join(sys.argv),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    return env


def _semantic(config: Mapping[str, Any]) -> dict[str, Any]:
    config = json.loads(json.dumps(config))
    for path in _NON_SEMANTIC:
        node = config
        for key in path[:-1]:
            node = node.get(key) or {}
        if isinstance(node, dict):
            node.pop(path[-1], None)
    return config


def _mean(values: Sequence[float]) -> float:
    return float(sum(values) / len(values))


# --------------------------------------------------------------------------- data


class DataPipeline:
    """Loads a dataset once per process and hands out (cached) image and feature datasets.

    Every dataset it returns covers all images of the source, labelled by class
    position, with float tensors as inputs; :func:`class_subset` then picks a
    fold's classes without copying.
    """

    def __init__(self, dataset_config: Mapping[str, Any], log: Log = print, progress: bool = True):
        self.dataset_config = dict(dataset_config)
        self.log = log
        self.progress = progress
        self._source: Source | None = None
        self._images: dict[str, Any] = {}
        self._features: dict[str, CachedDataset] = {}

    @property
    def source(self) -> Source:
        if self._source is None:
            self._source = load_source(self.dataset_config)
            self.log(
                f"{self._source.name}: {self._source.num_classes} classes, "
                f"{len(self._source.labels)} images"
            )
        return self._source

    def images(self, config: Mapping[str, Any], train: bool) -> Any:
        """All images as float tensors: cached ``uint8`` unless randomly augmented."""
        images, cache = config["images"], config["cache"]
        finish = ToFloat(images.get("normalize", "imagenet"))
        if train and images.get("augmentation", "none") != "none":
            return TransformedDataset(
                self.source.dataset, _Compose(pil_transform(images, True), finish)
            )
        deterministic = {k: images.get(k) for k in ("resize", "crop", "normalize")}
        key = json.dumps([deterministic, bool(cache.get("images", True))], sort_keys=True)
        if key not in self._images:
            decode = TransformedDataset(self.source.dataset, pil_transform(images, False))
            if cache.get("images", True):
                start = time.time()
                cached = cache_dataset(
                    decode,
                    finish,
                    batch_size=256,
                    num_workers=int(config["training"].get("num_workers", 0)),
                    desc="decoding images",
                    progress=self.progress,
                )
                self.log(
                    f"cached {len(cached)} images {tuple(cached.data.shape[1:])} uint8 "
                    f"({cached.data.numel() / 2**20:.0f} MiB) in {time.time() - start:.1f} s"
                )
                self._images[key] = cached
            else:
                self._images[key] = TransformedDataset(
                    self.source.dataset, _Compose(pil_transform(images, False), finish)
                )
        return self._images[key]

    def features(
        self, config: Mapping[str, Any], trunk: torch.nn.Module, device: torch.device
    ) -> CachedDataset:
        """The frozen first blocks of ``trunk`` run once over all (eval-transformed) images."""
        dtype = getattr(torch, str(config["cache"].get("feature_dtype", "float32")))
        key = json.dumps(
            [
                {k: config["trunk"].get(k) for k in ("name", "weights", "frozen_blocks", "kwargs")},
                {k: config["images"].get(k) for k in ("resize", "crop", "normalize")},
                str(dtype),
            ],
            sort_keys=True,
        )
        if key not in self._features:
            start = time.time()
            features = cache_module_outputs(
                frozen_prefix(trunk),
                self.images(config, train=False),
                batch_size=int(config["eval"]["batch_size"]),
                device=device,
                dtype=dtype,
                desc="caching frozen trunk blocks",
                progress=self.progress,
            )
            self.log(
                f"cached the output of {trunk.frozen_blocks} frozen trunk blocks "
                f"{tuple(features.data.shape[1:])} {dtype} "
                f"({features.data.numel() * features.data.element_size() / 2**20:.0f} MiB) "
                f"in {time.time() - start:.1f} s"
            )
            if dtype != torch.float32:
                features.transform = _ToFloat32()
            self._features[key] = features
        return self._features[key]


class _Compose:
    def __init__(self, *steps: Callable[[Any], Any]) -> None:
        self.steps = steps

    def __call__(self, x: Any) -> Any:
        for step in self.steps:
            x = step(x)
        return x


class _ToFloat32:
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.float()


# --------------------------------------------------------------------------- one unit


def config_device(config: Mapping[str, Any]) -> torch.device:
    """The config's ``device``; ``auto`` is CUDA when available, else the CPU."""
    name = str(config.get("device", "auto"))
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    """Python, NumPy (PML's samplers draw from ``np.random``) and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def unit_folds(config: Mapping[str, Any]) -> list[int]:
    """The folds a method runs: all of ``folds``, or only the first for the frozen baseline.

    The frozen baseline never sees training data, so its fold models would
    be identical.
    """
    folds = [int(f) for f in config["folds"]]
    return folds[:1] if is_frozen_method(config) else folds


def unit_dir(root: Path, method: str, seed: int, fold: int) -> Path:
    return root / method / f"seed{seed}" / f"fold{fold}"


def _metrics(accuracies: Mapping[str, Any], names: Sequence[str]) -> dict[str, float]:
    out = {}
    for name in names:
        for key in (f"{name}_level0", name):
            if key in accuracies:
                value = accuracies[key]  # sqlite hands a stored NaN back as None
                out[name] = float("nan") if value is None else float(value)
                break
    return out


def make_calculator(config: Mapping[str, Any]) -> BenchmarkAccuracyCalculator:
    return make_accuracy_calculator(
        include=tuple(config["eval"]["metrics"]),
        k="max_bin_count",
        prefer_faiss=bool(config["eval"].get("prefer_faiss", True)),
        calculator_class=BenchmarkAccuracyCalculator,
    )


def _check_batch(
    split_name: str, classes: int, config: Mapping[str, Any], world_size: int = 1
) -> None:
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


# --------------------------------------------------------------------------- resuming a unit
#
# A unit's "completed epoch" is a test epoch (``epoch % test_interval == 0``) whose
# record-keeper rows, model/optimizer/scheduler/loss/miner files and RNG + sampler state
# are all on disk. HookContainer's end-of-epoch hook (stock) writes, in this order: the
# record-keeper rows of the epoch (``save_records``: CSV files, then logs.db), then
# ``models/*_<epoch>.pth`` (deleting ``*_<epoch - test_interval>.pth``), then the best
# checkpoint (deleting the previous best). After it returns, ``_write_resume_point``
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


def _write_resume_point(
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
    resume, models = folder / RESUME, folder / "models"
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
    if not isinstance(stored, dict) or _semantic(stored) != _semantic(unit_config):
        return None
    if not isinstance(marker, dict) or not {"epoch", "models", "rng", "logs"} <= set(marker):
        return None
    if not (folder / RESUME / str(marker["models"])).is_dir():
        return None
    return marker


def _restore_resume_point(folder: Path, marker: Mapping[str, Any]) -> None:
    """Roll the unit folder back to the marker: checkpoint files, logs; drop newer outputs."""
    resume, models = folder / RESUME, folder / "models"
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


def _load_resume_state(
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
            c_f.load_dict_of_models(objects, marker["epoch"], str(folder / "models"), device)
    by_value = {int(label): label for label in sampler.labels}
    sampler.labels = [by_value[label] for label in marker["sampler_labels"]]
    hash_map = folder / "logs" / "hash_map.json"
    if hash_map.exists() and hooks.record_keeper is not None:
        hooks.record_keeper.hash_map.update(json.loads(hash_map.read_text()))
    _set_rng_state(marker["rng"])


def run_unit(
    config: Mapping[str, Any],
    seed: int,
    fold: int,
    folder: Path,
    data: DataPipeline,
    device: torch.device,
    hub_dir: Path,
    log: Log = print,
    launch: ddp.Launch = ddp.SINGLE_PROCESS,
    on_validation: Callable[[int, float], None] | None = None,
) -> dict[str, Any] | None:
    """Train (unless frozen) and test one (method, seed, fold); write ``results.json``.

    An unfinished unit with a resume point (``resume/resume.json``, same config)
    continues from that epoch; any other unfinished unit folder is started over.
    Under ``torchrun`` every rank calls it; rank 0 alone writes the folder and
    returns the results, the other ranks train with it and return ``None``
    (see :mod:`benchmarks.distributed`).

    ``on_validation(epoch, value)`` (single process only) is called after each
    validation with the epoch's value of ``eval.primary_metric``, before the
    epoch's resume point is written (so a unit resumed after a crash calls it
    again for that epoch); an exception it raises (a pruned search trial) stops
    the unit there.
    """
    if on_validation is not None and launch.distributed:
        raise ValueError("on_validation is for single-process units")
    marker = _prepare_unit_folder(config, seed, fold, folder, device, log, launch)
    start = time.time()

    source = data.source
    split: FoldSplit = mlrc_split(source.num_classes, fold, int(config["num_folds"]))
    seed_everything(seed)
    trunk = build_trunk(config["trunk"], source.channels, hub_dir).to(device)
    # Building a cache draws from torch's RNG (DataLoader seeds); whether this unit builds
    # it or finds it built must not change the unit's random stream.
    with torch.random.fork_rng(devices=[]):
        if trunk_is_cacheable(trunk, config):
            all_train = all_eval = data.features(config, trunk, device)
            trunk = TrunkTail(trunk, trunk.frozen_blocks)
        else:
            all_train = data.images(config, train=True)
            all_eval = data.images(config, train=False)
    embedder = build_embedder(config["embedder"], int(trunk.out_channels)).to(device)
    train = class_subset(all_train, split.train)
    val = class_subset(all_eval, split.val)
    test = class_subset(all_eval, split.test)

    metrics = list(config["eval"]["metrics"])
    primary = config["eval"]["primary_metric"]
    calculator = make_calculator(config)
    if launch.is_main:
        record_keeper, _, tensorboard = logging_presets.get_record_keeper(
            str(folder / "logs"), str(folder / "tensorboard")
        )
        # Ctrl-C waits for a save (CSV files, then logs.db) to finish: they stay consistent.
        record_keeper.save_records = sigint_held()(record_keeper.save_records)
    else:  # the other ranks write nothing; their container only names what is checkpointed
        record_keeper, tensorboard = None, None
    hooks = logging_presets.HookContainer(
        record_keeper,
        primary_metric=primary,
        validation_split_name="val",
        log_freq=int(config["training"]["log_freq"]),
    )
    num_workers = int(config["training"].get("num_workers", 0))
    tester = testers.GlobalEmbeddingSpaceTester(
        end_of_testing_hook=hooks.end_of_testing_hook,
        accuracy_calculator=calculator,
        batch_size=int(config["eval"]["batch_size"]),
        dataloader_num_workers=num_workers,
        data_device=device,
    )
    model_dir = folder / "models"
    result: dict[str, Any] = {
        "config": config["name"],
        "method": config["method"],
        "seed": seed,
        "fold": fold,
        "num_classes": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "num_images": {"train": len(train), "val": len(val), "test": len(test)},
    }
    train_start = time.time()
    if is_frozen_method(config):
        if not launch.is_main:
            launch.barrier()  # rank 0 evaluates; the others wait for the next unit
            return None
        tester.test({"val": val}, 0, trunk, embedder, splits_to_eval=[("val", ["val"])])
        best_epoch, epochs_run = 0, 0
        result.update(trained=False)
    else:
        training = config["training"]
        _check_batch("train", len(split.train), config, launch.world_size)
        loss_funcs, mining_funcs = build_loss(config, embedder, len(split.train))
        loss_funcs = {k: v.to(device) for k, v in loss_funcs.items()}
        models = {"trunk": trunk, "embedder": embedder}
        optimizers = build_optimizers(config, models, loss_funcs)
        loss_funcs, mining_funcs = ddp.wrap_losses(loss_funcs, mining_funcs, launch)
        batch_size, iterations = int(training["batch_size"]), int(training["iterations_per_epoch"])
        sampler = samplers.MPerClassSampler(
            train.labels,
            m=int(training["m"]),
            batch_size=batch_size,
            length_before_new_iter=batch_size * iterations,
        )
        # Under torchrun every rank draws the same global batch and loads its share.
        shard = (
            RankShardSampler(sampler, batch_size, launch.rank, launch.world_size, seed=seed)
            if launch.distributed
            else None
        )
        test_interval = int(training["test_interval"])
        if launch.is_main:
            hook = hooks.end_of_epoch_hook(
                tester,
                {"val": val},
                str(model_dir),
                test_interval=test_interval,
                patience=training.get("patience"),
                splits_to_eval=[("val", ["val"])],
            )

        def end_of_epoch_hook(trainer: trainers.BaseTrainer) -> bool | None:
            # Rank 0: the stock hook (records, then checkpoint files), then the resume
            # marker; every rank then follows rank 0's early-stopping decision.
            keep_going = None
            if launch.is_main:
                keep_going = hook(trainer)
                if trainer.epoch % test_interval == 0:
                    if on_validation is not None:
                        value = tester.all_accuracies["val"][f"{primary}_level0"]
                        on_validation(int(trainer.epoch), float(value))
                    _write_resume_point(folder, trainer, sampler, stopped=keep_going is False)
            return launch.broadcast(keep_going)

        trainer = trainers.MetricLossOnly(
            models=ddp.wrap_models(models, launch, device),
            optimizers=optimizers,
            batch_size=batch_size // launch.world_size,
            loss_funcs=loss_funcs,
            mining_funcs=mining_funcs,
            dataset=train,
            sampler=shard or sampler,
            iterations_per_epoch=iterations,
            dataloader_num_workers=num_workers,
            data_device=device,
            end_of_iteration_hook=hooks.end_of_iteration_hook if launch.is_main else None,
            end_of_epoch_hook=end_of_epoch_hook,
        )
        num_epochs, epochs_run = int(training["num_epochs"]), 0
        if marker is not None:
            _load_resume_state(trainer, hooks, sampler, folder, marker, device)
            epochs_run = int(marker["epoch"])
            if shard is not None:
                shard.set_epoch(epochs_run)
        if not (marker is not None and marker["stopped"]) and epochs_run < num_epochs:
            trainer.train(start_epoch=epochs_run + 1, num_epochs=num_epochs)
            epochs_run = int(trainer.epoch)
        trainer.models.update(models)  # the plain modules again, for loading and testing
        if not launch.is_main:
            launch.barrier()
            return None
        best_epoch, _ = hooks.get_best_epoch_and_accuracy(tester, "val")
        if best_epoch is None:
            raise RuntimeError(
                "no validation result was recorded: num_epochs must be >= test_interval"
            )
        hooks.load_latest_saved_models(trainer, str(model_dir), device, best=True)
        if training.get("keep_checkpoints", "best") == "best":
            for path in model_dir.glob("*.pth"):
                if "_best" not in path.name:
                    path.unlink()
        result.update(trained=True, parameters={k: _count(v) for k, v in models.items()})
    train_time = time.time() - train_start

    rows, _ = hooks.get_accuracies_of_best_epoch(tester, "val")
    if not rows and best_epoch == 0:
        rows = [tester.all_accuracies["val"]]
    result["val"] = _metrics(dict(rows[0]) if rows else {}, metrics)
    result["best_epoch"] = best_epoch
    result["epochs_run"] = epochs_run

    eval_start = time.time()
    if report_split(config) == "test":
        embeddings, labels = tester.get_all_embeddings(test, trunk, embedder)
        labels = labels[:, 0]
        accuracies = calculator.get_accuracy(embeddings, labels, embeddings, labels, True)
        result["test"] = _metrics(accuracies, metrics)
        result["embedding_size"] = int(embeddings.shape[1])
        record_keeper.update_records(
            {f"{k}_level0": v for k, v in result["test"].items()} | {"epoch": best_epoch},
            best_epoch,
            parent_name="test_accuracies",
        )
        if config["eval"].get("save_embeddings", True):
            save_atomic(
                {"embeddings": embeddings.cpu(), "labels": labels.cpu().long()},
                folder / EMBEDDINGS,
            )
    record_keeper.save_records()
    if tensorboard is not None:
        tensorboard.close()
    result["train_time_s"] = round(train_time, 2)
    result["eval_time_s"] = round(time.time() - eval_start, 2)
    result["total_time_s"] = round(time.time() - start, 2)
    write_atomic(folder / RESULTS, json.dumps(result, indent=2))
    shutil.rmtree(folder / RESUME, ignore_errors=True)  # finished: results.json marks it
    launch.barrier()
    return result


def _prepare_unit_folder(
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
            try:
                previous = json.loads((folder / "env.json").read_text())
            except (OSError, ValueError):
                previous = {}
            resumes = previous.get("resumes", [])
            resumes.append(
                {"epoch": marker["epoch"], **{k: env[k] for k in ("started", "command")}}
            )
            env = {**previous, "resumes": resumes} if previous else {**env, "resumes": resumes}
            log(f"resuming {folder} after epoch {marker['epoch']}")
        else:
            if folder.exists():
                shutil.rmtree(folder)  # an unfinished unit without a resume point: start over
            folder.mkdir(parents=True)
            write_atomic(folder / "config.yaml", yaml.safe_dump(unit_config, sort_keys=False))
        write_atomic(folder / "env.json", json.dumps(env, indent=2))
    return launch.broadcast(marker)


def report_split(config: Mapping[str, Any]) -> str:
    """``"test"`` or ``"val"``: which classes the results and tables report."""
    split = config["eval"].get("split", "test")
    if split not in ("test", "val"):
        raise ConfigError(f"eval.split must be 'test' or 'val', got {split!r}")
    return split


def _count(module: torch.nn.Module) -> dict[str, int]:
    return {
        "total": sum(p.numel() for p in module.parameters()),
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }


# --------------------------------------------------------------------------- aggregation


def concatenated_metrics(
    folders: Sequence[Path], calculator: BenchmarkAccuracyCalculator, metrics: Sequence[str]
) -> dict[str, float]:
    """Metrics of the fold models' L2-normalised test embeddings concatenated (MLRC's 512-dim)."""
    parts, labels = [], None
    for folder in folders:
        saved = torch.load(folder / EMBEDDINGS, map_location="cpu", weights_only=True)
        if labels is not None and not torch.equal(labels, saved["labels"]):
            raise ValueError(f"{folder}: test labels differ between folds")
        labels = saved["labels"]
        parts.append(torch.nn.functional.normalize(saved["embeddings"].float(), dim=1))
    embeddings = torch.nn.functional.normalize(torch.cat(parts, dim=1), dim=1)
    accuracies = calculator.get_accuracy(embeddings, labels, embeddings, labels, True)
    return _metrics(accuracies, metrics)


def aggregate(config: Mapping[str, Any], names: Sequence[str], root: Path) -> list[dict[str, Any]]:
    """Per-seed "separate" and "concatenated" results of every method (from the unit folders).

    Returns rows ``{method, evaluation, seed, fold, <metric>: value}`` with
    ``evaluation`` in ``fold``, ``separate`` (mean over folds) and
    ``concatenated`` (with more than one fold and ``eval.save_embeddings``).
    """
    rows: list[dict[str, Any]] = []
    metrics = list(config["eval"]["metrics"])
    split = report_split(config)
    calculator = None
    for name in names:
        method = method_config(config, name)
        folds = unit_folds(method)
        for seed in config["seeds"]:
            folders = [unit_dir(root, name, seed, fold) for fold in folds]
            results = [json.loads((f / RESULTS).read_text()) for f in folders]
            for fold, result in zip(folds, results, strict=True):
                rows.append(
                    {
                        "method": name,
                        "evaluation": "fold",
                        "seed": seed,
                        "fold": fold,
                        **result[split],
                    }
                )
            separate = {m: _mean([r[split][m] for r in results]) for m in metrics}
            rows.append(
                {"method": name, "evaluation": "separate", "seed": seed, "fold": "", **separate}
            )
            concatenable = split == "test" and all((f / EMBEDDINGS).exists() for f in folders)
            if len(folds) > 1 and concatenable:
                calculator = calculator or make_calculator(config)
                concat = concatenated_metrics(folders, calculator, metrics)
                write_atomic(
                    root / name / f"seed{seed}" / "concatenated.json",
                    json.dumps({"folds": folds, "test": concat}, indent=2),
                )
                rows.append(
                    {
                        "method": name,
                        "evaluation": "concatenated",
                        "seed": seed,
                        "fold": "",
                        **concat,
                    }
                )
    return rows


def summarize(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> list[dict[str, Any]]:
    """Mean and 95% CI half-width over seeds of every (method, evaluation) pair."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["evaluation"] != "fold":
            groups.setdefault((row["method"], row["evaluation"]), []).append(row)
    summary = []
    for (method, evaluation), group in groups.items():
        entry: dict[str, Any] = {
            "method": method,
            "evaluation": evaluation,
            "seeds": [r["seed"] for r in group],
        }
        for metric in metrics:
            mean, half = mean_ci95([r[metric] for r in group])
            entry[metric] = {"mean": mean, "ci95": None if math.isnan(half) else half}
        summary.append(entry)
    return summary


def results_table(rows: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> str:
    """Markdown table: one row per method (and evaluation), mean ± 95% CI over seeds, percent."""
    groups: dict[tuple[str, str], list[Mapping[str, Any]]] = {}
    for row in rows:
        if row["evaluation"] != "fold":
            groups.setdefault((row["method"], row["evaluation"]), []).append(row)
    show_evaluation = any(evaluation == "concatenated" for _, evaluation in groups)
    columns = [m for m in TABLE_METRICS if all(m in r for g in groups.values() for r in g)]
    header = (
        ["method"]
        + (["evaluation"] if show_evaluation else [])
        + [TABLE_METRICS[m] for m in columns]
    )
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (method, evaluation), group in groups.items():
        label = {"separate": "separate (mean of fold models)", "concatenated": "concatenated folds"}
        cells = [method] + ([label[evaluation]] if show_evaluation else [])
        cells += [
            format_mean_ci([r[m] for r in group], 1.0, 3)
            if m in _UNSCALED
            else format_mean_ci([r[m] for r in group])
            for m in columns
        ]
        lines.append("| " + " | ".join(cells) + " |")
    note = f"\n\nPercent; mean ± 95% CI (Student t) over seeds {list(seeds)}"
    if len(seeds) < 2:
        note = f"\n\nPercent; one seed ({list(seeds)}), so no CI"
    if any(m in _UNSCALED for m in columns):
        note += (
            "; spectral decay ρ (lower: flatter spectrum) and density π (intra-class over "
            "inter-class-centre distance) are plain numbers (Roth et al., ICML 2020)"
        )
    if "recall_at_1" in columns:
        note += "; R@1 equals P@1 by definition (R@2/4/8 in results.csv)"
    return "\n".join(lines) + note + "."


def _csv(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(
        out, ["method", "evaluation", "seed", "fold", *metrics], extrasaction="ignore"
    )
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


# --------------------------------------------------------------------------- driver


def _complete(config: Mapping[str, Any], name: str, root: Path) -> bool:
    folds = unit_folds(method_config(config, name))
    return all(
        (unit_dir(root, name, seed, fold) / RESULTS).exists()
        for seed in config["seeds"]
        for fold in folds
    )


def check_previous(folder: Path, config: Mapping[str, Any], seed: int, fold: int) -> None:
    """Refuse to reuse a finished unit whose stored config differs in a key that matters."""
    stored_path = folder / "config.yaml"
    if not stored_path.exists():
        return
    stored = yaml.safe_load(stored_path.read_text())
    current = json.loads(json.dumps({**config, "seed": seed, "fold": fold}))
    if _semantic(stored) != _semantic(current):
        raise UserError(
            f"{folder} was run with a different config (see its config.yaml). Use another "
            "--out or config name, or delete that folder to re-run it."
        )


def run_benchmark(
    config: Mapping[str, Any],
    out: str | Path = "runs",
    methods: Sequence[str] | None = None,
    log: Log = print,
    progress: bool = True,
    publish: str | Path | None = None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run (or resume) every unit of ``config`` and write the combined results.

    With ``publish``, the table and its provenance (``command``, by default this
    process's command line) also go to ``publish/<name>.md`` and the per-unit
    values to ``publish/<name>.csv``.

    Under ``torchrun`` every rank trains every unit (DDP, :mod:`benchmarks.distributed`)
    and rank 0 writes the results; the other ranks return ``None``. The config's
    ``threads`` holds for the run only (:func:`compute_threads`). Without ``progress`` no
    progress bar is drawn, PML's included (:func:`progress_bars`); under ``torchrun``
    only rank 0 draws them.

    Returns ``{"rows", "summary", "table", "root", "wall_time_s", "units_run", "units_skipped"}``.
    """
    with compute_threads(config.get("threads")):
        launch, device = ddp.start(config_device(config))
        try:
            with progress_bars(progress and launch.is_main):
                return _run_units(
                    config, out, methods, log, progress, publish, command, launch, device
                )
        finally:
            ddp.stop(launch)


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


@contextlib.contextmanager
def sigint_held() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block has finished, then deliver it.

    For writes that must finish whole. Outside the main thread, or under a SIGINT
    handler not set from Python, the block runs as it is.
    """
    previous = signal.getsignal(signal.SIGINT)
    if threading.current_thread() is not threading.main_thread() or previous is None:
        yield
        return
    held: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, frame: held.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if held:
        signal.raise_signal(signal.SIGINT)


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


def select_methods(config: Mapping[str, Any], methods: Sequence[str] | None) -> list[str]:
    """The config's method names, in config order, restricted to ``methods`` when given."""
    names = method_names(config)
    if methods:
        unknown = [m for m in methods if m not in names]
        if unknown:
            raise UserError(f"--methods: unknown methods {unknown}; the config has {names}")
        names = [m for m in names if m in methods]
    return names


def _run_units(
    config: Mapping[str, Any],
    out: str | Path,
    methods: Sequence[str] | None,
    log: Log,
    progress: bool,
    publish: str | Path | None,
    command: str | None,
    launch: ddp.Launch,
    device: torch.device,
) -> dict[str, Any] | None:
    start = time.time()
    if not launch.is_main:
        log = _quiet
    root = Path(out) / str(config["name"])
    names = select_methods(config, methods)
    folds = [int(f) for f in config["folds"]]
    if not folds or any(not 0 <= f < int(config["num_folds"]) for f in folds):
        raise ConfigError(f"folds must be a non-empty list of ints in [0, {config['num_folds']})")
    if launch.is_main:
        root.mkdir(parents=True, exist_ok=True)
    hub_dir = Path(config["trunk"].get("hub_dir") or Path(out) / ".torch_hub")
    data = DataPipeline(config["dataset"], log=log, progress=progress)
    source = data.source  # a missing dataset fails here, before any unit

    units = [
        (seed, name, fold)
        for seed in config["seeds"]
        for name in names
        for fold in unit_folds(method_config(config, name))
    ]
    processes = f"{launch.world_size} processes x " if launch.distributed else ""
    log(
        f"{config['name']}: {len(units)} units ({len(config['seeds'])} seeds x {len(names)} "
        f"methods x folds {folds}) on {device}, {processes}{torch.get_num_threads()} threads "
        f"-> {root}"
    )
    run_count = skipped = 0
    for index, (seed, name, fold) in enumerate(units, 1):
        method = method_config(config, name)
        folder = unit_dir(root, name, seed, fold)
        tag = f"[{index}/{len(units)}] seed {seed} {name} fold {fold}"
        done = launch.is_main and (folder / RESULTS).exists()
        if done:
            check_previous(folder, method, seed, fold)
        if launch.broadcast(done):
            log(f"{tag}: done before, skipped")
            skipped += 1
            continue
        log(f"{tag}: {'evaluating' if is_frozen_method(method) else 'training'}")
        result = run_unit(method, seed, fold, folder, data, device, hub_dir, log, launch)
        run_count += 1
        if result is None:  # not rank 0
            continue
        split = report_split(config)
        reported = result[split]
        log(
            f"{tag}: {split} P@1 {100 * reported.get('precision_at_1', float('nan')):.2f} "
            f"MAP@R {100 * reported.get('mean_average_precision_at_r', float('nan')):.2f} "
            f"(best epoch {result['best_epoch']} of {result['epochs_run']}, "
            f"{result['total_time_s']:.0f} s)"
        )

    if not launch.is_main:
        return None
    metrics = list(config["eval"]["metrics"])
    complete = [name for name in method_names(config) if _complete(config, name, root)]
    rows = aggregate(config, complete, root)
    summary = summarize(rows, metrics)
    table = results_table(rows, config["seeds"])
    wall = time.time() - start
    header = f"## {config['name']}\n\n{config['dataset']['name']}"
    header += f": {source.num_classes} classes ({len(source.labels)} images), "
    header += f"MLRC split, folds {folds} of {config['num_folds']}"
    if report_split(config) == "val":
        header += "; VALIDATION classes only (the test classes were never embedded)"
    header += ".\n\n"
    footer = (
        f"\n\nThis invocation: {run_count} units run, {skipped} skipped, {wall:.0f} s wall "
        f"on {device} ({processes}{torch.get_num_threads()} threads, {os.cpu_count()} CPUs)."
    )
    write_atomic(root / "table.md", header + table + footer + "\n")
    write_atomic(root / "results.csv", _csv(rows, metrics))
    write_atomic(root / "summary.json", json.dumps(summary, indent=2))
    if publish is not None:
        command = command or cli_command(sys.argv[1:])
        publish_results(
            Path(publish), config["name"], header + table, rows, metrics, device, command, root
        )
    log("")
    log(header + table + footer)
    return {
        "rows": rows,
        "summary": summary,
        "table": table,
        "root": root,
        "wall_time_s": wall,
        "units_run": run_count,
        "units_skipped": skipped,
    }


def _unit_provenance(run_root: Path | None) -> str:
    """The commits the units of a run folder ran (``env.json``) and their total time, as lines."""
    if run_root is None:
        return ""
    counts: dict[str, int] = {}
    for env_file in sorted(run_root.glob("*/seed*/fold*/env.json")):
        try:
            commit = json.loads(env_file.read_text()).get("git_commit")
        except (OSError, ValueError):
            continue
        counts[str(commit)] = counts.get(str(commit), 0) + 1
    seconds = []
    for results_file in sorted(run_root.glob(f"*/seed*/fold*/{RESULTS}")):
        try:
            seconds.append(float(json.loads(results_file.read_text())["total_time_s"]))
        except (OSError, ValueError, KeyError):
            continue
    lines = ""
    if counts:
        listed = ", ".join(f"`{commit}` ({n} units)" for commit, n in sorted(counts.items()))
        lines += f"The units ran the code of commit {listed} (each unit's `env.json`).\n"
    if seconds:
        lines += (
            f"Time of the {len(seconds)} finished units, summed: {sum(seconds) / 60:.1f} min "
            "(each unit's `total_time_s`; caches built once per process are not in it).\n"
        )
    return lines


def _quiet(message: str) -> None:
    """The log of ranks other than 0: they print nothing."""


def publish_results(
    folder: Path,
    name: str,
    table: str,
    rows: Sequence[Mapping[str, Any]],
    metrics: Sequence[str],
    device: torch.device,
    command: str,
    run_root: Path | None = None,
) -> None:
    """Write ``<folder>/<name>.md`` (table + how it was made) and ``<folder>/<name>.csv``.

    With ``run_root``, then the plots of ``benchmarks.plots.write_plots`` (``<name>_*.png``);
    a plotting failure only warns: the table and values are already written.
    """
    env = environment(device=device)
    cpu = env["processor"]
    provenance = (
        f"\n\nProduced by `{command}`"
        f" at commit `{env['git_commit']}` on {env['started']}.\n"
        f"{_unit_provenance(run_root)}"
        f"Machine: {cpu}, {env['cpu_count']} CPUs, {env['torch_threads']} torch threads, "
        f"device {env['device']}{' (' + env['cuda'] + ')' if env['cuda'] else ''}. "
        f"Versions: python {env['python']}, torch {env['torch']}, torchvision "
        f"{env['torchvision']}, pytorch-metric-learning {env['pytorch_metric_learning']}, "
        f"pml-crt {env['pml_crt']}, faiss {env['faiss']}.\n"
        f"Per-seed and per-fold values: `{name}.csv`.\n"
    )
    folder.mkdir(parents=True, exist_ok=True)
    write_atomic(folder / f"{name}.md", table + provenance)
    write_atomic(folder / f"{name}.csv", _csv(rows, metrics))
    if run_root is not None:
        try:
            from .plots import write_plots

            write_plots(run_root, folder, name)
        except Exception as error:  # e.g. matplotlib missing: the results are safe already
            warnings.warn(f"plots of {name} not written: {error!r}", stacklevel=2)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.run",
        description="Run a benchmark config (MLRC protocol, stock PML parts).",
    )
    parser.add_argument(
        "--config", required=True, help="a YAML file, e.g. benchmarks/configs/omniglot_quick.yaml"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY.SUB=VALUE",
        help="override a config value (YAML value), e.g. --set training.num_epochs=2",
    )
    parser.add_argument(
        "--out", default="runs", help="parent folder of the run folder (default runs/)"
    )
    parser.add_argument("--methods", nargs="+", default=None, help="run only these methods")
    parser.add_argument(
        "--publish",
        default=None,
        metavar="DIR",
        help="also write the table with its provenance to DIR/<name>.md and DIR/<name>.csv "
        "(the committed reports live in benchmarks/results)",
    )
    parser.add_argument("--verbose", action="store_true", help="show PML's INFO logs")
    parser.add_argument(
        "--no-progress",
        action="store_true",
        help="hide every progress bar (the caches' and PML's training and testing bars)",
    )
    return parser.parse_args(argv)


def cli_command(args: Sequence[str]) -> str:
    """The command line that runs this module with ``args``."""
    return "python -m benchmarks.run " + shlex.join(args)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
    """The command line (``argv``, default ``sys.argv[1:]``): load the config and run it.

    A :class:`~benchmarks.config.UserError` (bad ``--config``, ``--set``, key, value or
    method name, missing data) prints ``benchmarks.run: error: <message>`` as one line
    to stderr and exits with status 2, as argparse does; Ctrl-C prints how to resume
    the run and exits with 130. Any other exception is a bug and propagates.
    """
    args = parse_args(argv)
    command = cli_command(sys.argv[1:] if argv is None else list(argv))
    logging.basicConfig(format="%(name)s %(levelname)s: %(message)s")
    logging.getLogger("PML").setLevel(logging.INFO if args.verbose else logging.WARNING)
    # PML's trainer formats a loss that requires grad into its progress bar.
    warnings.filterwarnings("ignore", message="Converting a tensor with requires_grad=True")
    again = (
        f"the same torchrun command again to resume (its processes ran: {command})"
        if ddp.launched_by_torchrun()
        else f"the same command again to resume:\n  {command}"
    )
    interrupted = f"interrupted. Finished units and completed epochs are kept; run {again}"

    def benchmark() -> dict[str, Any] | None:
        return run_benchmark(
            load_config(args.config, args.overrides),
            args.out,
            methods=args.methods,
            log=lambda s: print(s, flush=True),
            progress=not args.no_progress,
            publish=args.publish,
            command=command,
        )

    return run_command("benchmarks.run", benchmark, interrupted)


def run_command(prog: str, action: Callable[[], T], interrupted: str) -> T:
    """``action()`` as a command line's body, the way ``benchmarks.run`` and ``.tune`` end.

    A :class:`~benchmarks.config.UserError` prints ``<prog>: error: <message>`` as one
    line and exits with status 2, as argparse does; Ctrl-C prints ``interrupted`` (how
    to resume) and exits with 130. Any other exception is a bug and propagates.
    """
    try:
        return action()
    except UserError as error:
        exit_with(2, "error: " + " ".join(str(error).splitlines()), prog)
    except KeyboardInterrupt:
        exit_with(130, interrupted, prog)


def exit_with(status: int, message: str, prog: str = "benchmarks.run") -> NoReturn:
    """Print ``<prog>: <message>`` to stderr (rank 0 only) and exit with ``status``."""
    if os.environ.get("RANK", "0") == "0":
        print(f"{prog}: {message}", file=sys.stderr, flush=True)
    raise SystemExit(status)


if __name__ == "__main__":
    main()
