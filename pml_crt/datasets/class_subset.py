"""Choosing a class-disjoint subset of a dataset's sorted classes."""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["select_classes"]

ClassSubset = slice | range | Iterable[int] | None


def select_classes(num_classes: int, class_subset: ClassSubset) -> list[int]:
    """Resolve ``class_subset`` into sorted, distinct indices in ``[0, num_classes)``.

    Args:
        num_classes: how many classes the full dataset has.
        class_subset: ``None`` (all classes), a ``slice`` (Python semantics,
            e.g. ``slice(0, 482)`` for the first half), a ``range``, or an
            iterable of int indices (negative indices count from the end).

    Returns:
        The selected class indices in increasing order. Datasets label the
        selected classes ``0 .. len(result) - 1`` in this order.

    Raises:
        ValueError: an index out of range, a repeated index, or an empty selection.
        TypeError: a non-int index.
    """
    if class_subset is None:
        return list(range(num_classes))
    if isinstance(class_subset, slice):
        indices = list(range(num_classes)[class_subset])
    else:
        if isinstance(class_subset, str | bytes):
            raise TypeError("class_subset must be a slice, a range or an iterable of ints")
        indices = []
        for index in class_subset:
            if not isinstance(index, int) or isinstance(index, bool):
                # numpy integers and 0-d tensors support __index__
                try:
                    index = index.__index__()  # type: ignore[union-attr]
                except AttributeError:
                    raise TypeError(
                        f"class_subset indices must be ints, got {type(index).__name__}"
                    ) from None
            if not -num_classes <= index < num_classes:
                raise ValueError(f"class index {index} out of range for {num_classes} classes")
            indices.append(index % num_classes)
        if len(set(indices)) != len(indices):
            raise ValueError("class_subset repeats a class index")
    if not indices:
        raise ValueError(f"class_subset {class_subset!r} selects no class of {num_classes}")
    return sorted(indices)
