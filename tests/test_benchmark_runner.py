"""The benchmark runner: config overrides, Recall@K, caches, and tiny end-to-end runs.

The end-to-end runs use the real configs with overrides that make them tiny
(a few classes, 32-pixel images, 2 iterations). Omniglot and CUB are read from
``../shared/data`` (skipped when absent); Cars196 and SOP are tiny fake trees
in PML's layouts, written to ``tmp_path``. Nothing touches the network.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from itertools import product
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from pytorch_metric_learning import losses, testers

from benchmarks.protocol import build
from benchmarks.protocol import config as config_module
from benchmarks.protocol import runner as bench
from benchmarks.protocol.build import build_embedder, build_loss, build_optimizers, install_weights
from benchmarks.protocol.cache import (
    CachedDataset,
    TrunkTail,
    cache_dataset,
    cache_module_outputs,
    frozen_prefix,
)
from benchmarks.protocol.config import (
    DEFAULTS,
    ConfigError,
    UserError,
    apply_override,
    deep_merge,
    load_config,
    method_config,
    method_names,
    parse_override,
)
from benchmarks.protocol.data import TransformedDataset, class_subset, load_source, pil_transform
from benchmarks.protocol.execution import worker_threads
from benchmarks.protocol.layout import unit_dir
from benchmarks.protocol.metrics import BenchmarkAccuracyCalculator
from benchmarks.protocol.results import publish_results
from benchmarks.protocol.workers import local_processes
from pml_crt.losses import MultiHeadLoss
from pml_crt.models import MultiHeadCRT
from pml_crt.trunks import feature_map_trunk
from pml_crt.utils import make_accuracy_calculator

pytestmark = pytest.mark.filterwarnings(
    "ignore:Converting a tensor with requires_grad=True:UserWarning"  # PML trainer's pbar
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs"
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
WEIGHTS = SHARED / "weights" / "mobilenet_v2-b0353104.pth"

needs_omniglot = pytest.mark.skipif(
    not (DATA / "omniglot-py" / "images_background").is_dir(),
    reason=f"Omniglot not found under {DATA} (see SPEC section 4)",
)
needs_cub = pytest.mark.skipif(
    not (DATA / "CUB_200_2011" / "images.txt").is_file(),
    reason=f"CUB-200-2011 not found under {DATA} (see SPEC section 4)",
)
needs_weights = pytest.mark.skipif(
    not WEIGHTS.is_file(), reason=f"MobileNetV2 weights not found at {WEIGHTS}"
)

TINY_TRAINING = [
    "seeds=[0]",
    "training.iterations_per_epoch=2",
    "training.num_epochs=2",
    "training.batch_size=12",
    "training.num_workers=0",
    "eval.batch_size=64",
]
TINY_OMNIGLOT = [f"dataset.root={DATA}", "dataset.max_classes=16", *TINY_TRAINING]
TINY_IMAGES = ["images.resize=40", "images.crop=32", "trunk.weights=null"]
TINY_CUB = [  # cub_compare.yaml's pretrained MobileNetV2 on 8 species at 64 px
    f"dataset.root={DATA}",
    f"trunk.weights_path={WEIGHTS}",
    "dataset.max_classes=8",
    "folds=[0]",
    *TINY_TRAINING,
    "images.resize=64",
    "images.crop=64",
    "training.batch_size=8",
    "eval.batch_size=32",
    "device=cpu",
]


UNIT_ROUNDOFF = 2.0**-24  # float32 rounds x to x(1 + d) with |d| <= u


def float32_tolerance(*modules: torch.nn.Module) -> float:
    """How far an output of ``modules`` may move between two float32 paths, relative to its norm.

    Two paths that compute the same network in float32 but sum in different orders
    (batch sizes, cached or recomputed blocks, thread or process splits) each land
    within rounding error of the exact output. A float32 dot product of length n is off
    by at most n·u·Σ|w_i·x_i| (Higham, "Accuracy and Stability of Numerical Algorithms",
    2nd ed., §3.1), and the layers' errors add, so one path is within u·Σn of exact,
    relative to the output's size, with n every weight's fan-in (a linear layer's inputs,
    a convolution's in_channels/groups × kernel area, a prototype's length); two paths
    are within twice that of each other. Pooling and elementwise steps add a few u, a
    negligible term next to Σn (thousands). Where both paths also train (a few Adam steps
    in these tests), the gradients' rounding reaches the weights; Adam's step is
    scale-free, so that changes it little unless rounding decides a gradient's sign, and
    the bound, a worst case (rounding errors mostly cancel), leaves room for it. It is
    still far below what a real bug changes (other images, blocks or batches move
    embeddings by O(1) of their norm).
    """
    fan_ins = sum(p[0].numel() for m in modules for p in m.parameters() if p.dim() >= 2)
    return 2 * UNIT_ROUNDOFF * fan_ins


def assert_rows_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    """Each sample (row) of ``actual`` within ``tolerance`` × its L2 norm of ``expected``'s.

    Relative to the row's norm, not to each element: a dot product's rounding error scales
    with the magnitudes summed, so a near-zero component carries the row's absolute error.
    """
    actual, expected = actual.flatten(1).double(), expected.flatten(1).double()
    norms = expected.norm(dim=1).clamp_min(torch.finfo(torch.float32).tiny)
    errors = (actual - expected).norm(dim=1) / norms
    worst = int(errors.argmax())
    assert errors[worst] <= tolerance, (
        f"row {worst}: relative error {float(errors[worst]):.3g} > {tolerance:.3g}"
    )


def ranking_tolerance(num_queries: int) -> float:
    """How far P@1, R-Precision, MAP@R or Recall@K may move when embeddings move by rounding.

    They are means over queries of step functions of the embeddings: a query whose
    candidates' similarities are within rounding of each other may rank them either way,
    which moves the mean by at most 1 / num_queries. Allows two such near-ties.
    """
    return 2 / num_queries


def _exit_with(status: int) -> None:
    """A worker process's body that ends with ``status``."""
    raise SystemExit(status)


def _run(config_name, overrides, out, **kwargs):
    config = load_config(CONFIGS / f"{config_name}.yaml", overrides)
    return bench.run_benchmark(config, out, log=lambda s: None, progress=False, **kwargs)


# --------------------------------------------------------------------------- config


def test_parse_override_values():
    assert parse_override("training.batch_size=64") == (["training", "batch_size"], 64)
    assert parse_override("optimizers.default.kwargs.lr=1e-4")[1] == pytest.approx(1e-4)
    assert parse_override("seeds=[0, 1, 2]") == (["seeds"], [0, 1, 2])
    assert parse_override("trunk.weights=null") == (["trunk", "weights"], None)
    assert parse_override("trunk.weights=") == (["trunk", "weights"], None)
    assert parse_override("trunk.weights=IMAGENET1K_V1")[1] == "IMAGENET1K_V1"
    assert parse_override("cache.images=false")[1] is False
    assert parse_override("dataset.root=/a/b=c")[1] == "/a/b=c"
    assert parse_override("loss.kwargs={alpha: 2, base: 0.5}")[1] == {"alpha": 2, "base": 0.5}
    assert parse_override("x=[unclosed")[1] == "[unclosed"  # not YAML: kept as text
    with pytest.raises(ValueError, match="key.sub=value"):
        parse_override("training.batch_size")
    with pytest.raises(ValueError, match="bad override key"):
        parse_override("training..batch_size=3")


def test_apply_override_creates_and_indexes():
    config = {"a": {"b": 1}, "heads": [[16, 128], [8, 64]]}
    apply_override(config, ["a", "c", "d"], 2)
    apply_override(config, ["heads", "1"], [4, 32])
    assert config == {"a": {"b": 1, "c": {"d": 2}}, "heads": [[16, 128], [4, 32]]}
    with pytest.raises(ValueError, match="not a dict"):
        apply_override(config, ["a", "b", "x"], 3)


def test_yaml_floats_without_dot():
    config = load_config(CONFIGS / "cub_mlrc.yaml")
    kwargs = config["optimizers"]["default"]["kwargs"]
    assert kwargs == {"lr": 1e-6, "weight_decay": 1e-4, "momentum": 0.9}
    assert all(isinstance(v, float) for v in kwargs.values())


def test_load_config_methods_and_checks():
    config = load_config(
        CONFIGS / "omniglot_quick.yaml", ["methods.multihead_crt.loss.kwargs.beta=40"]
    )
    assert config["name"] == "omniglot_quick"
    assert method_names(config) == ["frozen", "global_pool", "multihead_crt"]
    crt = method_config(config, "multihead_crt")
    # a method switching embedder.type does not inherit the base's GlobalPoolEmbedder kwargs
    assert crt["embedder"] == {"type": "MultiHeadCRT", "kwargs": {"heads": [[16, 128], [8, 64]]}}
    assert crt["loss"]["name"] == "MultiSimilarityLoss"
    assert crt["loss"]["kwargs"] == {"beta": 40}
    assert crt["method"] == "multihead_crt"
    assert crt["trunk"] == config["trunk"] and crt["training"] == config["training"]
    # defaults fill in keys the file leaves out, also under a switched dataset name
    cub = load_config(CONFIGS / "cub_compare.yaml")
    assert cub["dataset"]["max_classes"] is None and cub["training"]["keep_checkpoints"] == "best"
    with pytest.raises(ValueError, match="did you mean 'training'"):
        load_config(CONFIGS / "omniglot_quick.yaml", ["trainng.batch_size=3"])
    with pytest.raises(ValueError, match="unknown config key images.resise "):
        load_config(CONFIGS / "omniglot_quick.yaml", ["images.resise=3"])
    with pytest.raises(ValueError, match="shares the protocol"):
        load_config(CONFIGS / "omniglot_quick.yaml", ["methods.frozen.seeds=[1]"])
    with pytest.raises(KeyError):
        method_config(config, "nope")


def _none_defaults(section: dict, path: tuple[str, ...] = ()):
    for key, value in section.items():
        if value is None:
            yield (*path, key)
        elif isinstance(value, dict) and key not in config_module._FREE_FORM:
            yield from _none_defaults(value, (*path, key))


def test_values_are_checked_against_the_defaults_types():
    quick = CONFIGS / "omniglot_quick.yaml"
    bad = {
        # not "like the default 10": the config's own value may differ from the built-in one
        "training.num_epochs=two": "training.num_epochs: expected int, got 'two' (str)",
        "training.num_epochs=2.5": "expected int",
        "cache.images=1": "cache.images: expected bool",
        "seeds=[0, one]": "seeds: expected a list of int",
        "threads=x": "threads: expected int or null, got 'x'",
        "dataset=omniglot": "dataset: expected a mapping, got 'omniglot'",
        "methods.frozen.training.m=two": "methods.frozen.training.m: expected int",
    }
    for override, message in bad.items():
        with pytest.raises(ConfigError) as error:
            load_config(quick, [override])
        assert message in str(error.value), override
    good = ["training.patience=null", "images.resize=null", "loss.consistency_weight=1"]
    config = load_config(quick, [*good, "dataset.max_classes=4", "images.rrc_scale=[0, 1]"])
    assert config["training"]["patience"] is None and config["dataset"]["max_classes"] == 4
    # every key whose default is None has a type
    assert set(_none_defaults(DEFAULTS)) == set(config_module._TYPES_OF_NONE_DEFAULTS)


def test_deep_merge_rules():
    base = {"embedder": {"type": "A", "kwargs": {"x": 1}}, "opt": {"kwargs": {"lr": 1, "wd": 2}}}
    merged = deep_merge(base, {"embedder": {"type": "B"}, "opt": {"kwargs": {"lr": 3}}})
    assert merged == {"embedder": {"type": "B"}, "opt": {"kwargs": {"lr": 3, "wd": 2}}}
    same = deep_merge(base, {"embedder": {"type": "A", "kwargs": {"y": 2}}})
    assert same["embedder"]["kwargs"] == {"x": 1, "y": 2}
    # Onto DEFAULTS: other keys stay, but kwargs belong to the class the base named.
    keep = deep_merge(
        {"embedder": {"type": "A", "kwargs": {"x": 1}, "root": "r"}},
        {"embedder": {"type": "B"}},
        replace_on_kind_change=False,
    )
    assert keep["embedder"] == {"type": "B", "root": "r"}
    pruner = load_config(data={"tune": {"pruner": {"name": "none"}}})["tune"]["pruner"]
    assert pruner == {"name": "none"}
    assert base["embedder"] == {"type": "A", "kwargs": {"x": 1}}  # inputs untouched


def test_all_configs_load():
    names = {p.stem for p in CONFIGS.glob("*.yaml")}
    assert {
        "omniglot_quick",
        "omniglot_compare",
        "cub_compare",
        "cub_mlrc",
        "cars196_mlrc",
        "sop_mlrc",
    } <= names
    for name in names:
        config = load_config(CONFIGS / f"{name}.yaml")
        for method in method_names(config):
            method_config(config, method)
    for name in ("cub_mlrc", "cars196_mlrc", "sop_mlrc"):
        config = load_config(CONFIGS / f"{name}.yaml")
        assert config["folds"] == [0, 1, 2, 3] and config["num_folds"] == 4
        assert (config["training"]["batch_size"], config["training"]["m"]) == (32, 4)
        assert config["optimizers"]["default"]["name"] == "RMSprop"
        assert config["images"]["augmentation"] == "mlrc"
        assert config["trunk"]["freeze_batchnorm"] is True


# Configs whose tables were published with pml-crt 0.1.0's heads (coded residuals only),
# before CRT and MultiHeadCRT took a GeM branch by default.
PUBLISHED_WITH_0_1_HEADS = (
    "cub_compare",
    "cub_tune",
    "cub_tuning",
    "omniglot_ablation",
    "omniglot_compare",
    "omniglot_contrastive",
    "omniglot_tune",
    "omniglot7x7_tune",
    "cub224_tune",
)
CRT_TYPES = ("CRT", "MultiHeadCRT")


def _crt_embedders(name: str) -> dict[str, dict]:
    config = load_config(CONFIGS / f"{name}.yaml")
    methods = {m: method_config(config, m)["embedder"] for m in method_names(config)}
    return {m: e for m, e in methods.items() if e["type"] in CRT_TYPES}


@pytest.mark.parametrize("name", PUBLISHED_WITH_0_1_HEADS)
def test_configs_published_with_0_1_heads_still_build_them(name):
    embedders = _crt_embedders(name)
    assert embedders, f"{name} has no CRT rows"
    for method, embedder in embedders.items():
        assert embedder.get("kwargs", {}).get("global_pooling", "default") is None, method


@pytest.mark.parametrize("name", ["cub_mlrc", "cars196_mlrc", "sop_mlrc"])
def test_unpublished_mlrc_configs_use_the_class_defaults(name):
    embedders = _crt_embedders(name)
    assert embedders, f"{name} has no CRT rows"
    for method, embedder in embedders.items():
        assert "global_pooling" not in embedder.get("kwargs", {}), method


# --------------------------------------------------------------------------- Recall@K


def _brute_force_recall(embeddings, labels, k):
    """Loop over queries: is any of the k most cosine-similar others of the same label?"""
    unit = torch.nn.functional.normalize(embeddings.double(), dim=1)
    hits, counted = 0, 0
    for i in range(len(unit)):
        if int((labels == labels[i]).sum()) < 2:
            continue  # lone query: no other member of its class
        similarities = [(float(unit[i] @ unit[j]), j) for j in range(len(unit)) if j != i]
        nearest = [j for _, j in sorted(similarities, reverse=True)[:k]]
        hits += any(int(labels[j]) == int(labels[i]) for j in nearest)
        counted += 1
    return hits / counted


@pytest.mark.parametrize("prefer_faiss", [True, False])
def test_recall_at_k_matches_brute_force(prefer_faiss):
    generator = torch.Generator().manual_seed(0)
    # classes of 2-4 items (max_bin_count - 1 < 8, so k must be raised to 8) and a lone one
    labels = torch.tensor([c for c in range(12) for _ in range(2 + c % 3)] + [99])
    embeddings = torch.randn(len(labels), 6, generator=generator)
    embeddings += 1.5 * torch.randn(100, 6, generator=generator)[labels % 100]
    calculator = make_accuracy_calculator(
        include=("precision_at_1", "recall_at_1", "recall_at_2", "recall_at_4", "recall_at_8"),
        k="max_bin_count",
        prefer_faiss=prefer_faiss,
        calculator_class=BenchmarkAccuracyCalculator,
    )
    unit = torch.nn.functional.normalize(embeddings, dim=1)
    result = calculator.get_accuracy(unit, labels, unit, labels, True)
    for k in (1, 2, 4, 8):
        assert result[f"recall_at_{k}"] == pytest.approx(_brute_force_recall(embeddings, labels, k))
    assert result["recall_at_1"] == pytest.approx(result["precision_at_1"])
    assert result["recall_at_1"] <= result["recall_at_2"] <= result["recall_at_4"] <= 1.0
    assert result["recall_at_8"] < 1.0 or result["recall_at_4"] < result["recall_at_8"]


def test_recall_with_separate_reference_set():
    generator = torch.Generator().manual_seed(1)
    query_labels = torch.arange(5).repeat(3)
    reference_labels = torch.arange(5).repeat(4)
    query = torch.nn.functional.normalize(torch.randn(15, 4, generator=generator), dim=1)
    reference = torch.nn.functional.normalize(torch.randn(20, 4, generator=generator), dim=1)
    calculator = make_accuracy_calculator(
        include=("recall_at_2",), k=1, calculator_class=BenchmarkAccuracyCalculator
    )
    result = calculator.get_accuracy(query, query_labels, reference, reference_labels, False)
    similarity = query @ reference.t()
    nearest = similarity.topk(2, dim=1).indices
    expected = (reference_labels[nearest] == query_labels[:, None]).any(dim=1).double().mean()
    assert result["recall_at_2"] == pytest.approx(float(expected))


# --------------------------------------------------------------------------- caches


class _FakeImages(torch.utils.data.Dataset):
    """Random RGB PIL images of varied sizes, labels ``i % 3``."""

    def __init__(self, n=10):
        rng = np.random.default_rng(0)
        self.images = [
            Image.fromarray(rng.integers(0, 256, (30 + i, 40 - i, 3), dtype=np.uint8))
            for i in range(n)
        ]
        self.labels = [i % 3 for i in range(n)]

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.images[index], self.labels[index]


@pytest.mark.parametrize("normalize", ["imagenet", "invert", "none"])
def test_image_cache_equals_uncached(normalize):
    from benchmarks.protocol.data import ToFloat

    images = {"resize": 24, "crop": 20, "augmentation": "none", "normalize": normalize}
    source = _FakeImages()
    uncached = TransformedDataset(
        TransformedDataset(source, pil_transform(images, train=False)), ToFloat(normalize)
    )
    cached = cache_dataset(
        TransformedDataset(source, pil_transform(images, train=False)),
        ToFloat(normalize),
        batch_size=4,
        progress=False,
    )
    assert cached.data.dtype == torch.uint8 and cached.data.shape == (10, 3, 20, 20)
    assert cached.labels == source.labels
    for i in range(len(source)):
        x, y = uncached[i]
        x_cached, y_cached = cached[i]
        assert torch.equal(x, x_cached) and y == y_cached


def test_mlrc_augmentation_transform():
    images = {"resize": 32, "crop": 24, "augmentation": "mlrc", "rrc_scale": [0.16, 1.0]}
    train = pil_transform(images, train=True)
    names = [type(t).__name__ for t in train.transforms]
    assert names == ["Resize", "RandomResizedCrop", "RandomHorizontalFlip", "PILToTensor"]
    assert train.transforms[1].scale == (0.16, 1.0)
    names = [type(t).__name__ for t in pil_transform(images, train=False).transforms]
    assert names == ["Resize", "CenterCrop", "PILToTensor"]
    x = train(_FakeImages()[0][0])
    assert x.shape == (3, 24, 24) and x.dtype == torch.uint8


def test_class_subset_relabels():
    dataset = CachedDataset(torch.arange(12).view(12, 1), [0, 1, 2, 3] * 3)
    subset = class_subset(dataset, (3, 1))
    assert subset.labels == [0, 1, 0, 1, 0, 1]  # sorted class order: 1 -> 0, 3 -> 1
    assert [int(subset[i][0]) for i in range(len(subset))] == [1, 3, 5, 7, 9, 11]
    assert subset[1] == (dataset[3][0], 1)
    with pytest.raises(ValueError, match="no images"):
        class_subset(dataset, (1, 7))


@pytest.mark.parametrize("frozen_blocks", [2, 6])
def test_frozen_block_cache_equals_full_trunk(frozen_blocks):
    torch.manual_seed(0)
    trunk = feature_map_trunk(
        "mobilenet_v2", None, frozen_blocks=frozen_blocks, freeze_batchnorm=True
    )
    images = CachedDataset(torch.randn(10, 3, 32, 32), [0, 1] * 5)
    features = cache_module_outputs(frozen_prefix(trunk), images, batch_size=4, progress=False)
    tail = TrunkTail(trunk, frozen_blocks)
    assert tail.out_channels == trunk.out_channels
    for mode in (False, True):  # eval, and train mode (frozen blocks and BN stay in eval)
        trunk.train(mode)
        tail.train(mode)
        with torch.no_grad():
            full = trunk(images.data)
            cached = tail(features.data)
        assert_rows_close(cached, full, float32_tolerance(trunk))
    # training the tail leaves the frozen blocks untouched
    assert all(not p.requires_grad for p in frozen_prefix(trunk).parameters())
    state = tail.state_dict()
    assert set(state) == {f"trunk.{k}" for k in trunk.state_dict()}


# --------------------------------------------------------------------------- builders


def test_build_parametric_losses():
    embedder = build_embedder({"type": "GlobalPoolEmbedder", "kwargs": {"embedding_size": 24}}, 8)
    config = {
        "loss": {"name": "ProxyAnchorLoss", "kwargs": {"margin": 0.2}},
        "miner": None,
        "optimizers": {"default": {"name": "SGD", "kwargs": {"lr": 0.1}}, "trunk": None},
    }
    loss_funcs, mining_funcs = build_loss(config, embedder, num_classes=7)
    loss = loss_funcs["metric_loss"]
    assert isinstance(loss, losses.ProxyAnchorLoss) and loss.proxies.shape == (7, 24)
    assert mining_funcs == {}
    trunk = torch.nn.Conv2d(3, 8, 1)
    optimizers = build_optimizers(config, {"trunk": trunk, "embedder": embedder}, loss_funcs)
    assert set(optimizers) == {"embedder_optimizer", "metric_loss_optimizer"}
    assert not any(p.requires_grad for p in trunk.parameters())  # optimizers.trunk: null

    multi = build_embedder({"type": "MultiHeadCRT", "kwargs": {"heads": [[4, 16], [2, 8]]}}, 8)
    config = {
        "loss": {
            "name": "ArcFaceLoss",
            "consistency_weight": 0.5,
            "kwargs": {"distance": {"name": "CosineSimilarity"}},
        },
        "miner": {"name": "MultiSimilarityMiner", "kwargs": {"epsilon": 0.2}},
    }
    loss_funcs, mining_funcs = build_loss(config, multi, num_classes=5)
    loss = loss_funcs["metric_loss"]
    assert isinstance(multi, MultiHeadCRT) and isinstance(loss, MultiHeadLoss)
    assert mining_funcs == {}  # the miner mines each head's slice inside MultiHeadLoss
    heads = loss.losses.values() if isinstance(loss.losses, torch.nn.ModuleDict) else loss.losses
    assert [tuple(h.W.shape) for h in heads] == [(16, 5), (8, 5)]
    assert loss.consistency_weight == 0.5 and loss.miners is not None
    frozen = build_embedder({"type": "frozen"}, 8)
    assert frozen.embedding_size == 8 and not list(frozen.parameters())
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss({"loss": {"name": "NoSuchLoss"}, "miner": None}, embedder, 3)
    with pytest.raises(ValueError, match="embedder.type"):
        build_embedder({"type": "Transformer"}, 8)


@needs_weights
def test_install_weights_feeds_torchvision(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "elsewhere"))
    target = install_weights("mobilenet_v2", "IMAGENET1K_V1", WEIGHTS, tmp_path / "hub")
    assert target == tmp_path / "hub" / "checkpoints" / WEIGHTS.name
    assert target.stat().st_size == WEIGHTS.stat().st_size


def test_trunk_hub_dir_is_undone_so_torch_home_counts_again(tmp_path, monkeypatch):
    # Restoring get_dir()'s default path would pin it: $TORCH_HOME set later was then
    # ignored and torchvision tried to download (the README test, after a runner test).
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    with build._hub_dir(tmp_path / "hub"):
        assert torch.hub.get_dir() == str(tmp_path / "hub")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "home"))
    assert torch.hub.get_dir() == str(tmp_path / "home" / "hub")


# --------------------------------------------------------------------------- end to end


def _files(folder: Path) -> set[str]:
    return {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()}


@needs_omniglot
def test_omniglot_quick_tiny_end_to_end_and_resume(tmp_path, capsys):
    out = tmp_path / "runs"
    argv = ["--config", str(CONFIGS / "omniglot_quick.yaml"), "--out", str(out), "--no-progress"]
    argv += ["--publish", str(tmp_path / "results")]
    for override in TINY_OMNIGLOT:
        argv += ["--set", override]
    first = bench.main(argv)
    printed = capsys.readouterr().out
    root = out / "omniglot_quick"
    assert first["root"] == root and first["units_run"] == 3 and first["units_skipped"] == 0
    assert "| method | P@1 | R-Precision | MAP@R | R@1 |" in printed
    for method in ("frozen", "global_pool", "multihead_crt"):
        assert f"| {method} |" in printed

    unit = root / "multihead_crt" / "seed0" / "fold0"
    files = _files(unit)
    assert {"config.yaml", "env.json", "results.json", "test_embeddings.pt"} <= files
    assert any(f.startswith("logs/") and f.endswith(".csv") for f in files)
    assert "logs/logs.db" in files
    assert any(f.startswith("tensorboard/events.out.tfevents") for f in files)
    models = {f for f in files if f.startswith("models/")}
    assert any(f.startswith("models/trunk_best") for f in models)
    assert any(f.startswith("models/embedder_best") for f in models)
    assert all("_best" in f for f in models)  # only the best checkpoint is kept
    assert not any(p.name.endswith(".tmp") for p in root.rglob("*"))

    result = json.loads((unit / "results.json").read_text())
    assert result["method"] == "multihead_crt" and (result["seed"], result["fold"]) == (0, 0)
    assert result["num_classes"] == {"train": 6, "val": 2, "test": 8}
    assert 1 <= result["best_epoch"] <= result["epochs_run"] <= 2
    assert result["embedding_size"] == 128  # eval: the primary head
    for split in ("val", "test"):
        assert set(result[split]) == {
            "precision_at_1",
            "r_precision",
            "mean_average_precision_at_r",
            "recall_at_1",
            "recall_at_2",
            "recall_at_4",
            "recall_at_8",
            "spectral_decay",
            "embedding_density",
        }
        assert all(
            0.0 <= v <= 1.0 for k, v in result[split].items() if k.startswith(("p", "r", "m"))
        )
        assert result[split]["spectral_decay"] >= 0.0 and result[split]["embedding_density"] > 0.0
    config = yaml.safe_load((unit / "config.yaml").read_text())
    assert config["embedder"]["type"] == "MultiHeadCRT" and config["seed"] == 0
    assert config["dataset"]["max_classes"] == 16
    env = json.loads((unit / "env.json").read_text())
    assert {"torch", "pytorch_metric_learning", "pml_crt", "python", "git_commit"} <= set(env)
    assert env["seed"] == 0 and env["torch_threads"] >= 1
    frozen = json.loads((root / "frozen" / "seed0" / "fold0" / "results.json").read_text())
    assert frozen["trained"] is False and frozen["best_epoch"] == 0
    assert frozen["embedding_size"] == 32  # the trunk's channels, average-pooled
    assert not (root / "frozen" / "seed0" / "fold0" / "models").exists()
    assert (root / "table.md").read_text().count("| frozen |") == 1
    csv_lines = (root / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("method,evaluation,seed,fold,precision_at_1")
    assert len(csv_lines) == 1 + 3 * 2  # a fold row and a "separate" row per method
    published = (tmp_path / "results" / "omniglot_quick.md").read_text()
    assert (root / "table.md").read_text().split("\n\nThis invocation")[0] in published
    assert "Produced by `python -m benchmarks.run --config" in published
    assert "Machine: " in published and "pytorch-metric-learning 2." in published
    assert (tmp_path / "results" / "omniglot_quick.csv").read_text().splitlines() == csv_lines

    # Same command again: every unit is skipped and nothing is rewritten.
    stamp = (unit / "results.json").stat().st_mtime_ns
    second = bench.main(argv)
    assert second["units_run"] == 0 and second["units_skipped"] == 3
    assert (unit / "results.json").stat().st_mtime_ns == stamp
    assert second["table"] == first["table"]

    # An interrupted unit (folder without results.json) is started over; finished ones kept.
    partial = root / "global_pool" / "seed0" / "fold1"
    partial.mkdir(parents=True)
    (partial / "junk.txt").write_text("left by an interrupted run")
    third = bench.main(argv + ["--set", "folds=[0, 1]"])
    assert third["units_run"] == 2 and third["units_skipped"] == 3  # fold 1 of two methods
    assert not (partial / "junk.txt").exists() and (partial / "results.json").exists()
    table = third["table"]
    assert "concatenated folds" in table and "separate (mean of fold models)" in table
    concat = json.loads((root / "global_pool" / "seed0" / "concatenated.json").read_text())
    assert concat["folds"] == [0, 1] and set(concat["test"]) >= {"precision_at_1"}
    separate = [r for r in third["rows"] if r["evaluation"] == "separate"]
    folds = [r for r in third["rows"] if r["evaluation"] == "fold" and r["method"] == "global_pool"]
    gp = next(r for r in separate if r["method"] == "global_pool")
    assert gp["precision_at_1"] == pytest.approx(np.mean([r["precision_at_1"] for r in folds]))
    assert not any(
        r["evaluation"] == "concatenated" and r["method"] == "frozen" for r in third["rows"]
    )

    # A finished unit run under a different config is never silently reused.
    capsys.readouterr()
    with pytest.raises(SystemExit) as stopped:
        bench.main(argv + ["--set", "training.batch_size=8"])
    assert stopped.value.code == 2 and "different config" in capsys.readouterr().err
    # ... but keys that do not change results may differ.
    assert bench.main(argv + ["--set", "eval.batch_size=32"])["units_skipped"] == 3
    # A unit stored before a config key existed ran with its default: still reused.
    stored = yaml.safe_load((unit / "config.yaml").read_text())
    assert stored["training"].pop("keep_checkpoints") == "best"  # the default
    (unit / "config.yaml").write_text(yaml.safe_dump(stored))
    assert bench.main(argv)["units_skipped"] == 3


@needs_omniglot
def test_parametric_loss_on_multihead_crt_trains(tmp_path):
    overrides = TINY_OMNIGLOT + [
        "methods.multihead_crt.loss={name: ProxyAnchorLoss, consistency_weight: 0.5}",
        "methods.multihead_crt.miner=null",
    ]
    result = _run("omniglot_quick", overrides, tmp_path, methods=["multihead_crt"])
    assert result["units_run"] == 1
    models = {p.name for p in (tmp_path / "omniglot_quick" / "multihead_crt").rglob("*.pth")}
    assert any(name.startswith("metric_loss_optimizer_best") for name in models)
    assert [r["method"] for r in result["summary"]] == ["multihead_crt"]


@needs_omniglot
def test_unit_results_do_not_depend_on_what_ran_before(tmp_path):
    # global_pool alone (it builds the image cache) vs after frozen (the cache exists)
    alone = _run("omniglot_quick", TINY_OMNIGLOT, tmp_path / "a", methods=["global_pool"])
    after = _run("omniglot_quick", TINY_OMNIGLOT, tmp_path / "b", methods=["frozen", "global_pool"])
    assert alone["units_run"] == 1 and after["units_run"] == 2
    paths = [tmp_path / v / "omniglot_quick" / "global_pool" / "seed0" / "fold0" for v in "ab"]
    first, second = (json.loads((p / "results.json").read_text()) for p in paths)
    assert first["test"] == second["test"] and first["val"] == second["val"]
    embeddings = [torch.load(p / "test_embeddings.pt", weights_only=True) for p in paths]
    assert torch.equal(embeddings[0]["embeddings"], embeddings[1]["embeddings"])


@needs_omniglot
def test_workers_share_the_units_and_change_no_result(tmp_path):
    # both runs pin threads=1 per process, so a unit computes the same sums either way
    overrides = [*TINY_OMNIGLOT, "seeds=[0,1]", "threads=1"]
    methods = ["frozen", "global_pool", "multihead_crt"]
    alone = _run("omniglot_quick", overrides, tmp_path / "a", methods=methods)
    lines: list[str] = []
    config = load_config(CONFIGS / "omniglot_quick.yaml", overrides)
    shared = bench.run_benchmark(
        config, tmp_path / "b", methods=methods, log=lines.append, progress=False, workers=2
    )
    assert alone["units_run"] == shared["units_run"] == 6 and shared["units_skipped"] == 0
    started = [line.split(":")[0] for line in lines if line.endswith(("training", "evaluating"))]
    assert sorted(started) == sorted(
        f"[{i}/6] seed {s} {m} fold 0" for i, (s, m) in enumerate(product([0, 1], methods), 1)
    )
    assert any(
        "units (2 seeds x 3 methods" in ln and "2 processes x 1 threads" in ln for ln in lines
    )
    for seed, method in product([0, 1], methods):
        paths = [tmp_path / v / "omniglot_quick" / method / f"seed{seed}" / "fold0" for v in "ab"]
        first, second = (json.loads((p / "results.json").read_text()) for p in paths)
        assert first["test"] == second["test"] and first["val"] == second["val"], (seed, method)
    assert alone["table"] == shared["table"]
    again = bench.run_benchmark(
        config, tmp_path / "b", methods=methods, log=lines.append, progress=False, workers=2
    )
    assert again["units_run"] == 0 and again["units_skipped"] == 6
    # a finished unit whose config changed stops the run before any process starts
    changed = load_config(CONFIGS / "omniglot_quick.yaml", [*overrides, "seeds=[0,1,2]"])
    changed["methods"]["global_pool"]["embedder"]["kwargs"]["embedding_size"] = 64
    with pytest.raises(UserError, match="global_pool"):
        bench.run_benchmark(
            changed, tmp_path / "b", methods=methods, log=lines.append, progress=False, workers=2
        )
    assert not (tmp_path / "b" / "omniglot_quick" / "frozen" / "seed2").exists()


def test_worker_processes_end_when_their_parent_is_killed(tmp_path):
    parent = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from benchmarks.protocol.workers import local_processes\n"
            "with local_processes(time.sleep, (600,), 1) as processes:\n"
            "    print(processes[0].pid, flush=True)\n"
            "    time.sleep(600)\n",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(parent.stdout.readline())
    parent.kill()  # SIGKILL: no code of the parent runs to stop its worker
    parent.wait()
    parent.stdout.close()
    deadline = time.monotonic() + 60.0
    while _alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    survived = _alive(child)
    if survived:
        os.kill(child, signal.SIGKILL)  # leave no sleeper behind when the test fails
    assert not survived


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a running process (a zombie, which only waits to be reaped, is not)."""
    try:
        status = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return status.rsplit(")", 1)[1].split()[0] != "Z"


def test_a_failing_worker_process_is_an_error():
    with pytest.raises(RuntimeError, match=r"2 of 2 worker processes exited with \[3, 3\]"):
        with local_processes(_exit_with, (3,), 2):
            pass
    with local_processes(_exit_with, (0,), 2) as processes:
        pass
    assert [p.exitcode for p in processes] == [0, 0]


def _send_pml_log_level(levels: Any) -> None:
    levels.put(logging.getLogger("PML").getEffectiveLevel())


@pytest.mark.parametrize("level", [logging.INFO, logging.WARNING])
def test_worker_processes_log_pml_at_their_parents_level(level: int):
    """``--verbose`` sets PML's logger to INFO; a spawned worker starts without it."""
    levels = multiprocessing.get_context("spawn").Queue()
    pml = logging.getLogger("PML")
    before = pml.level
    pml.setLevel(level)
    try:
        with local_processes(_send_pml_log_level, (levels,), 1):
            pass
    finally:
        pml.setLevel(before)
    assert levels.get(timeout=60) == level


@pytest.mark.parametrize(("cores", "workers", "threads"), [(4, 2, 2), (1, 2, 1), (3, 2, 1)])
def test_workers_share_the_cores_this_process_may_use(monkeypatch, cores, workers, threads):
    """A container or ``taskset`` can allow fewer cores than the machine has."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(cores)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    assert worker_threads({"name": "x"}, workers) == {"name": "x", "threads": threads}
    assert worker_threads({"threads": 8}, workers) == {"threads": 8}
    assert worker_threads({"name": "x"}, 1) == {"name": "x"}


def _fake_cars(root: Path, classes: int = 8, per_class: int = 3) -> None:
    rng = np.random.default_rng(0)
    names = [f"Maker Model/{c} 20{c:02d}" for c in range(1, classes + 1)]
    (root / "names.csv").parent.mkdir(parents=True, exist_ok=True)
    (root / "names.csv").write_text("\n".join(names) + "\n")
    rows = {"train": [], "test": []}
    for c, name in enumerate(names, 1):
        for i in range(per_class):
            split = "train" if i % 2 == 0 else "test"
            file = f"{c:03d}{i:02d}.jpg"
            folder = root / "car_data" / "car_data" / split / name.replace("/", "-")
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(rng.integers(0, 256, (36, 48, 3), dtype=np.uint8)).save(folder / file)
            rows[split].append(f"{file},1,1,30,20,{c}")
    for split, lines in rows.items():
        (root / f"anno_{split}.csv").write_text("\n".join(lines) + "\n")


def _fake_sop(root: Path, classes: int = 8, per_class: int = 3) -> None:
    rng = np.random.default_rng(1)
    base = root / "Stanford_Online_Products"
    lines = {"train": [], "test": []}
    image_id = 0
    for c in range(1, classes + 1):
        split = "train" if c <= classes // 2 else "test"
        for i in range(per_class):
            image_id += 1
            path = f"bicycle_final/{c}_{i}.JPG"
            (base / "bicycle_final").mkdir(parents=True, exist_ok=True)
            image = rng.integers(0, 256, (40, 40), dtype=np.uint8)  # grayscale: needs RGB
            Image.fromarray(image).save(base / path, format="JPEG")
            lines[split].append(f"{image_id} {c} 1 {path}")
    for split, rows in lines.items():
        header = "image_id class_id super_class_id path"
        (base / f"Ebay_{split}.txt").write_text("\n".join([header, *rows]) + "\n")


@pytest.mark.parametrize("dataset", ["cub", "cars196", "sop"])
def test_mlrc_configs_on_tiny_slices(dataset, tmp_path):
    if dataset == "cub":
        if not (DATA / "CUB_200_2011" / "images.txt").is_file():
            pytest.skip(f"CUB-200-2011 not found under {DATA} (see SPEC section 4)")
        root = DATA
    else:
        root = tmp_path / dataset
        (_fake_cars if dataset == "cars196" else _fake_sop)(root)
    overrides = [
        f"dataset.root={root}",
        "dataset.max_classes=8",  # 4 train+val classes: 4 folds of 3 train / 1 val class
        "folds=[0, 1]",
        *TINY_TRAINING,
        *TINY_IMAGES,
        "training.num_epochs=1",
        "training.batch_size=8",
        "eval.batch_size=16",
        "device=cpu",
    ]
    config = load_config(CONFIGS / f"{dataset}_mlrc.yaml", overrides)
    # the heads on CUB (ms_miner adds only a miner, covered on Omniglot); the data path
    # with the pretrained and MS rows on the fakes
    methods = (
        ["pretrained", "ms", "crt", "multihead_crt"] if dataset == "cub" else ["pretrained", "ms"]
    )
    assert set(methods) <= set(method_names(config))
    result = bench.run_benchmark(
        config, tmp_path / "runs", methods=methods, log=lambda s: None, progress=False
    )
    assert result["units_run"] == 1 + 2 * (len(methods) - 1)  # the pretrained row: one fold
    root_dir = tmp_path / "runs" / f"{dataset}_mlrc"
    unit = json.loads((root_dir / "ms" / "seed0" / "fold1" / "results.json").read_text())
    assert unit["num_classes"] == {"train": 3, "val": 1, "test": 4}
    assert unit["embedding_size"] == 128
    pretrained = json.loads(
        (root_dir / "pretrained" / "seed0" / "fold0" / "results.json").read_text()
    )
    assert pretrained["embedding_size"] == 1024  # googlenet, average-pooled
    evaluations = {(r["method"], r["evaluation"]) for r in result["rows"]}
    assert ("ms", "concatenated") in evaluations
    if dataset == "cub":
        assert {(m, "concatenated") for m in ("crt", "multihead_crt")} <= evaluations
    assert ("pretrained", "concatenated") not in evaluations
    stored = yaml.safe_load((root_dir / "ms" / "seed0" / "fold0" / "config.yaml").read_text())
    assert stored["optimizers"]["default"]["kwargs"]["lr"] == pytest.approx(1e-6)


def test_missing_dataset_is_a_clear_error(tmp_path):
    for name in ("cars196", "sop", "cub"):
        with pytest.raises(FileNotFoundError, match="dataset.download=true"):
            load_source({"name": name, "root": tmp_path / "absent", "download": False})
    with pytest.raises(ValueError, match="dataset.name"):
        load_source({"name": "mnist", "root": tmp_path})


def test_fake_sop_source_is_sorted_and_rgb(tmp_path):
    _fake_sop(tmp_path, classes=6, per_class=2)
    source = load_source({"name": "sop", "root": tmp_path, "max_classes": 4})
    assert source.class_ids == [1, 2, 3, 4] and source.num_classes == 4
    assert source.labels == [0, 0, 1, 1, 2, 2, 3, 3]
    image, label = source.dataset[7]
    assert image.mode == "RGB" and label == 3


@needs_cub
@needs_weights
def test_cub_compare_tiny_with_cached_frozen_blocks(tmp_path):
    """cub_compare's MobileNetV2 (from weights_path) with and without the feature cache."""
    methods = ["frozen", "global_avg"]
    messages: list[str] = []
    config = load_config(CONFIGS / "cub_compare.yaml", TINY_CUB)
    bench.run_benchmark(
        config, tmp_path / "cached", methods=methods, log=messages.append, progress=False
    )
    assert any("frozen trunk blocks" in m for m in messages)
    assert (tmp_path / "cached" / ".torch_hub" / "checkpoints" / WEIGHTS.name).is_file()
    config = load_config(CONFIGS / "cub_compare.yaml", [*TINY_CUB, "cache.features=false"])
    messages.clear()
    bench.run_benchmark(
        config, tmp_path / "plain", methods=methods, log=messages.append, progress=False
    )
    assert not any("frozen trunk blocks" in m for m in messages)
    trunk = feature_map_trunk("mobilenet_v2", None)  # for its layers' fan-ins only
    for method in methods:
        paths = [
            tmp_path / v / "cub_compare" / method / "seed0" / "fold0" for v in ("cached", "plain")
        ]
        cached, plain = (torch.load(p / "test_embeddings.pt", weights_only=True) for p in paths)
        assert torch.equal(cached["labels"], plain["labels"])
        embedder = build_embedder(method_config(config, method)["embedder"], trunk.out_channels)
        tolerance = float32_tolerance(trunk, embedder)
        assert_rows_close(cached["embeddings"], plain["embeddings"], tolerance)
        results = [json.loads((p / "results.json").read_text()) for p in paths]
        queries = results[1]["num_images"]["test"]
        assert results[0]["test"] == pytest.approx(
            results[1]["test"], abs=ranking_tolerance(queries)
        )
    frozen = json.loads(
        (
            tmp_path / "cached" / "cub_compare" / "frozen" / "seed0" / "fold0" / "results.json"
        ).read_text()
    )
    assert frozen["embedding_size"] == 1280
    # the pretrained trunk really is pretrained: far above chance on 4 unseen species
    assert frozen["test"]["precision_at_1"] > 0.5


@needs_cub
@needs_weights
def test_frozen_block_outputs_are_computed_once_and_loaded_by_other_processes(tmp_path):
    overrides = [*TINY_CUB, "threads=1"]  # the stored outputs: one thread's, in every process
    # two workers on an empty store: whichever needs the outputs first computes them, once
    shared: list[str] = []
    config = load_config(CONFIGS / "cub_compare.yaml", [*overrides, "name=shared", "seeds=[0,1]"])
    bench.run_benchmark(
        config, tmp_path, methods=["global_avg"], log=shared.append, progress=False, workers=2
    )
    assert sum("cached the output of" in m for m in shared) == 1
    assert len(list((tmp_path / ".cache").glob("features-*.pt"))) == 1
    # a later run in one process loads them and trains to the same embeddings
    alone: list[str] = []
    config = load_config(CONFIGS / "cub_compare.yaml", [*overrides, "name=alone"])
    bench.run_benchmark(config, tmp_path, methods=["global_avg"], log=alone.append, progress=False)
    assert not any("cached the output of" in m for m in alone)
    assert sum("loaded the frozen trunk blocks' output" in m for m in alone) == 1
    paths = [tmp_path / n / "global_avg" / "seed0" / "fold0" for n in ("shared", "alone")]
    embeddings = [torch.load(p / "test_embeddings.pt", weights_only=True) for p in paths]
    assert torch.equal(embeddings[0]["embeddings"], embeddings[1]["embeddings"])
    # other frozen blocks are other values: a second file, not a wrong reuse of the first
    config = load_config(CONFIGS / "cub_compare.yaml", [*overrides, "name=other"])
    config["trunk"]["frozen_blocks"] = int(config["trunk"]["frozen_blocks"]) - 1
    other: list[str] = []
    bench.run_benchmark(config, tmp_path, methods=["global_avg"], log=other.append, progress=False)
    assert sum("cached the output of" in m for m in other) == 1
    assert len(list((tmp_path / ".cache").glob("features-*.pt"))) == 2


class _Stop(Exception):
    pass


def test_threads_are_pinned_for_the_run_and_restored(monkeypatch):
    try:
        import faiss
    except ImportError:
        faiss = None

    def counts() -> tuple[int, int | None]:
        return torch.get_num_threads(), faiss.omp_get_max_threads() if faiss else None

    before = counts()
    seen = []

    def units(*args, **kwargs):
        seen.append(counts())
        raise _Stop  # the caller's counts come back however the run ends

    monkeypatch.setattr(bench, "_run_units", units)
    threads = before[0] + 1
    config = load_config(CONFIGS / "omniglot_quick.yaml", [f"threads={threads}", "device=cpu"])
    with pytest.raises(_Stop):
        bench.run_benchmark(config, "unused")
    assert seen == [(threads, threads if faiss else None)]
    assert counts() == before


def test_internal_errors_keep_their_traceback(monkeypatch):
    def bug(*args, **kwargs):
        raise RuntimeError("a bug")

    monkeypatch.setattr(bench, "_run_units", bug)
    argv = ["--config", str(CONFIGS / "omniglot_quick.yaml"), "--set", "device=cpu"]
    with pytest.raises(RuntimeError, match="a bug"):
        bench.main(argv)


def _user_errors(tmp_path: Path) -> dict[str, tuple[list[str], list[str]]]:
    """Command lines with a user error, and what the error line must name."""
    quick = ["--config", str(CONFIGS / "omniglot_quick.yaml"), "--out", str(tmp_path)]
    return {
        "missing config file": (
            ["--config", str(tmp_path / "absent.yaml"), "--out", str(tmp_path)],
            ["config file", "absent.yaml"],
        ),
        "unknown key": (quick + ["--set", "trainng.m=4"], ["unknown config key trainng "]),
        "bad value": (
            quick + ["--set", "training.num_epochs=two"],
            ["training.num_epochs", "'two'", "int"],
        ),
        "missing data": (
            quick + ["--set", f"dataset.root={tmp_path / 'absent'}"],
            ["dataset.root", str(tmp_path / "absent")],
        ),
        "unknown method": (quick + ["--methods", "nope"], ["--methods", "'nope'"]),
        "no workers": (quick + ["--workers", "0"], ["--workers", "0"]),
        "batch larger than the classes allow": (
            quick + ["--set", "training.batch_size=4000"],
            ["training.batch_size=4000", "m * (number of train classes"],
        ),
        "typo in embedder kwargs": (
            quick + ["--set", "methods.global_pool.embedder.kwargs.embeding_size=8"],
            ["embedder.kwargs.embeding_size", "GlobalPoolEmbedder takes no argument"],
        ),
    }


def _assert_one_error_line(case: str, stderr: str, names: list[str]) -> None:
    assert "Traceback" not in stderr and len(stderr.splitlines()) == 1, (case, stderr)
    assert stderr.startswith("benchmarks.run: error: "), (case, stderr)
    assert all(name in stderr for name in names), (case, stderr)


def test_user_errors_are_one_line(tmp_path, capsys):
    for case, (argv, names) in _user_errors(tmp_path).items():
        with pytest.raises(SystemExit) as stopped:
            bench.main(argv)
        out, err = capsys.readouterr()
        assert stopped.value.code == 2, case
        _assert_one_error_line(case, err, names)
        assert "[1/" not in out, (case, out)  # found before any unit started
        assert list(tmp_path.iterdir()) == [], (case, "a user error left files behind")


def test_user_errors_exit_2_without_traceback_from_the_command_line(tmp_path):
    # One found while loading the config, one while running it; started at once, as each
    # spends its few seconds importing torch.
    cases = {k: v for k, v in _user_errors(tmp_path).items() if k in ("bad value", "missing data")}
    processes = {
        case: subprocess.Popen(
            [sys.executable, "-m", "benchmarks.run", *argv],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case, (argv, _) in cases.items()
    }
    for case, process in processes.items():
        stdout, stderr = process.communicate(timeout=300)
        assert process.returncode == 2, (case, stderr[-2000:])
        _assert_one_error_line(case, stderr, cases[case][1])
        assert "[1/" not in stdout, (case, stdout)


@needs_omniglot
def test_no_progress_hides_every_bar(tmp_path):
    argv = ["--config", str(CONFIGS / "omniglot_quick.yaml"), "--out", str(tmp_path)]
    argv += ["--no-progress", "--methods", "global_pool"]
    for override in [*TINY_OMNIGLOT, "training.num_epochs=1", "threads=1"]:
        argv += ["--set", override]
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    assert "| global_pool |" in completed.stdout  # it trained, validated and tested
    # tqdm redraws a bar with "\r" and reports "it/s" or "s/it"
    assert not any(mark in completed.stderr for mark in ("\r", "it/s", "s/it", "%|")), (
        completed.stderr[-2000:]
    )


def test_cli_help():
    completed = subprocess.run(
        [sys.executable, "-m", "benchmarks.run", "--help"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0
    assert "--set" in completed.stdout and "--config" in completed.stdout


@needs_omniglot
def test_validation_split_never_embeds_the_test_classes(tmp_path, monkeypatch):
    embedded_sizes = []
    original = testers.GlobalEmbeddingSpaceTester.get_all_embeddings

    def spy(self, dataset, *args, **kwargs):
        embedded_sizes.append(len(dataset))
        return original(self, dataset, *args, **kwargs)

    monkeypatch.setattr(testers.GlobalEmbeddingSpaceTester, "get_all_embeddings", spy)
    result = _run(
        "omniglot_quick",
        [*TINY_OMNIGLOT, "eval.split=val"],
        tmp_path,
        methods=["global_pool"],
    )
    unit = json.loads((result["root"] / "global_pool/seed0/fold0/results.json").read_text())
    assert "test" not in unit and set(unit["val"]) >= {"mean_average_precision_at_r"}
    assert set(embedded_sizes) == {unit["num_images"]["val"]}
    assert (
        result["rows"][0]["mean_average_precision_at_r"]
        == unit["val"]["mean_average_precision_at_r"]
    )
    assert "VALIDATION classes only" in (result["root"] / "table.md").read_text()


@needs_omniglot
def test_omniglot_compare_every_method_on_a_tiny_slice(tmp_path):
    result = _run(
        "omniglot_compare", [*TINY_OMNIGLOT, "trunk.kwargs.channels=[8, 8, 8, 8]"], tmp_path
    )
    methods = {row["method"] for row in result["rows"]}
    assert methods == set(method_names(load_config(CONFIGS / "omniglot_compare.yaml")))
    assert all(0.0 <= row["precision_at_1"] <= 1.0 for row in result["rows"])


def test_published_table_names_the_commits_and_time_of_its_units(tmp_path):
    root = tmp_path / "run"
    units = [("a", 0, "c1", 1), ("a", 1, "c2", 2), ("b", 0, "c1", 1), ("b", 1, "c1", 2)]
    for method, seed, commit, threads in units:
        unit = unit_dir(root, method, seed, 0)
        unit.mkdir(parents=True)
        env = {"git_commit": commit, "torch_threads": threads}
        (unit / "env.json").write_text(json.dumps(env))
        times = {"total_time_s": 40.0 + seed, "eval_time_s": 2.0, "trained": method == "b"}
        # b trains (10 s at seed 0, 30 s at seed 1); a is untrained (its validation, 5 s)
        times["train_time_s"] = 5.0 if method == "a" else 10.0 + 20 * seed
        (unit / "results.json").write_text(json.dumps(times))
    rows = [{"method": "a", "evaluation": "separate", "seed": 0, "fold": "", "p": 0.5}]
    publish_results(tmp_path / "out", "t", "table", rows, ["p"], torch.device("cpu"), "cmd", root)
    text = (tmp_path / "out" / "t.md").read_text()
    assert (
        "The units ran the code of commit `c1` (2 units, 1 torch threads), "
        "`c1` (1 units, 2 torch threads), `c2` (1 units, 2 torch threads)" in text
    )
    assert "Time of the 4 finished units, summed: 2.7 min" in text  # (40 + 41 + 40 + 41) s
    # the trained units only (b): training 10 and 30 s, testing 2, totals 40 and 41, and the
    # rest (40 - 10 - 2 = 28, 41 - 30 - 2 = 9) is building the model and caches
    assert (
        "Per trained unit, median (range): training 20 s (10-30), testing 2 s (2-2), "
        "total 40 s (40-41); the rest of the total, 18 s (9-28), is building" in text
    )


@needs_omniglot
def test_init_from_data_clusters_the_training_classes_before_training(tmp_path, monkeypatch):
    from benchmarks.protocol import unit as unit_module
    from benchmarks.protocol.splits import mlrc_split

    calls = []
    original = unit_module.init_from_data

    def recording(embedder, trunk, loader, **kwargs):
        labels = {int(label) for _, batch_labels in loader for label in batch_labels}
        calls.append((type(embedder).__name__, labels, kwargs))
        return original(embedder, trunk, loader, **kwargs)

    monkeypatch.setattr(unit_module, "init_from_data", recording)
    overrides = [
        *TINY_OMNIGLOT,
        "trunk.kwargs.channels=[8, 8, 8, 8]",
        "methods.netvlad.embedder.init_from_data={max_descriptors: 300}",
        "methods.multihead_crt.embedder.init_from_data={}",
    ]
    config = load_config(CONFIGS / "omniglot_compare.yaml", overrides)
    result = bench.run_benchmark(
        config, tmp_path, methods=["netvlad", "multihead_crt"], log=lambda m: None, progress=False
    )
    assert {row["method"] for row in result["rows"]} == {"netvlad", "multihead_crt"}
    split = mlrc_split(16, 0, 4)
    assert [(name, kwargs) for name, _, kwargs in calls] == [
        ("NetVLAD", {"seed": 0, "max_descriptors": 300}),
        ("MultiHeadCRT", {"seed": 0}),
    ]
    for _, labels, _ in calls:
        assert labels == set(split.train), "k-means saw classes other than the training ones"
    with pytest.raises(ConfigError, match="init_from_data needs a NetVLAD, CRT or MultiHeadCRT"):
        bench.run_benchmark(
            load_config(
                CONFIGS / "omniglot_compare.yaml",
                [*overrides, "methods.global_avg.embedder.init_from_data={}"],
            ),
            tmp_path / "bad",
            methods=["global_avg"],
            log=lambda m: None,
            progress=False,
        )


@needs_omniglot
def test_a_class_order_seed_trains_validates_and_tests_on_the_shuffled_split(tmp_path, monkeypatch):
    from benchmarks.protocol import unit as unit_module
    from benchmarks.protocol.splits import mlrc_split

    picked = []
    original = unit_module.class_subset

    def recording(dataset, classes):
        picked.append(tuple(classes))
        return original(dataset, classes)

    monkeypatch.setattr(unit_module, "class_subset", recording)
    config = load_config(
        CONFIGS / "omniglot_compare.yaml",
        [*TINY_OMNIGLOT, "trunk.kwargs.channels=[8, 8, 8, 8]", "dataset.class_order_seed=1"],
    )
    lines = []
    result = bench.run_benchmark(
        config, tmp_path, methods=["global_avg"], log=lines.append, progress=False
    )
    shuffled, mlrc = mlrc_split(16, 0, 4, order_seed=1), mlrc_split(16, 0, 4)
    assert shuffled.test != mlrc.test
    # every unit (one per seed) picks train, validation and test classes of the shuffled split
    assert picked == [shuffled.train, shuffled.val, shuffled.test] * len(config["seeds"])
    assert result["units_run"] == len(config["seeds"])
    table = (tmp_path / config["name"] / "table.md").read_text()
    assert "16 classes (320 images), classes shuffled with seed 1, then MLRC split" in table


@needs_cub
@needs_weights
def test_cached_views_hold_the_train_val_classes_of_the_shuffled_order(tmp_path):
    from benchmarks.protocol.pipeline import DataPipeline
    from benchmarks.protocol.splits import trainval_test_classes

    views = ["images.augmentation=mlrc", "cache.train_views=2", "dataset.max_classes=4"]
    config = load_config(
        CONFIGS / "cub_compare.yaml", [*TINY_CUB, *views, "dataset.class_order_seed=0"]
    )
    trainval = set(trainval_test_classes(4, 0)[0])
    assert trainval == {0, 2}  # not the sorted half {0, 1}
    trunk = build.build_trunk(config["trunk"], 3, tmp_path / "hub")
    data = DataPipeline(config["dataset"], log=lambda s: None, progress=False)
    cached = data.view_features(config, trunk, torch.device("cpu"))
    expected = [y for y in data.source.labels if y in trainval]
    assert cached.labels == expected and cached.data.shape[:2] == (len(expected), 2)


@needs_cub
@needs_weights
def test_augmented_views_of_the_frozen_blocks_are_cached_once_and_drawn_per_access(
    tmp_path, monkeypatch
):
    """cache.train_views: the frozen blocks over V seeded augmented views, one drawn per access."""
    from benchmarks.protocol.pipeline import DataPipeline

    views = ["images.augmentation=mlrc", "cache.train_views=3", "dataset.max_classes=4"]
    config = load_config(CONFIGS / "cub_compare.yaml", [*TINY_CUB, *views])
    assert build.caches_frozen_stages(config)
    trunk = build.build_trunk(config["trunk"], 3, tmp_path / "hub")
    data = DataPipeline(config["dataset"], log=lambda s: None, progress=False)
    cached = data.view_features(config, trunk, torch.device("cpu"))
    assert data.view_features(config, trunk, torch.device("cpu")) is cached  # once per process
    # only the train+val half (classes 0 and 1 of 4) is cached: nothing trains on a test class
    trainval = [i for i, y in enumerate(data.source.labels) if y < 2]
    assert 0 < len(trainval) < len(data.source.labels)
    assert cached.data.shape[:2] == (len(trainval), 3)
    assert cached.labels == [data.source.labels[i] for i in trainval]
    # the views are seeded (VIEW_SEED + v): another process, whatever its RNG state, gets them
    torch.manual_seed(12345)
    again = DataPipeline(config["dataset"], log=lambda s: None, progress=False)
    assert torch.equal(again.view_features(config, trunk, torch.device("cpu")).data, cached.data)
    assert not torch.allclose(cached.data[:, 0], cached.data[:, 1])  # different crops
    eval_features = data.features(config, trunk, torch.device("cpu"))
    assert not torch.allclose(cached.data[:, 0], eval_features.data[trainval])
    # an access returns one of the stored views, drawn with torch's RNG
    torch.manual_seed(0)
    draws = [cached[5][0] for _ in range(30)]
    drawn = {next(v for v in range(3) if torch.equal(x, cached.data[5, v])) for x in draws}
    assert drawn == {0, 1, 2}
    # and a unit trains on them (the test classes are embedded from the eval features)
    config = load_config(CONFIGS / "cub_compare.yaml", [*TINY_CUB, *views[:2]])
    result = bench.run_benchmark(
        config, tmp_path / "runs", methods=["global_avg"], log=lambda s: None, progress=False
    )
    assert result["units_run"] == 1 * len(config["seeds"])
    # an untrained (frozen) unit never asks for the views: it would wait for their cache
    asked = []
    monkeypatch.setattr(DataPipeline, "view_features", lambda *a: asked.append(a))
    result = bench.run_benchmark(
        config, tmp_path / "runs", methods=["frozen"], log=lambda s: None, progress=False
    )
    assert result["units_run"] == len(config["seeds"]) and asked == []
