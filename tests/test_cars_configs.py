"""The Cars196 configs (cars_quick, cars224_tune, cars224_mlrc13): they load, share a protocol, run.

The tiny runs read the real Cars196 classes 1-98 from ``../shared/data/cars196`` (skipped
when absent) with a few classes and small images, so they check the data path (PML's
loader through :func:`pml_crt.datasets.cars196`), the cached augmented views and the
results table, not the numbers.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.protocol import runner as bench
from benchmarks.protocol.build import caches_frozen_stages
from benchmarks.protocol.config import load_config, method_config, method_names

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "benchmarks" / "configs"
SHARED = ROOT.parent / "shared"
CARS = SHARED / "data" / "cars196"
WEIGHTS = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
NAMES = ("cars_quick", "cars224_tune", "cars224_mlrc13")
pytestmark = pytest.mark.filterwarnings(
    "ignore:Converting a tensor with requires_grad=True:UserWarning"  # PML trainer's pbar
)

needs_cars = pytest.mark.skipif(
    not (CARS / "names.csv").is_file() or not WEIGHTS.is_file(),
    reason=f"Cars196 ({CARS}) or the MobileNetV2 weights ({WEIGHTS}) not found (see SPEC)",
)

# MLRC's Cars196 optima (https://kevinmusgrave.github.io/powerful-benchmarker/papers/mlrc/,
# "Optimal hyperparameters", Cars196 column): the start values of cars224_mlrc13.yaml.
MLRC_CARS_OPTIMA = {
    "contrastive": {"pos_margin": 0.2652, "neg_margin": 0.5409},
    "triplet": {"margin": 0.1190},
    "ntxent": {"temperature": 0.0219},
    "proxynca": {"softmax_scale": 7.97, "lr": 4.43e-3},
    "margin": {"margin": 0.0781, "beta": 1.3164, "lr": 1.11e-4},
    "normalized_softmax": {"temperature": 0.0886, "lr": 1.10e-2},
    "cosface": {"margin": 0.4324, "scale": 161.5, "lr": 7.41e-3},
    "arcface": {"margin": 20.52, "scale": 49.50, "lr": 7.39e-6},
    "fastap": {"num_bins": 27},
    "snr": {"pos_margin": 0.1670, "neg_margin": 0.9337, "embedding_reg_weight": 0.0},
    "ms": {"alpha": 14.35, "beta": 75.83, "base": 0.66},
    "ms_miner": {"alpha": 7.49, "beta": 47.99, "base": 0.63, "epsilon": 0.72},
    "softtriple": {
        "la": 17.69,
        "gamma": 19.18,
        "margin": 0.3588,
        "weight_reg_weight": 0.0669,
        "lr": 1.40e-4,
    },
}


@pytest.fixture(scope="module")
def configs():
    return {name: load_config(CONFIGS / f"{name}.yaml") for name in NAMES}


def test_the_cars_configs_read_cars196_under_the_shuffled_mlrc_split(configs):
    for name, config in configs.items():
        assert config["dataset"]["name"] == "cars196", name
        assert config["dataset"]["root"] == "../shared/data/cars196", name
        assert (config["num_folds"], config["folds"]) == (4, [0]), name
        # shuffled before MLRC's split: sorted by name, train+val and test share no make
        assert config["dataset"]["class_order_seed"] == 0, name
        assert config["trunk"]["name"] == "mobilenet_v2" and caches_frozen_stages(config), name
    quick, tune, table = configs["cars_quick"], configs["cars224_tune"], configs["cars224_mlrc13"]
    assert method_names(quick) == ["frozen", "global_avg", "multihead_crt"]
    assert set(method_names(tune)) >= {
        "frozen",
        "global_avg",
        "global_gem",
        "netvlad",
        "crt",
        "multihead_crt",
    }
    # the 13-loss table runs under the tuned comparison's protocol: the same data,
    # augmentation, cached views, trunk, training budget, evaluation and seeds
    for section in ("dataset", "images", "cache", "trunk", "training", "eval", "seeds"):
        assert table[section] == tune[section], section
    assert tune["images"]["augmentation"] == "mlrc" and tune["cache"]["train_views"] > 0
    assert (tune["images"]["crop"], tune["images"]["resize"]) == (224, 256)  # 7x7 maps


def test_cars224_mlrc13_starts_from_mlrcs_cars_optima(configs):
    table = configs["cars224_mlrc13"]
    for prefix, optima in MLRC_CARS_OPTIMA.items():
        for kind in ("linear", "crt"):
            method = method_config(table, f"{prefix}_{kind}")
            values = {**method["loss"]["kwargs"]}
            if method["miner"]:
                values.update(method["miner"].get("kwargs", {}))
            if "metric_loss" in method["optimizers"]:
                values["lr"] = method["optimizers"]["metric_loss"]["kwargs"]["lr"]
            for key, expected in optima.items():
                assert values[key] == pytest.approx(expected), (prefix, kind, key)


def _tiny(name: str, extra: list[str]) -> dict:
    return load_config(
        CONFIGS / f"{name}.yaml",
        [
            f"dataset.root={CARS}",
            f"trunk.weights_path={WEIGHTS}",
            "dataset.max_classes=8",  # 4 train+val classes (3 train, 1 val), 4 test classes
            "seeds=[0]",
            "images.resize=72",
            "images.crop=64",
            "training.iterations_per_epoch=2",
            "training.num_epochs=2",
            "training.batch_size=8",
            "eval.batch_size=32",
            "device=cpu",
            *extra,
        ],
    )


@needs_cars
def test_cars_quick_ends_in_a_table_on_real_cars(tmp_path):
    config = _tiny("cars_quick", [])
    result = bench.run_benchmark(config, tmp_path, log=lambda s: None, progress=False)
    assert result["units_run"] == 3
    rows = {r["method"] for r in result["rows"] if r["evaluation"] == "separate"}
    assert rows == {"frozen", "global_avg", "multihead_crt"}
    table = (tmp_path / "cars_quick" / "table.md").read_text()
    assert "cars196: 8 classes" in table and "| multihead_crt |" in table


@needs_cars
def test_cars224_tune_trains_on_cached_augmented_views_of_real_cars(tmp_path):
    config = _tiny("cars224_tune", ["cache.train_views=2"])
    logs: list[str] = []
    result = bench.run_benchmark(
        config, tmp_path, methods=["global_avg", "crt"], log=logs.append, progress=False
    )
    assert result["units_run"] == 2
    cached = [line for line in logs if "augmented views" in line]
    assert len(cached) == 1 and "2 augmented views of the" in cached[0], logs
