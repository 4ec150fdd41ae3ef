"""Helpers shared across pml-crt."""

from . import validation
from .accuracy import faiss_available, make_accuracy_calculator, make_knn_func

__all__ = ["faiss_available", "make_accuracy_calculator", "make_knn_func", "validation"]
