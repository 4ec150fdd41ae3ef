"""Markdown tables as every report writes them: a header row, a ``---`` rule, one line per row."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

__all__ = ["markdown_table"]


def markdown_table(headers: Sequence[object], rows: Iterable[Sequence[object]]) -> str:
    """``| a | b |`` lines: ``headers``, the rule, then each row (cells through ``str``).

    No newline after the last row, so that a report joins it with its other lines.
    """
    lines = ["| " + " | ".join(str(c) for c in headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
