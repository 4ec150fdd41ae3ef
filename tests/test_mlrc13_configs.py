"""The MLRC-13 configs: all 13 losses of MLRC's table with both embedders, searchable, buildable.

Nothing trains: every method (at its start values and at the low and high corners of its
search space) is built through the runner's own build functions on a stand-in trunk output
and gives a finite loss on one tiny batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from pytorch_metric_learning import losses, miners, regularizers

from benchmarks.protocol.build import build_embedder, build_loss, build_optimizers, is_frozen_method
from benchmarks.protocol.config import load_config, method_config, method_names
from benchmarks.search.space import apply_params, search_space
from pml_crt.losses import MultiHeadLoss
from pml_crt.models import GlobalPoolEmbedder, MultiHeadCRT

CONFIGS = Path(__file__).resolve().parents[1] / "benchmarks" / "configs"
NAMES = ("omniglot7x7_mlrc13", "cub224_mlrc13", "cars224_mlrc13")
# MLRC's Table 4, in its order: method prefix -> PML loss class.
MLRC13 = {
    "contrastive": "ContrastiveLoss",
    "triplet": "TripletMarginLoss",
    "ntxent": "NTXentLoss",
    "proxynca": "ProxyNCALoss",
    "margin": "MarginLoss",
    "normalized_softmax": "NormalizedSoftmaxLoss",
    "cosface": "CosFaceLoss",
    "arcface": "ArcFaceLoss",
    "fastap": "FastAPLoss",
    "snr": "SignalToNoiseRatioContrastiveLoss",
    "ms": "MultiSimilarityLoss",
    "ms_miner": "MultiSimilarityLoss",
    "softtriple": "SoftTripleLoss",
}
# Losses with trained parameters (proxies, class weights, centres, beta): MLRC gave them an
# optimizer of their own with a searched learning rate.
PARAMETRIC = {"proxynca", "margin", "normalized_softmax", "cosface", "arcface", "softtriple"}
EMBEDDERS = {"linear": GlobalPoolEmbedder, "crt": MultiHeadCRT}
CHANNELS, CLASSES, PER_CLASS = 16, 6, 4  # a stand-in trunk output: 16 channels, 7x7


@pytest.fixture(scope="module", params=NAMES)
def config(request):
    return load_config(CONFIGS / f"{request.param}.yaml")


def _trained(config):
    return [n for n in method_names(config) if not is_frozen_method(method_config(config, n))]


def test_all_13_losses_appear_with_both_embedders(config):
    names = method_names(config)
    expected = {f"{loss}_{kind}" for loss in MLRC13 for kind in EMBEDDERS}
    assert len(names) == 27 and set(names) == expected | {"frozen"}
    assert is_frozen_method(method_config(config, "frozen"))
    for prefix, loss in MLRC13.items():
        for kind in EMBEDDERS:
            method = method_config(config, f"{prefix}_{kind}")
            assert method["loss"]["name"] == loss
            miner = method["miner"]
            assert (miner or {}).get("name") == (
                "MultiSimilarityMiner" if prefix == "ms_miner" else None
            )
        linear = method_config(config, f"{prefix}_linear")["embedder"]
        assert linear == {
            "type": "GlobalPoolEmbedder",
            "kwargs": {"embedding_size": 128, "pooling": "avg"},
            "init_from_data": None,
        }
        assert method_config(config, f"{prefix}_crt")["embedder"]["type"] == "MultiHeadCRT"
    # the same budget for every method: nothing per method overrides training or tune
    for name in names:
        method = method_config(config, name)
        assert method["training"] == config["training"] and method["tune"]["trials"] == 6


def test_every_trained_method_searches_its_loss_and_the_shared_optimiser(config):
    assert search_space(method_config(config, "frozen")) == {}
    shared = set(config["search_space"])
    for name in _trained(config):
        prefix, kind = name.rsplit("_", 1)
        space = search_space(method_config(config, name))
        assert space and shared <= set(space)
        assert any(k.startswith("loss.kwargs.") for k in space), name
        assert ("optimizers.metric_loss.kwargs.lr" in space) == (prefix in PARAMETRIC), name
        assert ("loss.consistency_weight" in space) == (kind == "crt"), name
        assert ("miner.kwargs.epsilon" in space) == (prefix == "ms_miner"), name
        # the _crt row searches exactly its _linear row's space plus the consistency weight
        if kind == "crt":
            linear = search_space(method_config(config, f"{prefix}_linear"))
            assert set(space) - {"loss.consistency_weight"} == set(linear)


def _corner(space, corner):
    return {
        key: entry["choices"][0 if corner == "low" else -1]
        if entry["type"] == "categorical"
        else entry[corner]
        for key, entry in space.items()
    }


def _build_and_compute(method):
    """Build the method as the runner does (``unit._trainer``) and take one loss value."""
    embedder = build_embedder(method["embedder"], CHANNELS)
    loss_funcs, mining_funcs = build_loss(method, embedder, num_classes=CLASSES)
    trunk = torch.nn.Conv2d(3, CHANNELS, 1)  # stands in for the trunk's trainable part
    optimizers = build_optimizers(method, {"trunk": trunk, "embedder": embedder}, loss_funcs)
    labels = torch.arange(CLASSES).repeat_interleave(PER_CLASS)
    embeddings = embedder(torch.randn(len(labels), CHANNELS, 7, 7))
    miner = mining_funcs.get("tuple_miner")
    indices = miner(embeddings, labels) if miner is not None else None
    value = loss_funcs["metric_loss"](embeddings, labels, indices)
    assert torch.isfinite(value), method["method"]
    return embedder, loss_funcs["metric_loss"], mining_funcs, optimizers


def test_every_method_builds_at_its_start_values_and_search_corners(config):
    torch.manual_seed(0)
    frozen = build_embedder(method_config(config, "frozen")["embedder"], CHANNELS)
    assert isinstance(frozen, GlobalPoolEmbedder) and not list(frozen.parameters())
    for name in _trained(config):
        prefix, kind = name.rsplit("_", 1)
        method = method_config(config, name)
        embedder, loss, mining_funcs, optimizers = _build_and_compute(method)
        assert isinstance(embedder, EMBEDDERS[kind])
        expected = {"trunk_optimizer", "embedder_optimizer"}
        if prefix in PARAMETRIC:
            expected.add("metric_loss_optimizer")
            optimizer = optimizers["metric_loss_optimizer"]
            assert isinstance(optimizer, torch.optim.RMSprop)
            assert optimizer.param_groups[0]["momentum"] == 0.9
        assert set(optimizers) == expected, name
        heads = [loss]
        if isinstance(loss, MultiHeadLoss):
            per_head = loss.losses
            heads = list(
                per_head.values() if isinstance(per_head, torch.nn.ModuleDict) else per_head
            )
        if kind == "crt":
            assert isinstance(loss, MultiHeadLoss) and len(heads) == 2 and mining_funcs == {}
            assert (loss.miners is not None) == (prefix == "ms_miner")
        else:
            assert (set(mining_funcs) == {"tuple_miner"}) == (prefix == "ms_miner")
        for head in heads:
            assert type(head).__name__ == MLRC13[prefix]
        if prefix == "margin":  # MLRC's "Margin" row: one learned beta, not one per class
            assert all(
                isinstance(h.beta, torch.nn.Parameter) and h.beta.shape == (1,) for h in heads
            )
        if prefix == "snr":
            assert all(
                isinstance(h.embedding_regularizer, regularizers.ZeroMeanRegularizer) for h in heads
            )
        if prefix == "softtriple":
            for head in heads:
                assert isinstance(head.weight_regularizer, regularizers.SparseCentersRegularizer)
                assert head.weight_regularizer.same_class_mask.shape == (CLASSES * 10,) * 2
        space = search_space(method)
        for corner in ("low", "high"):
            _build_and_compute(apply_params(method, _corner(space, corner)))


def test_a_regularizer_gets_the_units_classes_and_the_losss_centers_per_class():
    """The runner change behind MLRC's SoftTriple reg_weight (benchmarks/protocol/build.py)."""
    embedder = build_embedder({"type": "GlobalPoolEmbedder", "kwargs": {"embedding_size": 8}}, 4)

    def softtriple(loss_kwargs):
        config = {"loss": {"name": "SoftTripleLoss", "kwargs": loss_kwargs}, "miner": None}
        return build_loss(config, embedder, num_classes=3)[0]["metric_loss"]

    regularizer = {"name": "SparseCentersRegularizer"}
    loss = softtriple({"weight_regularizer": regularizer})  # the loss's default: 10 centres
    assert loss.weight_regularizer.same_class_mask.shape == (30, 30)
    loss = softtriple({"centers_per_class": 4, "weight_regularizer": regularizer})
    assert loss.fc.shape == (8, 12) and loss.weight_regularizer.same_class_mask.shape == (12, 12)
    explicit = {
        "name": "SparseCentersRegularizer",
        "kwargs": {"num_classes": 2, "centers_per_class": 2},
    }
    assert softtriple(
        {"weight_regularizer": explicit}
    ).weight_regularizer.same_class_mask.shape == (4, 4)
    # classes that take neither argument are built as before
    config = {
        "loss": {
            "name": "ContrastiveLoss",
            "kwargs": {"embedding_regularizer": "ZeroMeanRegularizer", "reducer": "MeanReducer"},
        },
        "miner": {"name": "MultiSimilarityMiner"},
    }
    loss_funcs, mining_funcs = build_loss(config, embedder, num_classes=3)
    assert isinstance(loss_funcs["metric_loss"], losses.ContrastiveLoss)
    assert isinstance(mining_funcs["tuple_miner"], miners.MultiSimilarityMiner)
