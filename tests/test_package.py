"""Packaging: version, flat subpackages and their public names."""

import importlib
import importlib.metadata

import pytest

import pml_crt


def test_version_matches_installed_metadata():
    assert pml_crt.__version__ == importlib.metadata.version("pml-crt")


@pytest.mark.parametrize(
    "subpackage,names",
    [
        ("models", {"CRT", "MultiHeadCRT", "GlobalPoolEmbedder", "NetVLAD"}),
        ("losses", {"MultiHeadLoss", "SimilarityConsistencyLoss"}),
        ("regularizers", {"SimilarityConsistencyRegularizer"}),
        ("trunks", {"feature_map_trunk", "FeatureMapTrunk", "SmallConvNet"}),
        ("datasets", {"OmniglotCharacters", "cub", "download_omniglot"}),
        ("utils", {"make_accuracy_calculator", "AnalysisAccuracyCalculator"}),
    ],
)
def test_flat_subpackages_export_their_public_names(subpackage, names):
    module = importlib.import_module(f"pml_crt.{subpackage}")
    assert names <= set(module.__all__)
    for name in module.__all__:
        assert getattr(module, name) is not None
