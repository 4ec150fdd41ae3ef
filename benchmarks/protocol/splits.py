"""MLRC class splits (Musgrave, Belongie, Lim, ECCV 2020), on class positions.

Classes are sorted (by id or name) and referred to by their position
``0 .. num_classes - 1`` in that order. The first half trains and validates,
the second half is the test set. The train+val half is cut into
``num_folds`` chunks at ``int(j / num_folds * n)`` (``j = 0 .. num_folds``);
fold ``p`` starts at chunk ``p``, trains on the next ``num_folds - 1`` chunks
(wrapping around) and validates on the chunk after them. With the default 4
folds this is "fold p starts at int(p/4 * n), trains on the next 3/4 of the
classes (circular), validates on the following 1/4". Every train+val class
is validated on in exactly one fold.

``order_seed`` (the config's ``dataset.class_order_seed``) departs from MLRC on purpose:
the classes are first put in a fixed shuffled order (Python's
``random.Random(order_seed).shuffle``), then cut as above. Sorted by name, a subset of
a dataset can put whole groups of related classes (Cars196's makes) on one side of the
cut; shuffled, every side draws from all of them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

__all__ = ["FoldSplit", "class_order", "fold_boundaries", "mlrc_split", "trainval_test_classes"]


@dataclass(frozen=True)
class FoldSplit:
    """The class positions of one MLRC fold.

    Attributes:
        fold: the fold index ``p``.
        num_folds: how many folds the train+val half is cut into.
        train: training classes, in circular order starting at the fold's start.
        val: validation classes (disjoint from ``train``).
        test: test classes, the second half (the same for every fold).
    """

    fold: int
    num_folds: int
    train: tuple[int, ...]
    val: tuple[int, ...]
    test: tuple[int, ...]


def class_order(num_classes: int, order_seed: int | None = None) -> tuple[int, ...]:
    """The class positions in the order the split cuts them.

    ``None``: sorted, ``0 .. num_classes - 1`` (MLRC). An int: the sorted positions
    shuffled by ``random.Random(order_seed)`` (the same order on every machine and
    Python 3 version).
    """
    if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 2:
        raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
    order = list(range(num_classes))
    if order_seed is None:
        return tuple(order)
    if not isinstance(order_seed, int) or isinstance(order_seed, bool):
        raise ValueError(
            f"order_seed (dataset.class_order_seed) must be an int or None, got {order_seed!r}"
        )
    random.Random(order_seed).shuffle(order)
    return tuple(order)


def trainval_test_classes(
    num_classes: int, order_seed: int | None = None
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The first half of the ordered classes (train+val) and the second half (test).

    With an odd count the test half gets the extra class (``n // 2`` train+val). The
    order is :func:`class_order`'s: sorted unless ``order_seed`` is given.
    """
    order = class_order(num_classes, order_seed)
    half = num_classes // 2
    return order[:half], order[half:]


def fold_boundaries(num_trainval: int, num_folds: int = 4) -> list[int]:
    """Chunk starts ``int(j / num_folds * n)`` for ``j = 0 .. num_folds`` (last = ``n``)."""
    return [int(j / num_folds * num_trainval) for j in range(num_folds + 1)]


def mlrc_split(
    num_classes: int, fold: int, num_folds: int = 4, order_seed: int | None = None
) -> FoldSplit:
    """The train, val and test classes of MLRC fold ``fold``.

    Args:
        num_classes: how many (sorted) classes the dataset has in all.
        fold: ``0 .. num_folds - 1``.
        num_folds: chunks of the train+val half (MLRC: 4).
        order_seed: ``None`` cuts the sorted classes (MLRC); an int cuts them in
            :func:`class_order`'s shuffled order.

    Returns:
        A :class:`FoldSplit` of class positions.

    Example: 20 classes give train+val ``0..9`` and test ``10..19``; the chunks
    of the train+val half start at ``[0, 2, 5, 7]``, so fold 1 trains on
    ``2..9`` and validates on ``0, 1``.
    """
    if not isinstance(num_folds, int) or isinstance(num_folds, bool) or num_folds < 2:
        raise ValueError(f"num_folds must be an int >= 2, got {num_folds!r}")
    if not isinstance(fold, int) or isinstance(fold, bool) or not 0 <= fold < num_folds:
        raise ValueError(f"fold must be an int in [0, {num_folds}), got {fold!r}")
    trainval, test = trainval_test_classes(num_classes, order_seed)
    n = len(trainval)
    bounds = fold_boundaries(n, num_folds)
    chunks = [trainval[bounds[j] : bounds[j + 1]] for j in range(num_folds)]
    if any(len(chunk) == 0 for chunk in chunks):
        raise ValueError(
            f"{num_classes} classes give {n} train+val classes, too few for {num_folds} "
            "non-empty folds"
        )
    train = tuple(c for j in range(num_folds - 1) for c in chunks[(fold + j) % num_folds])
    val = chunks[(fold + num_folds - 1) % num_folds]
    return FoldSplit(fold=fold, num_folds=num_folds, train=train, val=tuple(val), test=test)
