"""The data of a run: one dataset loaded once per process, as cached image and feature datasets.

:class:`DataPipeline` is shared by every unit of a run (and every trial of a
search): decoded images are cached as ``uint8`` and a frozen trunk prefix is run
once over them, keyed by what changes their values. With a ``store`` folder the
frozen-prefix outputs are also kept on disk, so the other processes of a search or
of ``--workers`` (and later runs) load them instead of running the trunk again.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import PIL
import torch
import torchvision

from .cache import CachedDataset, LabelSubset, cache_dataset, cache_module_outputs, frozen_prefix
from .data import Source, ToFloat, TransformedDataset, load_source, pil_transform
from .layout import Log, save_atomic
from .splits import trainval_test_classes

__all__ = ["FEATURE_FORMAT", "DataPipeline"]

FEATURE_FORMAT = 1  # raise it when the code that computes the stored trunk outputs changes
VIEW_SEED = 20_221_107  # seeds view v of the cached augmented views as VIEW_SEED + v


class DataPipeline:
    """Loads a dataset once per process and hands out (cached) image and feature datasets.

    Every dataset it returns covers all images of the source, labelled by class
    position, with float tensors as inputs; :func:`class_subset` then picks a
    fold's classes without copying.
    """

    def __init__(
        self,
        dataset_config: Mapping[str, Any],
        log: Log = print,
        progress: bool = True,
        store: Path | None = None,
    ):
        self.dataset_config = dict(dataset_config)
        self.log = log
        self.progress = progress
        self.store = store
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
                int(config["eval"]["batch_size"]),
            ],
            sort_keys=True,
        )
        if key not in self._features:
            features = self._stored(
                key, device, lambda: self._run_prefix(config, trunk, device, dtype)
            )
            if dtype != torch.float32:
                features.transform = _ToFloat32()
            self._features[key] = features
        return self._features[key]

    def view_features(
        self, config: Mapping[str, Any], trunk: torch.nn.Module, device: torch.device
    ) -> CachedDataset:
        """The frozen first blocks of ``trunk`` over ``cache.train_views`` augmented views.

        Only the images of the train+validation classes (the first half,
        :func:`trainval_test_classes`) are cached: no unit trains on a test class, and
        the views cost as many passes of the frozen blocks as there are views. The
        dataset keeps their labels (class positions), so :func:`class_subset` picks a
        fold's training classes from it as from the full datasets. View ``v`` of every
        image is drawn with torch's RNG seeded ``VIEW_SEED + v`` (the same views whatever
        the run, seed or process); the dataset's rows are ``(V, ...)`` stacks, and each
        access returns one view drawn with torch's RNG (the training loader's), so every
        epoch sees a random view of each image.
        """
        views = int(config["cache"]["train_views"])
        dtype = getattr(torch, str(config["cache"].get("feature_dtype", "float32")))
        augmentation = ("resize", "crop", "normalize", "augmentation", "rrc_scale", "hflip")
        key = json.dumps(
            [
                "train_views",
                views,
                "train+val classes",
                {k: config["trunk"].get(k) for k in ("name", "weights", "frozen_blocks", "kwargs")},
                {k: config["images"].get(k) for k in augmentation},
                str(dtype),
                int(config["eval"]["batch_size"]),
            ],
            sort_keys=True,
        )
        if key not in self._features:

            def compute() -> CachedDataset:
                start = time.time()
                order_seed = self.dataset_config.get("class_order_seed")
                trainval = set(trainval_test_classes(self.source.num_classes, order_seed)[0])
                labels = self.source.labels
                indices = [i for i, y in enumerate(labels) if y in trainval]
                images = LabelSubset(
                    self.images(config, train=True), indices, [labels[i] for i in indices]
                )
                outputs = []
                for view in range(views):
                    with torch.random.fork_rng(devices=[]):
                        torch.manual_seed(VIEW_SEED + view)
                        outputs.append(
                            self._prefix_outputs(
                                config,
                                trunk,
                                device,
                                dtype,
                                images,
                                f"caching frozen trunk blocks, view {view + 1} of {views}",
                            )
                        )
                stacked = torch.stack([o.data for o in outputs], dim=1)  # (M, V, ...)
                self.log(
                    f"cached {views} augmented views of the {len(indices)} train+val images: "
                    f"{trunk.frozen_blocks} frozen trunk blocks' output "
                    f"{tuple(stacked.shape[1:])} in {time.time() - start:.1f} s"
                )
                return CachedDataset(stacked, outputs[0].labels)

            features = self._stored(key, device, compute)
            features.transform = _RandomView(dtype != torch.float32)
            self._features[key] = features
        return self._features[key]

    def _prefix_outputs(
        self,
        config: Mapping[str, Any],
        trunk: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
        images: Any,
        desc: str,
    ) -> CachedDataset:
        """``frozen_prefix(trunk)`` over ``images``, in one process (its RNG is the caller's)."""
        return cache_module_outputs(
            frozen_prefix(trunk),
            images,
            batch_size=int(config["eval"]["batch_size"]),
            device=device,
            dtype=dtype,
            desc=desc,
            progress=self.progress,
        )

    def _run_prefix(
        self,
        config: Mapping[str, Any],
        trunk: torch.nn.Module,
        device: torch.device,
        dtype: torch.dtype,
    ) -> CachedDataset:
        start = time.time()
        images = self.images(config, train=False)
        features = self._prefix_outputs(
            config, trunk, device, dtype, images, "caching frozen trunk blocks"
        )
        self.log(
            f"cached the output of {trunk.frozen_blocks} frozen trunk blocks "
            f"{tuple(features.data.shape[1:])} {dtype} "
            f"({features.data.numel() * features.data.element_size() / 2**20:.0f} MiB) "
            f"in {time.time() - start:.1f} s"
        )
        return features

    def _stored(
        self, key: str, device: torch.device, compute: Callable[[], CachedDataset]
    ) -> CachedDataset:
        """``compute()``, or what an earlier call with the same inputs kept in ``store``.

        The file name hashes what the values depend on: ``key`` (trunk, weights, frozen
        blocks, image settings, dtype, batch size), the dataset (its resolved root and
        labels), the device type, torch's thread count (it changes the rounding), the
        versions of torch, torchvision and Pillow, and ``FEATURE_FORMAT``, raised whenever
        this project's code changes how the outputs are computed. One process computes
        while the others wait.
        """
        if self.store is None:
            return compute()
        dataset = {**self.dataset_config, "root": str(Path(self.dataset_config["root"]).resolve())}
        labels = hashlib.sha256(json.dumps(self.source.labels).encode()).hexdigest()
        versions = [FEATURE_FORMAT, torch.__version__, torchvision.__version__, PIL.__version__]
        identity = json.dumps(
            [key, dataset, labels, device.type, versions, torch.get_num_threads()],
            sort_keys=True,
            default=str,
        )
        path = self.store / f"features-{hashlib.sha256(identity.encode()).hexdigest()[:20]}.pt"
        self.store.mkdir(parents=True, exist_ok=True)
        with _exclusive(path.with_suffix(".lock")):
            if path.exists():
                saved = torch.load(path, weights_only=True)
                if saved["identity"] == identity:
                    self.log(f"loaded the frozen trunk blocks' output from {path}")
                    return CachedDataset(saved["data"], saved["labels"])
            features = compute()
            saved = {"identity": identity, "data": features.data, "labels": features.labels}
            save_atomic(saved, path)
        return features


@contextlib.contextmanager
def _exclusive(lock: Path) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (released when the process dies too);
    where ``fcntl`` is missing (Windows) nothing is locked and both processes compute."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


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


class _RandomView:
    """``(V, ...)`` cached views of one image to one of them, drawn with torch's RNG."""

    def __init__(self, to_float32: bool) -> None:
        self.to_float32 = to_float32

    def __call__(self, views: torch.Tensor) -> torch.Tensor:
        view = views[int(torch.randint(len(views), ()))]
        return view.float() if self.to_float32 else view
