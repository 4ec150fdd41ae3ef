"""Helpers shared across pml-crt."""

from . import validation

__all__ = ["validation"]
