"""Build the trunk, embedder, loss, miner and optimizers of one method from its config.

Everything returned is a stock PML part or a pml-crt module: the runner hands
them to ``trainers.MetricLossOnly`` and ``testers.GlobalEmbeddingSpaceTester``.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from pytorch_metric_learning import distances, losses, miners, reducers, regularizers

import pml_crt
from pml_crt.losses import MultiHeadLoss, PrototypeRegularizedLoss
from pml_crt.models import CRT, GlobalPoolEmbedder, MultiHeadCRT, NetVLAD
from pml_crt.trunks import FeatureMapTrunk, SmallConvNet, available_trunks, feature_map_trunk
from pml_crt.utils import param_groups

from .config import ConfigError, MissingFileError

__all__ = [
    "EMBEDDERS",
    "build_embedder",
    "build_loss",
    "build_optimizers",
    "build_trunk",
    "install_weights",
    "caches_frozen_stages",
    "check_arguments",
    "is_frozen_method",
    "trunk_is_cacheable",
]

EMBEDDERS: dict[str, type[torch.nn.Module]] = {
    "GlobalPoolEmbedder": GlobalPoolEmbedder,
    "NetVLAD": NetVLAD,
    "CRT": CRT,
    "MultiHeadCRT": MultiHeadCRT,
}
FROZEN = "frozen"

# Loss kwargs that name other PML objects: {name: ..., kwargs: {...}} -> instance.
_OBJECT_KWARGS = {
    "distance": (distances,),
    "reducer": (reducers,),
    "embedding_regularizer": (regularizers, pml_crt.regularizers),
    "weight_regularizer": (regularizers, pml_crt.regularizers),
    "prototype_regularizer": (regularizers, pml_crt.regularizers),
}
# Loss kwargs that are not the loss class's: they wrap the loss in PrototypeRegularizedLoss.
_PROTOTYPE_KWARGS = ("prototype_regularizer", "prototype_reg_weight")


def _lookup(name: str, modules: tuple[Any, ...], what: str) -> Any:
    for module in modules:
        if hasattr(module, name):
            return getattr(module, name)
    places = ", ".join(m.__name__ for m in modules)
    raise ConfigError(f"unknown {what} {name!r}: not found in {places}")


def _object(
    spec: Any, modules: tuple[Any, ...], what: str, fill: Mapping[str, Any] | None = None
) -> Any:
    """``{name, kwargs}`` (or a bare name) -> an instance of the class ``name``.

    Each ``fill`` entry the class takes and ``kwargs`` does not set is passed too.
    """
    if isinstance(spec, str):
        spec = {"name": spec}
    if not isinstance(spec, Mapping) or "name" not in spec:
        raise ConfigError(
            f"{what} must be a class name or {{name: ..., kwargs: {{...}}}}, got {spec!r}"
        )
    extra = set(spec) - {"name", "kwargs"}
    if extra:
        raise ConfigError(f"{what} {spec['name']!r} has unknown keys {sorted(extra)}")
    cls = _lookup(spec["name"], modules, what)
    kwargs = dict(spec.get("kwargs") or {})
    for name, value in (fill or {}).items():
        if name not in kwargs and _accepts(cls, name):
            kwargs[name] = value
    return cls(**kwargs)


def _accepts(cls: type, argument: str) -> bool:
    """Whether ``cls(...)`` takes ``argument``, following ``*args/**kwargs`` up the MRO."""
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters
        if argument in parameters:
            return True
        if not any(
            p.kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
            for p in parameters.values()
        ):
            return False
    return False


def _parameter_names(cls: type) -> set[str]:
    """The keyword arguments ``cls(...)`` takes, following ``**kwargs`` up the MRO."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        parameters = inspect.signature(init).parameters.values()
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        names |= {p.name for p in parameters if p.kind in kinds and p.name != "self"}
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
            break
    return names


def _check_kwargs(kwargs: Mapping[str, Any] | None, classes: tuple[type, ...], where: str) -> None:
    """Raise ``ConfigError`` for the first key of ``kwargs`` that none of ``classes`` takes."""
    for key in kwargs or {}:
        if not any(_accepts(cls, key) for cls in classes):
            takes = sorted(set().union(*(_parameter_names(cls) for cls in classes)))
            raise ConfigError(
                f"{where}.{key}: {classes[0].__name__} takes no argument {key!r} "
                f"(it takes {', '.join(takes)})"
            )


def check_arguments(config: Mapping[str, Any]) -> None:
    """Check every ``kwargs`` of one method's config against its class's signature.

    The embedder's (a ``MultiHeadCRT`` passes what it does not take to every
    ``CRT`` head), the loss's (less the ``{name, kwargs}`` objects and the
    prototype-regularizer keys, which are checked as their own classes), the
    miner's, the small convnet trunk's and every optimizer's. A typo is a one-line
    ``ConfigError`` before anything is built or trained.
    """
    embedder = config["embedder"]
    kind = embedder["type"]
    if kind != FROZEN and kind not in EMBEDDERS:
        raise ConfigError(f"embedder.type must be one of {[*EMBEDDERS, FROZEN]}, got {kind!r}")
    cls = GlobalPoolEmbedder if kind == FROZEN else EMBEDDERS[kind]
    _check_kwargs(
        embedder.get("kwargs"), (cls, CRT) if cls is MultiHeadCRT else (cls,), "embedder.kwargs"
    )
    loss_kwargs = dict(config["loss"].get("kwargs") or {})
    loss_cls = _lookup(config["loss"]["name"], (losses, pml_crt.losses), "loss")
    for key, modules in _OBJECT_KWARGS.items():
        spec = (
            loss_kwargs.pop(key, None)
            if key not in ("distance", "reducer")
            else loss_kwargs.get(key)
        )
        if isinstance(spec, Mapping) and "name" in spec:
            _check_kwargs(
                spec.get("kwargs"),
                (_lookup(spec["name"], modules, key),),
                f"loss.kwargs.{key}.kwargs",
            )
    for key in _PROTOTYPE_KWARGS:
        loss_kwargs.pop(key, None)
    _check_kwargs(loss_kwargs, (loss_cls,), "loss.kwargs")
    miner = config.get("miner")
    if isinstance(miner, Mapping) and "name" in miner:
        _check_kwargs(
            miner.get("kwargs"), (_lookup(miner["name"], (miners,), "miner"),), "miner.kwargs"
        )
    if config["trunk"]["name"] == "small_convnet":
        _check_kwargs(config["trunk"].get("kwargs"), (SmallConvNet,), "trunk.kwargs")
    for key, spec in (config.get("optimizers") or {}).items():
        if isinstance(spec, Mapping) and "name" in spec:
            optimizer = _lookup(spec["name"], (torch.optim,), "optimizer")
            _check_kwargs(spec.get("kwargs"), (optimizer,), f"optimizers.{key}.kwargs")


def _argument(cls: type, name: str, kwargs: Mapping[str, Any]) -> Any:
    """``kwargs[name]``, else the default of ``cls``'s argument ``name`` (None if neither)."""
    if name in kwargs:
        return kwargs[name]
    parameter = inspect.signature(cls).parameters.get(name)
    if parameter is None or parameter.default is inspect.Parameter.empty:
        return None
    return parameter.default


@contextlib.contextmanager
def _hub_dir(path: str | Path | None) -> Iterator[None]:
    if path is None:
        yield
        return
    # torch.hub has no public way to unset a directory; get_dir() would return the default
    # path, and setting it back would pin it, so that $TORCH_HOME no longer counted.
    previous = torch.hub._hub_dir  # noqa: SLF001 (None unless someone called set_dir)
    torch.hub.set_dir(str(path))
    try:
        yield
    finally:
        torch.hub._hub_dir = previous  # noqa: SLF001


def install_weights(name: str, weights: str, weights_path: str | Path, hub_dir: str | Path) -> Path:
    """Put a local weights file where torchvision's builder looks for ``weights``.

    Copies ``weights_path`` to ``hub_dir/checkpoints/<file name of the weights URL>``
    (unless that file already exists), so that building the model with
    ``weights=...`` under ``torch.hub.set_dir(hub_dir)`` loads it through
    torchvision's own code path, with no download.
    """
    source = Path(weights_path).expanduser()
    if not source.is_file():
        raise MissingFileError(f"trunk.weights_path {str(source)!r} is not a file")
    enum = torchvision.models.get_model_weights(name).verify(weights)
    target = Path(hub_dir) / "checkpoints" / Path(enum.url).name
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        # one temporary file per process: several ranks may install at once
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        shutil.copyfile(source, tmp)
        tmp.replace(target)
    return target


def build_trunk(
    config: Mapping[str, Any], in_channels: int, hub_dir: str | Path | None
) -> torch.nn.Module:
    """The trunk of the ``trunk`` config section; it has an ``out_channels`` attribute.

    ``small_convnet`` is :class:`pml_crt.trunks.SmallConvNet` (random
    initialisation); other names are torchvision backbones through
    :func:`pml_crt.trunks.feature_map_trunk`.
    """
    name = config["name"]
    kwargs = dict(config.get("kwargs") or {})
    if name == "small_convnet":
        if config.get("weights") or config.get("frozen_blocks"):
            raise ConfigError("small_convnet has no pretrained weights nor blocks to freeze")
        return SmallConvNet(in_channels, **kwargs)
    if name not in available_trunks():
        raise ConfigError(
            f"trunk.name must be small_convnet or one of {available_trunks()}, got {name!r}"
        )
    if in_channels != 3:
        raise ConfigError(
            f"torchvision trunks need 3-channel images; this dataset has {in_channels}"
        )
    weights = config.get("weights")
    if config.get("weights_path"):
        if weights is None:
            raise ConfigError("trunk.weights_path needs trunk.weights (e.g. IMAGENET1K_V1)")
        if hub_dir is None:
            raise ValueError("trunk.weights_path needs a hub_dir")
        install_weights(name, weights, config["weights_path"], hub_dir)
    with _hub_dir(hub_dir if config.get("weights_path") else None):
        return feature_map_trunk(
            name,
            weights,
            freeze_batchnorm=bool(config.get("freeze_batchnorm", False)),
            frozen_blocks=config.get("frozen_blocks", 0) or 0,
            progress=False,
            **kwargs,
        )


def is_frozen_method(config: Mapping[str, Any]) -> bool:
    """Whether the method is the untrained baseline (trunk + global average pooling)."""
    return config["embedder"]["type"] == FROZEN


def build_embedder(config: Mapping[str, Any], in_channels: int) -> torch.nn.Module:
    """The embedder of the ``embedder`` section (``type`` + ``kwargs``) on ``in_channels``.

    ``frozen`` is ``GlobalPoolEmbedder(in_channels, None)``: global pooling
    (``kwargs.pooling``, default avg), no Linear, no training.
    """
    kind = config["type"]
    kwargs = dict(config.get("kwargs") or {})
    if kind == FROZEN:
        return GlobalPoolEmbedder(in_channels, None, pooling=kwargs.pop("pooling", "avg"), **kwargs)
    if kind not in EMBEDDERS:
        raise ConfigError(f"embedder.type must be one of {[*EMBEDDERS, FROZEN]}, got {kind!r}")
    return EMBEDDERS[kind](in_channels, **kwargs)


def build_loss(
    config: Mapping[str, Any], embedder: torch.nn.Module, num_classes: int
) -> tuple[dict[str, torch.nn.Module], dict[str, torch.nn.Module]]:
    """The trainer's ``loss_funcs`` and ``mining_funcs`` for one method.

    ``loss.name`` is a class of ``pytorch_metric_learning.losses`` (or
    ``pml_crt.losses``); ``num_classes`` and ``embedding_size`` are filled in
    when the class takes them and ``loss.kwargs`` does not set them. Kwargs
    ``distance``, ``reducer``, ``embedding_regularizer``,
    ``weight_regularizer`` and ``prototype_regularizer`` may be ``{name,
    kwargs}`` specs; a regularizer class that takes ``num_classes`` or
    ``centers_per_class`` gets the unit's number of classes and the loss's
    ``centers_per_class`` (its kwarg, else its default) unless the spec sets
    them (``SoftTripleLoss`` with ``weight_regularizer:
    SparseCentersRegularizer``, MLRC's SoftTriple ``reg_weight`` term).
    ``miner`` is ``None`` or a ``{name, kwargs}`` spec of
    ``pytorch_metric_learning.miners``.

    ``loss.kwargs.prototype_regularizer`` and ``loss.kwargs.prototype_reg_weight``
    (named after PML's ``embedding_regularizer``/``embedding_reg_weight``) are
    not given to the loss class: with either, the finished loss is wrapped in
    :class:`pml_crt.losses.PrototypeRegularizedLoss` on the embedder's CRT
    prototypes (default regularizer: ``PrototypeDiversityRegularizer``, the
    diversity penalty), so the term is part of the trainer's metric loss. It
    needs a ``CRT`` or ``MultiHeadCRT`` embedder.

    With a :class:`MultiHeadCRT` embedder the loss is
    ``MultiHeadLoss(factory, embedder.embedding_sizes, consistency_weight=...,
    consistency=..., miner=..., head_weights=...)``: one loss per head, built
    by the factory for that head's width, and the miner mines each head's
    slice (so there is no trainer ``tuple_miner``).
    """
    loss_config = config["loss"]
    cls = _lookup(loss_config["name"], (losses, pml_crt.losses), "loss")
    kwargs = dict(loss_config.get("kwargs") or {})
    # A regularizer that takes num_classes (or centers_per_class) gets the unit's
    # (the loss's), e.g. SoftTripleLoss's weight_regularizer SparseCentersRegularizer.
    fill = {"num_classes": num_classes}
    centers = _argument(cls, "centers_per_class", kwargs)
    if centers is not None:
        fill["centers_per_class"] = centers
    for key, modules in _OBJECT_KWARGS.items():
        if isinstance(kwargs.get(key), (Mapping, str)):
            filled = fill if key.endswith("_regularizer") else None
            kwargs[key] = _object(kwargs[key], modules, key, filled)
    prototype_kwargs = {key: kwargs.pop(key) for key in _PROTOTYPE_KWARGS if key in kwargs}
    miner = None
    if config.get("miner"):
        miner = _object(config["miner"], (miners,), "miner")

    def make(embedding_size: int) -> torch.nn.Module:
        filled = dict(kwargs)
        if _accepts(cls, "num_classes"):
            filled.setdefault("num_classes", num_classes)
        for size_name in ("embedding_size", "descriptors_dim"):
            if _accepts(cls, size_name):
                filled.setdefault(size_name, embedding_size)
        return cls(**filled)

    if isinstance(embedder, MultiHeadCRT):
        loss = MultiHeadLoss(
            make,
            embedder.embedding_sizes,
            consistency_weight=float(loss_config.get("consistency_weight", 1.0)),
            consistency=loss_config.get("consistency"),
            miner=miner,
            head_weights=loss_config.get("head_weights"),
            collect_stats=True,  # the run's record-keeper logs every head's loss
        )
        return {"metric_loss": _regularize_prototypes(loss, embedder, prototype_kwargs)}, {}
    loss = _regularize_prototypes(make(int(embedder.embedding_size)), embedder, prototype_kwargs)
    return {"metric_loss": loss}, ({"tuple_miner": miner} if miner is not None else {})


def _regularize_prototypes(
    loss: torch.nn.Module, embedder: torch.nn.Module, kwargs: Mapping[str, Any]
) -> torch.nn.Module:
    """``loss``, or ``PrototypeRegularizedLoss(loss, embedder, **kwargs)`` when kwargs are set."""
    if not kwargs:
        return loss
    if not any(isinstance(m, CRT) for m in embedder.modules()):
        raise ConfigError(
            f"loss.kwargs {sorted(kwargs)} regularize CRT prototypes: they need a CRT or "
            f"MultiHeadCRT embedder, not {type(embedder).__name__}"
        )
    try:
        return PrototypeRegularizedLoss(loss, embedder, **kwargs)
    except ValueError as error:
        raise ConfigError(f"loss.kwargs: {error}") from error


def _optimizer(spec: Mapping[str, Any], module: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``spec`` over ``module``'s trainable parameters, in
    :func:`pml_crt.utils.param_groups` (a CRT fusion with ``scale_fusion_step`` at its
    scaled learning rate; ``lr`` defaults to the optimizer's own default)."""
    cls = _lookup(spec["name"], (torch.optim,), "optimizer")
    kwargs = dict(spec.get("kwargs") or {})
    lr = kwargs.get("lr", inspect.signature(cls).parameters["lr"].default)
    return cls(param_groups(module, lr=lr), **kwargs)


def build_optimizers(
    config: Mapping[str, Any],
    models: Mapping[str, torch.nn.Module],
    loss_funcs: Mapping[str, torch.nn.Module],
) -> dict[str, torch.optim.Optimizer]:
    """``{"<key>_optimizer": optimizer}`` for every part with trainable parameters.

    ``optimizers.<key>`` (``trunk``, ``embedder``, ``metric_loss``) or else
    ``optimizers.default``: ``{name: <torch.optim class>, kwargs: {...}}``.
    ``None`` freezes that part (its parameters get ``requires_grad=False``).
    Parameters that are already frozen (frozen trunk blocks, frozen
    BatchNorm) are left out.
    """
    specs = config["optimizers"]
    optimizers = {}
    for key, module in {**models, **loss_funcs}.items():
        if not any(p.requires_grad for p in module.parameters()):
            continue
        spec = specs.get(key, specs.get("default"))
        if spec is None:
            module.requires_grad_(False)
            continue
        optimizers[f"{key}_optimizer"] = _optimizer(spec, module)
    return optimizers


def trunk_is_cacheable(trunk: torch.nn.Module, config: Mapping[str, Any]) -> bool:
    """Whether the frozen first blocks of ``trunk`` can be run once and cached.

    True for a pretrained :class:`FeatureMapTrunk` with ``frozen_blocks > 0``
    and ``cache.features`` on, when the training images are not randomly
    augmented (the frozen blocks then give the same output every epoch) or
    ``cache.train_views`` augmented views of each are cached
    (:func:`caches_frozen_stages`).
    """
    return isinstance(trunk, FeatureMapTrunk) and caches_frozen_stages(config)


def caches_frozen_stages(config: Mapping[str, Any]) -> bool:
    """Whether ``config``'s pretrained trunk has frozen first blocks run once and cached.

    The cache then holds their output for every image of the dataset, test classes
    included (computed once, by frozen ImageNet weights; nothing tuned sees it). With
    random augmentation that needs ``cache.train_views``: the training images' outputs
    are then cached for that many augmented views of each.
    """
    augmented = config["images"].get("augmentation", "none") != "none"
    return (
        config["trunk"]["name"] != "small_convnet"
        and (config["trunk"].get("frozen_blocks") or 0) > 0
        and config["trunk"].get("weights") is not None
        and bool(config["cache"].get("features", True))
        and (not augmented or int(config["cache"].get("train_views") or 0) > 0)
    )
