"""Metric losses for multi-head CRT embedders."""

__all__: list[str] = []
