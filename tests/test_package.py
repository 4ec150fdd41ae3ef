"""Packaging: version, flat subpackages, their public names and what importing them costs."""

import ast
import importlib
import importlib.metadata
import subprocess
import sys
from pathlib import Path

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


def _fresh_interpreter(code: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert completed.returncode == 0, completed.stderr[-2000:]
    return completed.stdout


def test_models_and_losses_import_without_torchvision_faiss_or_yaml():
    printed = _fresh_interpreter(
        "import sys\n"
        "from pml_crt.models import CRT, MultiHeadCRT\n"
        "from pml_crt.losses import MultiHeadLoss\n"
        "from pml_crt.regularizers import SimilarityConsistencyRegularizer\n"
        "from pml_crt.trunks import SmallConvNet\n"
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torchvision', 'faiss', 'yaml'}))"
    )
    assert printed.strip() == "[]"


def test_lazy_names_resolve_to_the_same_objects_in_any_import_order():
    # ``cub`` and ``feature_map_trunk`` are both a submodule and the function it
    # exports: importing the submodule first must not shadow the function.
    printed = _fresh_interpreter(
        "from pml_crt.datasets.cub import ToRGB\n"
        "from pml_crt.trunks.feature_map_trunk import FeatureMapTrunk\n"
        "import pml_crt\n"
        "from pml_crt import datasets, trunks\n"
        "print(type(datasets.cub).__name__, type(trunks.feature_map_trunk).__name__,"
        " datasets.ToRGB is ToRGB, trunks.FeatureMapTrunk is FeatureMapTrunk)"
    )
    assert printed.split() == ["function", "function", "True", "True"]


def test_dir_lists_every_public_name_before_it_is_imported():
    # In a fresh interpreter nothing has been resolved yet, so only __dir__ can list them.
    printed = _fresh_interpreter(
        "import importlib\n"
        "for name in ('pml_crt', 'pml_crt.datasets', 'pml_crt.trunks', 'pml_crt.utils'):\n"
        "    module = importlib.import_module(name)\n"
        "    print(name, sorted(set(module.__all__) - set(dir(module))))"
    )
    assert printed.splitlines() == [
        f"{name} []" for name in ("pml_crt", "pml_crt.datasets", "pml_crt.trunks", "pml_crt.utils")
    ]


def test_unknown_names_raise_attribute_error():
    assert not hasattr(pml_crt, "no_such_name")
    with pytest.raises(AttributeError, match="no_such_name"):
        pml_crt.utils.no_such_name  # noqa: B018
    assert {"models", "utils"} <= set(dir(pml_crt))


def test_moved_modules_keep_their_old_import_paths():
    # pml_crt.utils.consistency (public, documented before) is a deprecated alias of
    # pml_crt.consistency. No logic is copied: every old name is the very same object.
    printed = _fresh_interpreter(
        "import warnings\n"
        "import pml_crt.consistency as new\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import pml_crt.utils.consistency as old\n"
        "print([str(w.message) for w in caught if w.category is DeprecationWarning])\n"
        "print(all(getattr(old, n) is getattr(new, n) for n in old.__all__),"
        " set(old.__all__) == set(new.__all__))\n"
    )
    warned, same = printed.strip().splitlines()
    assert warned == (
        "['pml_crt.utils.consistency is deprecated: import from pml_crt.consistency']"
    )
    assert same.split() == ["True"] * 2


def _imports(module: str, path: Path, is_package: bool, modules: set[str]) -> set[str]:
    """The pml_crt modules that ``module`` imports anywhere (functions included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = module.split(".")[: None if is_package else -1]
                parts = parts[: len(parts) - (node.level - 1)]
                base = ".".join(parts + ([base] if base else []))
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                found.add(submodule if submodule in modules else base)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return (found & modules) - {module}


def test_no_import_cycle_between_modules():
    root = Path(pml_crt.__file__).resolve().parent
    files = {}
    for path in root.rglob("*.py"):
        parts = ["pml_crt", *path.relative_to(root).with_suffix("").parts]
        is_package = parts[-1] == "__init__"
        files[".".join(parts[:-1] if is_package else parts)] = (path, is_package)
    graph = {m: _imports(m, p, pkg, set(files)) for m, (p, pkg) in files.items()}
    done: set[str] = set()

    def visit(module: str, path: list[str]) -> None:
        if module in path:
            cycle = path[path.index(module) :] + [module]
            raise AssertionError("import cycle: " + " -> ".join(cycle))
        if module not in done:
            for imported in sorted(graph[module]):
                visit(imported, [*path, module])
            done.add(module)

    for module in sorted(graph):
        visit(module, [])
    assert "pml_crt.utils.validation" in graph["pml_crt.utils.layout"]


def test_losses_import_the_consistency_term_without_the_deprecated_alias():
    printed = _fresh_interpreter(
        "import sys, warnings\n"
        "warnings.simplefilter('error', DeprecationWarning)\n"
        "from pml_crt.losses import MultiHeadLoss, SimilarityConsistencyLoss\n"
        "from pml_crt.regularizers import SimilarityConsistencyRegularizer\n"
        "from pml_crt.models import CRT, MultiHeadCRT\n"
        "print('pml_crt.utils.consistency' in sys.modules, 'pml_crt.consistency' in sys.modules)"
    )
    assert printed.split() == ["False", "True"]
