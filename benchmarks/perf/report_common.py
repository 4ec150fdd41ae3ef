"""What every section of ``perf.md`` shares: number formats and the targets."""

from __future__ import annotations

__all__ = ["FLOP_TARGET", "NETVLAD_TARGET", "MiB", "mib", "ms", "point_label", "ratio"]

MiB = 2**20
FLOP_TARGET = 0.5
NETVLAD_TARGET = 1.5


def ms(seconds: float) -> str:
    return f"{1000 * seconds:.1f}"


def mib(nbytes: float) -> str:
    return f"{nbytes / MiB:.1f}"


def ratio(x: float) -> str:
    return f"{x:.2f}"


def point_label(entry: dict) -> str:
    p = entry["point"]
    return f"B={p['B']}, N={p['side']}x{p['side']}, C={p['C']}, K={p['K']}, D={p['D']}"
