"""pml_crt.datasets.cars196: PML's Cars196 with RGB images, 0-based labels and class subsets."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torchvision.transforms as T
from pytorch_metric_learning.datasets import Cars196

from pml_crt.datasets import cars196, cub

CARS_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data" / "cars196"


@pytest.fixture(scope="module")
def root():
    if not (CARS_ROOT / "names.csv").is_file():
        pytest.skip(f"cars196 not found at {CARS_ROOT} (see SPEC section 4)")
    return CARS_ROOT


def test_train_split_is_relabelled_from_zero(root):
    train = cars196(root)
    assert isinstance(train, Cars196)
    assert len(train) == 4052  # classes 1-98 of the official train half
    assert sorted(set(train.labels)) == list(range(98)) and train.class_ids == list(range(1, 99))
    raw = Cars196(root=str(root), split="train")
    assert [train.class_ids[y] for y in train.labels] == raw.labels
    image, label = train[0]
    assert image.mode == "RGB" and label == train.labels[0]


def test_mlrc_halves_and_folds(root):
    # MLRC on the 98 classes here: the first 49 train+validation, the last 49 test.
    trainval = cars196(root, class_subset=slice(0, 49))
    test = cars196(root, class_subset=slice(49, 98), relabel=False)
    assert trainval.class_ids == list(range(1, 50)) and min(test.labels) == 50
    folds = [cars196(root, class_subset=range(i, 49, 4)) for i in range(4)]
    assert sum(len(f) for f in folds) == len(trainval)
    assert all(set(Counter(f.labels)) == set(range(len(f.class_ids))) for f in folds)
    small = cars196(root, transform=T.Compose([T.Resize((24, 32)), T.ToTensor()]))
    assert small[0][0].shape == (3, 24, 32)


@pytest.mark.parametrize("loader,names", [(cars196, "names.csv"), (cub, "CUB_200_2011")])
def test_a_missing_folder_is_one_clear_error(loader, names, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"root='{tmp_path}' does not hold {names}"):
        loader(tmp_path)
    with pytest.raises(FileNotFoundError, match="download=True"):
        loader(tmp_path / "absent")
