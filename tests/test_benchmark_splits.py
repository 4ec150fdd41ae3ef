"""MLRC class splits: fold boundaries, disjointness and coverage."""

import pytest

from benchmarks.protocol.splits import (
    class_order,
    fold_boundaries,
    mlrc_split,
    trainval_test_classes,
)


def test_hand_computed_example():
    # 20 classes: train+val 0..9, test 10..19; chunks start at int(p/4 * 10) = 0, 2, 5, 7.
    assert fold_boundaries(10) == [0, 2, 5, 7, 10]
    expected = {
        0: ([0, 1, 2, 3, 4, 5, 6], [7, 8, 9]),
        1: ([2, 3, 4, 5, 6, 7, 8, 9], [0, 1]),
        2: ([5, 6, 7, 8, 9, 0, 1], [2, 3, 4]),
        3: ([7, 8, 9, 0, 1, 2, 3, 4], [5, 6]),
    }
    for fold, (train, val) in expected.items():
        split = mlrc_split(20, fold)
        assert list(split.train) == train
        assert list(split.val) == val
        assert list(split.test) == list(range(10, 20))
        assert split.train[0] == int(fold / 4 * 10)  # fold p starts at int(p/4 * n)


@pytest.mark.parametrize("num_classes", [8, 9, 10, 17, 33, 100, 196, 200])
@pytest.mark.parametrize("num_folds", [2, 3, 4])
def test_disjoint_and_covering(num_classes, num_folds):
    trainval, test = trainval_test_classes(num_classes)
    assert len(trainval) == num_classes // 2
    assert set(trainval) | set(test) == set(range(num_classes))
    assert not set(trainval) & set(test)
    vals = []
    for fold in range(num_folds):
        split = mlrc_split(num_classes, fold, num_folds)
        train, val = set(split.train), set(split.val)
        assert len(train) == len(split.train) and len(val) == len(split.val)  # no repeats
        assert not train & val
        assert train | val == set(trainval)
        assert not (train | val) & set(split.test)
        assert split.test == test
        # circular: train is a contiguous run of train+val positions starting at the fold start
        n = len(trainval)
        start = int(fold / num_folds * n)
        assert list(split.train) == [(start + i) % n for i in range(len(split.train))]
        assert list(split.val) == [(start + len(split.train) + i) % n for i in range(len(val))]
        vals.extend(split.val)
    # every train+val class is validated on in exactly one fold
    assert sorted(vals) == list(trainval)


def test_mlrc_sizes():
    cub = mlrc_split(200, 0)
    assert (len(cub.train), len(cub.val), len(cub.test)) == (75, 25, 100)
    cars = [mlrc_split(196, p) for p in range(4)]
    assert fold_boundaries(98) == [0, 24, 49, 73, 98]
    assert [len(s.val) for s in cars] == [25, 24, 25, 24]
    sop = mlrc_split(22634, 2)
    assert len(sop.test) == 11317 and len(sop.train) + len(sop.val) == 11317


def test_bad_arguments():
    with pytest.raises(ValueError, match="fold"):
        mlrc_split(20, 4)
    with pytest.raises(ValueError, match="fold"):
        mlrc_split(20, -1)
    with pytest.raises(ValueError, match="num_folds"):
        mlrc_split(20, 0, num_folds=1)
    with pytest.raises(ValueError, match="too few"):
        mlrc_split(6, 0)  # 3 train+val classes cannot make 4 folds
    with pytest.raises(ValueError, match="num_classes"):
        trainval_test_classes(1)


def test_class_order_is_sorted_by_default_and_a_fixed_shuffle_with_a_seed():
    assert class_order(6) == (0, 1, 2, 3, 4, 5)
    assert mlrc_split(20, 1, order_seed=None) == mlrc_split(20, 1)
    # pinned literally: Python's random.Random(0).shuffle, the same on every machine
    assert class_order(10, 0) == (7, 8, 1, 5, 3, 4, 2, 0, 9, 6)
    # the shuffled order is cut exactly as the sorted one is (fold 1 of 10 trainval: 2..9 | 0, 1)
    trainval, test = trainval_test_classes(20, order_seed=5)
    order = class_order(20, 5)
    assert (trainval, test) == (order[:10], order[10:])
    split = mlrc_split(20, 1, order_seed=5)
    assert split.train == tuple(order[i] for i in range(2, 10))
    assert split.val == (order[0], order[1]) and split.test == order[10:]


@pytest.mark.parametrize("num_classes", [8, 17, 98])
@pytest.mark.parametrize("order_seed", [0, 1, 7])
def test_shuffled_splits_are_disjoint_and_covering(num_classes, order_seed):
    trainval, test = trainval_test_classes(num_classes, order_seed)
    assert sorted(trainval + test) == list(range(num_classes))
    assert trainval != tuple(range(num_classes // 2))  # these seeds all move some class
    vals = []
    for fold in range(4):
        split = mlrc_split(num_classes, fold, 4, order_seed)
        assert not set(split.train) & set(split.val)
        assert set(split.train) | set(split.val) == set(trainval)
        assert split.test == test
        vals.extend(split.val)
    assert sorted(vals) == sorted(trainval)


def test_bad_order_seed():
    for bad in (1.5, "0", True):
        with pytest.raises(ValueError, match=r"order_seed \(dataset.class_order_seed\)"):
            mlrc_split(20, 0, order_seed=bad)
