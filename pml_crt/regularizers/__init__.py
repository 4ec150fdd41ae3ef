"""Embedding regularizers for multi-head CRT embedders."""

__all__: list[str] = []
