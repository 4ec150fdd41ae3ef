"""OmniglotCharacters: the real background set (when present) and a synthetic tree."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image
from pytorch_metric_learning.samplers import MPerClassSampler

from pml_crt.datasets import OmniglotCharacters, download_omniglot, select_classes
from pml_crt.models import CRT
from pml_crt.trunks import SmallConvNet

DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"
BACKGROUND = DATA_ROOT / "omniglot-py" / "images_background"


@pytest.fixture(scope="module")
def background():
    if not BACKGROUND.is_dir():
        pytest.skip(f"Omniglot background set not found at {BACKGROUND} (see SPEC section 4)")
    return OmniglotCharacters(DATA_ROOT)


def _write_tree(root: Path, layout: dict[str, dict[str, dict[str, int]]]) -> None:
    """``layout[set][alphabet][character] = number of drawings``; 1-bit PNGs like Omniglot's."""
    for set_name, alphabets in layout.items():
        for alphabet, characters in alphabets.items():
            for character, count in characters.items():
                folder = root / "omniglot-py" / set_name / alphabet / character
                folder.mkdir(parents=True)
                for i in range(count):
                    Image.new("1", (105, 105), color=i % 2).save(folder / f"{i:04d}_{i:02d}.png")


@pytest.fixture
def synthetic(tmp_path):
    _write_tree(
        tmp_path,
        {
            "images_background": {
                "Greek": {"character02": 2, "character01": 3},
                "Balinese": {"character01": 2},
            },
            "images_evaluation": {"Atlantean": {"character01": 4}},
        },
    )
    return tmp_path


# --- the real background set -------------------------------------------------------------


def test_background_counts(background):
    assert background.num_classes == len(background.classes) == 964
    assert len(background) == len(background.labels) == len(background.paths) == 19280
    counts = Counter(background.labels)
    assert sorted(counts) == list(range(964))
    assert set(counts.values()) == {20}


def test_background_label_order(background):
    assert background.classes == sorted(background.classes)
    assert background.classes[0] == ("Balinese", "character01")
    assert background.labels == sorted(background.labels)
    assert background.class_indices == list(range(964))
    for index in (0, 123, 19279):
        alphabet, character = background.classes[background.labels[index]]
        path = background.paths[index]
        assert (path.parent.parent.name, path.parent.name) == (alphabet, character)


def test_background_items(background):
    image, label = background[25]
    assert isinstance(image, Image.Image)
    assert image.mode == "L" and image.size == (105, 105)
    assert label == 1 and isinstance(label, int)
    assert set(image.getdata()) <= {0, 255}


def test_class_subsets_are_disjoint_halves(background):
    first = OmniglotCharacters(DATA_ROOT, class_subset=slice(0, 482))
    second = OmniglotCharacters(DATA_ROOT, class_subset=range(482, 964))
    assert len(first) == len(second) == 482 * 20
    assert set(first.classes).isdisjoint(second.classes)
    assert first.classes + second.classes == background.classes
    assert set(first.labels) == set(second.labels) == set(range(482))
    assert second.class_indices[0] == 482
    assert set(map(str, first.paths)).isdisjoint(map(str, second.paths))
    picked = OmniglotCharacters(DATA_ROOT, class_subset=[900, 3, -1])
    assert picked.class_indices == [3, 900, 963]
    assert picked.classes == [background.classes[i] for i in (3, 900, 963)]
    assert Counter(picked.labels) == {0: 20, 1: 20, 2: 20}


def test_works_with_m_per_class_sampler_and_a_trunk(background):
    dataset = OmniglotCharacters(
        DATA_ROOT,
        class_subset=range(40),
        transform=T.Compose([T.Resize(28), T.ToTensor()]),
    )
    sampler = MPerClassSampler(dataset.labels, m=4, batch_size=32, length_before_new_iter=64)
    loader = torch.utils.data.DataLoader(dataset, batch_size=32, sampler=sampler)
    images, labels = next(iter(loader))
    assert images.shape == (32, 1, 28, 28) and images.dtype == torch.float32
    assert Counter(labels.tolist()) == dict.fromkeys(set(labels.tolist()), 4)
    assert len(set(labels.tolist())) == 8
    trunk = SmallConvNet(1, channels=(8, 8, 16), pool_last=False)
    embeddings = CRT(trunk.out_channels, embedding_size=8, num_prototypes=4)(trunk(images))
    assert embeddings.shape == (32, 8)


# --- a synthetic tree (always runs) -------------------------------------------------------


def test_synthetic_tree_order_and_sets(synthetic):
    both = OmniglotCharacters(synthetic, background=True, evaluation=True)
    assert both.classes == [
        ("Balinese", "character01"),
        ("Greek", "character01"),
        ("Greek", "character02"),
        ("Atlantean", "character01"),  # evaluation set after the background set
    ]
    assert both.labels == [0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3]
    assert [p.name for p in both.paths[2:5]] == ["0000_00.png", "0001_01.png", "0002_02.png"]
    image, label = both[10]
    assert image.mode == "L" and label == 3

    evaluation = OmniglotCharacters(synthetic / "omniglot-py", background=False, evaluation=True)
    assert evaluation.classes == [("Atlantean", "character01")] and len(evaluation) == 4


def test_synthetic_transforms_and_subset(synthetic):
    dataset = OmniglotCharacters(
        synthetic,
        transform=T.ToTensor(),
        target_transform=lambda y: y + 100,
        class_subset=[2],
    )
    assert dataset.classes == [("Greek", "character02")]
    image, label = dataset[0]
    assert image.shape == (1, 105, 105) and label == 100


def test_select_classes_validation():
    assert select_classes(5, None) == [0, 1, 2, 3, 4]
    assert select_classes(5, slice(None, None, 2)) == [0, 2, 4]
    assert select_classes(5, torch.tensor([4, 1])) == [1, 4]
    with pytest.raises(ValueError, match="out of range"):
        select_classes(5, [5])
    with pytest.raises(ValueError, match="repeats"):
        select_classes(5, [1, -4])
    with pytest.raises(ValueError, match="selects no class"):
        select_classes(5, slice(3, 3))
    with pytest.raises(TypeError):
        select_classes(5, [1.0])
    with pytest.raises(TypeError):
        select_classes(5, "01")


def test_missing_data_raises_with_download_hint(tmp_path):
    with pytest.raises(FileNotFoundError, match="download_omniglot"):
        OmniglotCharacters(tmp_path / "nowhere")
    _write_tree(tmp_path, {"images_background": {"Greek": {"character01": 1, "character02": 0}}})
    with pytest.raises(FileNotFoundError, match="evaluation=True"):
        OmniglotCharacters(tmp_path, evaluation=True)
    with pytest.raises(FileNotFoundError, match="no .png"):
        OmniglotCharacters(tmp_path)
    assert len(OmniglotCharacters(tmp_path, class_subset=[0])) == 1
    with pytest.raises(ValueError, match="at least one"):
        OmniglotCharacters(tmp_path, background=False)


def test_download_omniglot_calls_torchvision(tmp_path, monkeypatch):
    calls = []

    class FakeOmniglot:
        def __init__(self, root, background=True, download=False):
            calls.append((root, background, download))

    monkeypatch.setattr("torchvision.datasets.Omniglot", FakeOmniglot)
    folder = download_omniglot(tmp_path, background=True, evaluation=True)
    assert folder == tmp_path / "omniglot-py"
    assert calls == [(str(tmp_path), True, True), (str(tmp_path), False, True)]
