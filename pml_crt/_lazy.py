"""Lazy re-exports for pml-crt's packages (PEP 562).

A package's public names are resolved on first access, so ``from pml_crt.models
import CRT`` imports neither torchvision's datasets nor faiss, which only the
packages that use them (``pml_crt.datasets``, ``pml_crt.trunks``,
``pml_crt.utils.make_accuracy_calculator``) pull in.
"""

from __future__ import annotations

import importlib
import sys
import types
from collections.abc import Iterable, Mapping
from typing import Any


class _LazyPackage(types.ModuleType):
    """A package whose public names are imported from its submodules on first access."""

    _lazy_submodules: frozenset[str]
    _lazy_owners: dict[str, str]

    def __getattr__(self, name: str) -> Any:
        if name in self._lazy_submodules:
            return importlib.import_module(f"{self.__name__}.{name}")
        if name not in self._lazy_owners:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        owner = importlib.import_module(f"{self.__name__}.{self._lazy_owners[name]}")
        return getattr(owner, name)  # the import bound it here (see __setattr__)

    def __setattr__(self, name: str, value: Any) -> None:
        # Python's import binds every loaded submodule in its package; where the
        # submodule shares its name with the function it exports (``datasets.cub``,
        # ``trunks.feature_map_trunk``), the public name keeps the function.
        if isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}":
            for public_name, owner_name in self._lazy_owners.items():
                if owner_name == name:
                    super().__setattr__(public_name, getattr(value, public_name))
            if name in self._lazy_owners:
                return
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | self._lazy_submodules | self._lazy_owners.keys())


def lazy_package(
    package: str,
    submodules: Iterable[str] = (),
    attributes: Mapping[str, str] | None = None,
) -> None:
    """Make ``package`` resolve its public names on first access.

    Call it at the end of the package's ``__init__``.

    Args:
        package: the package's ``__name__``.
        submodules: names of submodules exposed as attributes (``pml_crt.models``).
        attributes: public name -> name of the submodule that defines it.
    """
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    object.__setattr__(module, "_lazy_submodules", frozenset(submodules))
    object.__setattr__(module, "_lazy_owners", dict(attributes or {}))
