"""One unit of a benchmark: train (unless frozen) and test one (method, seed, fold).

:func:`run_unit` trains with ``trainers.MetricLossOnly`` (``MPerClassSampler``
batches, the method's PML loss and miner), validates every ``test_interval`` epochs
with ``testers.GlobalEmbeddingSpaceTester`` through ``logging_presets.HookContainer``
(record-keeper logs, best checkpoint by validation MAP@R, early stopping with
``patience``), writes a resume point after every validation (:mod:`benchmarks.protocol.resume`),
reloads the best checkpoint, evaluates it on the reported classes and writes
``results.json``. ``benchmarks.run`` runs every unit of a config with it and
``benchmarks.tune`` the units of its trials.
"""

from __future__ import annotations

import contextlib
import json
import random
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from pytorch_metric_learning import samplers, testers, trainers
from pytorch_metric_learning.utils import logging_presets
from torch.utils.data import DataLoader, Dataset

from pml_crt.models.prototype_init import init_from_data
from pml_crt.utils.distributed import RankShardSampler

from . import distributed as ddp
from . import resume
from .build import (
    build_embedder,
    build_loss,
    build_optimizers,
    build_trunk,
    is_frozen_method,
    trunk_is_cacheable,
)
from .cache import TrunkTail
from .config import ConfigError
from .data import class_subset
from .evaluation import make_calculator, metric_values, report_split
from .layout import EMBEDDINGS, MODELS, RESULTS, RESUME, Log, save_atomic, write_atomic
from .metrics import BenchmarkAccuracyCalculator
from .pipeline import DataPipeline
from .preflight import check_batch
from .splits import FoldSplit, mlrc_split

__all__ = ["run_unit", "seed_everything", "sigint_held"]

# ``on_validation(epoch, value)``: see :func:`run_unit`.
OnValidation = Callable[[int, float], None]


def validation_splits() -> list[tuple[str, list[str]]]:
    """The tester's ``splits_to_eval``: the validation classes queried against themselves.

    A new list each call: PML's tester rewrites the list it is given in place.
    """
    return [("val", ["val"])]


def seed_everything(seed: int) -> None:
    """Python, NumPy (PML's samplers draw from ``np.random``) and torch RNGs."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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


def _count(module: torch.nn.Module) -> dict[str, int]:
    return {
        "total": sum(p.numel() for p in module.parameters()),
        "trainable": sum(p.numel() for p in module.parameters() if p.requires_grad),
    }


# --------------------------------------------------------------------------- the unit's parts


@dataclass
class _Unit:
    """What one unit trains and evaluates, and where it writes."""

    config: Mapping[str, Any]
    seed: int
    fold: int
    folder: Path
    device: torch.device
    launch: ddp.Launch
    split: FoldSplit
    trunk: torch.nn.Module
    embedder: torch.nn.Module
    train: Any
    val: Any
    test: Any
    calculator: BenchmarkAccuracyCalculator
    record_keeper: Any  # None on ranks other than 0
    tensorboard: Any
    hooks: logging_presets.HookContainer
    tester: testers.GlobalEmbeddingSpaceTester

    @property
    def model_dir(self) -> Path:
        return self.folder / MODELS


def _inputs(
    config: Mapping[str, Any], trunk: torch.nn.Module, data: DataPipeline, device: torch.device
) -> tuple[torch.nn.Module, Any, Any]:
    """The trunk to train and all training and evaluation inputs (features when cacheable)."""
    # Building a cache draws from torch's RNG (DataLoader seeds); whether this unit builds
    # it or finds it built must not change the unit's random stream.
    with torch.random.fork_rng(devices=[]):
        if trunk_is_cacheable(trunk, config):
            features = data.features(config, trunk, device)
            augmented = config["images"].get("augmentation", "none") != "none"
            trains = augmented and not is_frozen_method(config)  # a frozen unit needs no views
            train = data.view_features(config, trunk, device) if trains else features
            return TrunkTail(trunk, trunk.frozen_blocks), train, features
        return trunk, data.images(config, train=True), data.images(config, train=False)


def _record_keeper(folder: Path, launch: ddp.Launch) -> tuple[Any, Any]:
    """Rank 0's record keeper (CSV files, logs.db) and tensorboard writer; ``None`` elsewhere."""
    if not launch.is_main:  # the other ranks write nothing
        return None, None
    record_keeper, _, tensorboard = logging_presets.get_record_keeper(
        str(folder / "logs"), str(folder / "tensorboard")
    )
    # Ctrl-C waits for a save (CSV files, then logs.db) to finish: they stay consistent.
    record_keeper.save_records = sigint_held()(record_keeper.save_records)
    return record_keeper, tensorboard


def _init_from_data(
    config: Mapping[str, Any],
    embedder: torch.nn.Module,
    trunk: torch.nn.Module,
    train_classes: Dataset,
    seed: int,
) -> None:
    """k-means prototypes / centroids from the training classes' images (eval transform)."""
    kind = config["embedder"]["type"]
    if kind not in ("NetVLAD", "CRT", "MultiHeadCRT"):
        raise ConfigError(
            f"embedder.init_from_data needs a NetVLAD, CRT or MultiHeadCRT embedder, got {kind}"
        )
    options = dict(config["embedder"]["init_from_data"])
    unknown = set(options) - {"max_descriptors", "iterations"}
    if unknown:
        raise ConfigError(
            f"embedder.init_from_data takes max_descriptors and iterations, got {sorted(unknown)}"
        )
    loader = DataLoader(train_classes, batch_size=int(config["eval"]["batch_size"]))
    init_from_data(embedder, trunk, loader, seed=seed, **options)


def _build_unit(
    config: Mapping[str, Any],
    seed: int,
    fold: int,
    folder: Path,
    data: DataPipeline,
    device: torch.device,
    hub_dir: Path,
    launch: ddp.Launch,
) -> _Unit:
    """Seed, build the models, pick the fold's classes and set up logging and testing."""
    source = data.source
    split = mlrc_split(
        source.num_classes,
        fold,
        int(config["num_folds"]),
        config["dataset"].get("class_order_seed"),
    )
    seed_everything(seed)
    trunk = build_trunk(config["trunk"], source.channels, hub_dir).to(device)
    trunk, all_train, all_eval = _inputs(config, trunk, data, device)
    embedder = build_embedder(config["embedder"], int(trunk.out_channels)).to(device)
    if config["embedder"].get("init_from_data") is not None:
        _init_from_data(config, embedder, trunk, class_subset(all_eval, split.train), seed)
    calculator = make_calculator(config)
    record_keeper, tensorboard = _record_keeper(folder, launch)
    # On other ranks than 0 the container only names what is checkpointed.
    hooks = logging_presets.HookContainer(
        record_keeper,
        primary_metric=config["eval"]["primary_metric"],
        validation_split_name="val",
        log_freq=int(config["training"]["log_freq"]),
    )
    tester = testers.GlobalEmbeddingSpaceTester(
        end_of_testing_hook=hooks.end_of_testing_hook,
        accuracy_calculator=calculator,
        batch_size=int(config["eval"]["batch_size"]),
        dataloader_num_workers=int(config["training"].get("num_workers", 0)),
        data_device=device,
    )
    # What the tester's first validation would set: the hooks name their record tables
    # from it, so a unit resumed after its last validated epoch (nothing left to train)
    # can read its best epoch from the records without validating again.
    tester.reference_split_names.update(validation_splits())
    return _Unit(
        config=config,
        seed=seed,
        fold=fold,
        folder=folder,
        device=device,
        launch=launch,
        split=split,
        trunk=trunk,
        embedder=embedder,
        train=class_subset(all_train, split.train),
        val=class_subset(all_eval, split.val),
        test=class_subset(all_eval, split.test),
        calculator=calculator,
        record_keeper=record_keeper,
        tensorboard=tensorboard,
        hooks=hooks,
        tester=tester,
    )


# --------------------------------------------------------------------------- training


def _samplers(unit: _Unit) -> tuple[samplers.MPerClassSampler, RankShardSampler | None]:
    """The global batch sampler, and under ``torchrun`` this rank's share of every batch."""
    training, launch = unit.config["training"], unit.launch
    batch_size = int(training["batch_size"])
    sampler = samplers.MPerClassSampler(
        unit.train.labels,
        m=int(training["m"]),
        batch_size=batch_size,
        length_before_new_iter=batch_size * int(training["iterations_per_epoch"]),
    )
    # Under torchrun every rank draws the same global batch and loads its share.
    if not launch.distributed:
        return sampler, None
    return sampler, RankShardSampler(
        sampler, batch_size, launch.rank, launch.world_size, seed=unit.seed
    )


def _end_of_epoch_hook(
    unit: _Unit, sampler: samplers.MPerClassSampler, on_validation: OnValidation | None
) -> Callable[[trainers.BaseTrainer], bool | None]:
    """Rank 0: the stock hook (records, then checkpoint files), then the resume marker;
    every rank then follows rank 0's early-stopping decision."""
    training, launch = unit.config["training"], unit.launch
    test_interval = int(training["test_interval"])
    primary = unit.config["eval"]["primary_metric"]
    if launch.is_main:
        hook = unit.hooks.end_of_epoch_hook(
            unit.tester,
            {"val": unit.val},
            str(unit.model_dir),
            test_interval=test_interval,
            patience=training.get("patience"),
            splits_to_eval=validation_splits(),
        )

    def end_of_epoch_hook(trainer: trainers.BaseTrainer) -> bool | None:
        keep_going = None
        if launch.is_main:
            keep_going = hook(trainer)
            if trainer.epoch % test_interval == 0:
                if on_validation is not None:
                    value = unit.tester.all_accuracies["val"][f"{primary}_level0"]
                    on_validation(int(trainer.epoch), float(value))
                stopped = keep_going is False
                resume.write_resume_point(unit.folder, trainer, sampler, stopped=stopped)
        return launch.broadcast(keep_going)

    return end_of_epoch_hook


def _trainer(
    unit: _Unit, models: dict[str, torch.nn.Module], on_validation: OnValidation | None
) -> tuple[trainers.MetricLossOnly, samplers.MPerClassSampler, RankShardSampler | None]:
    """PML's trainer of the unit's method, with its sampler (and this rank's shard of it)."""
    config, launch, device = unit.config, unit.launch, unit.device
    loss_funcs, mining_funcs = build_loss(config, unit.embedder, len(unit.split.train))
    loss_funcs = {k: v.to(device) for k, v in loss_funcs.items()}
    optimizers = build_optimizers(config, models, loss_funcs)
    loss_funcs, mining_funcs = ddp.wrap_losses(loss_funcs, mining_funcs, launch)
    sampler, shard = _samplers(unit)
    end_of_epoch_hook = _end_of_epoch_hook(unit, sampler, on_validation)
    trainer = trainers.MetricLossOnly(
        models=ddp.wrap_models(models, launch, device),
        optimizers=optimizers,
        batch_size=int(config["training"]["batch_size"]) // launch.world_size,
        loss_funcs=loss_funcs,
        mining_funcs=mining_funcs,
        dataset=unit.train,
        sampler=shard or sampler,
        iterations_per_epoch=int(config["training"]["iterations_per_epoch"]),
        dataloader_num_workers=int(config["training"].get("num_workers", 0)),
        data_device=device,
        end_of_iteration_hook=unit.hooks.end_of_iteration_hook if launch.is_main else None,
        end_of_epoch_hook=end_of_epoch_hook,
    )
    return trainer, sampler, shard


def _train_epochs(
    unit: _Unit,
    trainer: trainers.MetricLossOnly,
    sampler: samplers.MPerClassSampler,
    shard: RankShardSampler | None,
    marker: Mapping[str, Any] | None,
) -> int:
    """Train from the resume point (or epoch 1) to the end or an early stop; the epochs run."""
    num_epochs, epochs_run = int(unit.config["training"]["num_epochs"]), 0
    if marker is not None:
        resume.load_resume_state(trainer, unit.hooks, sampler, unit.folder, marker, unit.device)
        epochs_run = int(marker["epoch"])
        if shard is not None:
            shard.set_epoch(epochs_run)
    if not (marker is not None and marker["stopped"]) and epochs_run < num_epochs:
        trainer.train(start_epoch=epochs_run + 1, num_epochs=num_epochs)
        epochs_run = int(trainer.epoch)
    return epochs_run


def _load_best(unit: _Unit, trainer: trainers.MetricLossOnly) -> int:
    """Load the best validated checkpoint (dropping the others unless kept); its epoch."""
    best_epoch, _ = unit.hooks.get_best_epoch_and_accuracy(unit.tester, "val")
    if best_epoch is None:
        raise RuntimeError("no validation result was recorded: num_epochs must be >= test_interval")
    unit.hooks.load_latest_saved_models(trainer, str(unit.model_dir), unit.device, best=True)
    if unit.config["training"].get("keep_checkpoints", "best") == "best":
        for path in unit.model_dir.glob("*.pth"):
            if "_best" not in path.name:
                path.unlink()
    return best_epoch


def _train(
    unit: _Unit, marker: Mapping[str, Any] | None, on_validation: OnValidation | None
) -> tuple[int, int, dict[str, Any]] | None:
    """Train the unit; ``(best epoch, epochs run, result fields)``, ``None`` off rank 0."""
    launch = unit.launch
    check_batch("train", len(unit.split.train), unit.config, launch.world_size)
    models = {"trunk": unit.trunk, "embedder": unit.embedder}
    trainer, sampler, shard = _trainer(unit, models, on_validation)
    epochs_run = _train_epochs(unit, trainer, sampler, shard, marker)
    trainer.models.update(models)  # the plain modules again, for loading and testing
    if not launch.is_main:
        launch.barrier()
        return None
    best_epoch = _load_best(unit, trainer)
    parameters = {k: _count(v) for k, v in models.items()}
    return best_epoch, epochs_run, {"trained": True, "parameters": parameters}


def _evaluate_frozen(unit: _Unit) -> tuple[int, int, dict[str, Any]] | None:
    """Validate the untrained models; as :func:`_train` returns (epoch 0, no epochs run)."""
    if not unit.launch.is_main:
        unit.launch.barrier()  # rank 0 evaluates; the others wait for the next unit
        return None
    unit.tester.test(
        {"val": unit.val}, 0, unit.trunk, unit.embedder, splits_to_eval=validation_splits()
    )
    return 0, 0, {"trained": False}


# --------------------------------------------------------------------------- evaluation


def _best_validation(unit: _Unit, best_epoch: int) -> dict[str, float]:
    """The validation metrics of the best epoch."""
    rows, _ = unit.hooks.get_accuracies_of_best_epoch(unit.tester, "val")
    if not rows and best_epoch == 0:
        rows = [unit.tester.all_accuracies["val"]]
    return metric_values(dict(rows[0]) if rows else {}, list(unit.config["eval"]["metrics"]))


def _test(unit: _Unit, best_epoch: int) -> dict[str, Any]:
    """Embed the test classes with the best models, record their metrics, keep the embeddings."""
    embeddings, labels = unit.tester.get_all_embeddings(unit.test, unit.trunk, unit.embedder)
    labels = labels[:, 0]
    accuracies = unit.calculator.get_accuracy(embeddings, labels, embeddings, labels, True)
    test = metric_values(accuracies, list(unit.config["eval"]["metrics"]))
    unit.record_keeper.update_records(
        {f"{k}_level0": v for k, v in test.items()} | {"epoch": best_epoch},
        best_epoch,
        parent_name="test_accuracies",
    )
    if unit.config["eval"].get("save_embeddings", True):
        save_atomic(
            {"embeddings": embeddings.cpu(), "labels": labels.cpu().long()},
            unit.folder / EMBEDDINGS,
        )
    return {"test": test, "embedding_size": int(embeddings.shape[1])}


def _result_header(unit: _Unit) -> dict[str, Any]:
    """The fields of ``results.json`` that say which unit it is and what it saw."""
    split = unit.split
    return {
        "config": unit.config["name"],
        "method": unit.config["method"],
        "seed": unit.seed,
        "fold": unit.fold,
        "num_classes": {"train": len(split.train), "val": len(split.val), "test": len(split.test)},
        "num_images": {"train": len(unit.train), "val": len(unit.val), "test": len(unit.test)},
    }


def _finish(unit: _Unit, result: dict[str, Any], times: Mapping[str, float]) -> dict[str, Any]:
    """Save the logs, write ``results.json`` (with the times) and drop the resume point."""
    unit.record_keeper.save_records()
    if unit.tensorboard is not None:
        unit.tensorboard.close()
    result["train_time_s"] = round(times["train"], 2)
    result["eval_time_s"] = round(time.time() - times["eval_start"], 2)
    result["total_time_s"] = round(time.time() - times["start"], 2)
    write_atomic(unit.folder / RESULTS, json.dumps(result, indent=2))
    shutil.rmtree(unit.folder / RESUME, ignore_errors=True)  # finished: results.json marks it
    unit.launch.barrier()
    return result


# --------------------------------------------------------------------------- one unit


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
    on_validation: OnValidation | None = None,
) -> dict[str, Any] | None:
    """Train (unless frozen) and test one (method, seed, fold); write ``results.json``.

    An unfinished unit with a resume point (``resume/resume.json``, same config)
    continues from that epoch; any other unfinished unit folder is started over.
    Under ``torchrun`` every rank calls it; rank 0 alone writes the folder and
    returns the results, the other ranks train with it and return ``None``
    (see :mod:`benchmarks.protocol.distributed`).

    ``on_validation(epoch, value)`` (single process only) is called after each
    validation with the epoch's value of ``eval.primary_metric``, before the
    epoch's resume point is written (so a unit resumed after a crash calls it
    again for that epoch); an exception it raises (a pruned search trial) stops
    the unit there.
    """
    if on_validation is not None and launch.distributed:
        raise ValueError("on_validation is for single-process units")
    marker = resume.prepare_unit_folder(config, seed, fold, folder, device, log, launch)
    start = time.time()
    unit = _build_unit(config, seed, fold, folder, data, device, hub_dir, launch)
    result = _result_header(unit)
    train_start = time.time()
    if is_frozen_method(config):
        trained = _evaluate_frozen(unit)
    else:
        trained = _train(unit, marker, on_validation)
    if trained is None:  # not rank 0
        return None
    best_epoch, epochs_run, fields = trained
    result.update(fields)
    train_time = time.time() - train_start
    result["val"] = _best_validation(unit, best_epoch)
    result["best_epoch"] = best_epoch
    result["epochs_run"] = epochs_run
    eval_start = time.time()
    if report_split(config) == "test":
        result.update(_test(unit, best_epoch))
    return _finish(unit, result, {"start": start, "train": train_time, "eval_start": eval_start})
