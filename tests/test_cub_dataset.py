"""pml_crt.datasets.cub: PML's CUB with RGB images, 0-based labels and class subsets."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torchvision.transforms as T
from PIL import Image
from pytorch_metric_learning.datasets import CUB

from pml_crt.datasets import ToRGB, cub

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"


@pytest.fixture(scope="module")
def data_root():
    if not (DATA_ROOT / "CUB_200_2011" / "images.txt").is_file():
        pytest.skip(f"CUB_200_2011 not found under {DATA_ROOT} (see SPEC section 4)")
    return DATA_ROOT


def test_to_rgb():
    image = ToRGB()(Image.new("L", (5, 4), 7))
    assert image.mode == "RGB" and image.size == (5, 4) and image.getpixel((0, 0)) == (7, 7, 7)
    rgb = Image.new("RGB", (2, 2))
    assert ToRGB()(rgb) is rgb


def test_splits_are_relabelled_from_zero(data_root):
    train, test = cub(data_root, "train"), cub(data_root, "test")
    assert isinstance(train, CUB)
    assert (len(train), len(test)) == (3428, 2474)  # the local 100-species subset
    assert sorted(set(train.labels)) == list(range(58))
    assert sorted(set(test.labels)) == list(range(42))
    assert all(1 <= i <= 100 for i in train.class_ids)
    assert all(101 <= i <= 200 for i in test.class_ids)
    raw = CUB(root=str(data_root), split="test")
    assert [test.class_ids[y] for y in test.labels] == raw.labels
    image, label = test[0]
    assert image.mode == "RGB" and label == 0


def test_transform_subset_and_raw_labels(data_root):
    subset = cub(
        data_root,
        "test",
        transform=T.Compose([T.Resize(32), T.CenterCrop(32), T.ToTensor()]),
        class_subset=slice(0, 5),
        relabel=False,
    )
    assert subset.class_ids == sorted(set(subset.labels)) and len(subset.class_ids) == 5
    assert min(subset.labels) >= 101
    image, _ = subset[len(subset) - 1]
    assert image.shape == (3, 32, 32)
    folds = [cub(data_root, "train", class_subset=range(i, 58, 4)) for i in range(4)]
    assert sum(len(f) for f in folds) == 3428
    assert all(set(Counter(f.labels)) == set(range(len(f.class_ids))) for f in folds)
