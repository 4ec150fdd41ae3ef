"""benchmarks.lr_sweep: the swept config, the pivot and an end-to-end run on a tiny slice."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.protocol.config import load_config, method_config
from benchmarks.search import lr_sweep

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_omniglot = pytest.mark.skipif(
    not (DATA / "omniglot-py").is_dir(), reason=f"Omniglot not found under {DATA}"
)

TINY = {
    "name": "tiny_sweep",
    "seeds": [0],
    "folds": [0],
    "device": "cpu",
    "threads": 1,
    "dataset": {"name": "omniglot", "root": str(DATA), "max_classes": 16},
    "images": {"resize": 28, "normalize": "invert"},
    "trunk": {"name": "small_convnet", "kwargs": {"channels": [16, 16, 16], "pool_last": False}},
    "training": {"batch_size": 12, "iterations_per_epoch": 3, "num_epochs": 1, "log_freq": 3},
    "eval": {"batch_size": 64},
    "optimizers": {
        "default": {"name": "Adam", "kwargs": {"lr": 1e-3, "weight_decay": 1e-4}},
        "trunk": {"name": "Adam", "kwargs": {"lr": 1e-4}},
    },
    "methods": {
        "frozen": {"embedder": {"type": "frozen"}},
        "pool": {"embedder": {"type": "GlobalPoolEmbedder", "kwargs": {"embedding_size": 8}}},
        "crt": {"embedder": {"type": "CRT", "kwargs": {"embedding_size": 8, "num_prototypes": 2}}},
    },
}


def test_sweep_config_sets_each_head_lr_and_keeps_the_trunk_optimizer():
    config = load_config(data=TINY)
    swept = lr_sweep.sweep_config(config, ["pool", "crt"], [1e-5, 1e-2])
    assert swept["name"] == "tiny_sweep_lr_sweep" and swept["eval"]["split"] == "val"
    assert list(swept["methods"]) == ["pool_lr1e-05", "pool_lr1e-02", "crt_lr1e-05", "crt_lr1e-02"]
    method = method_config(load_config(data=swept), "crt_lr1e-02")
    assert method["optimizers"]["default"]["kwargs"] == {"lr": 1e-2, "weight_decay": 1e-4}
    assert method["optimizers"]["trunk"] == {"name": "Adam", "kwargs": {"lr": 1e-4}}
    assert method["embedder"]["type"] == "CRT"


def test_sweep_config_without_a_trunk_optimizer_pins_the_trunk_to_the_config_default():
    # A from-scratch trunk trained by the default optimiser keeps the config's rate.
    data = {**TINY, "optimizers": {"default": TINY["optimizers"]["default"]}}
    swept = lr_sweep.sweep_config(load_config(data=data), ["pool"], [1e-2])
    method = method_config(load_config(data=swept), "pool_lr1e-02")
    assert method["optimizers"]["default"]["kwargs"]["lr"] == 1e-2
    assert method["optimizers"]["trunk"]["kwargs"] == {"lr": 1e-3, "weight_decay": 1e-4}


def test_pivot_table_rows_columns_and_best():
    summary = [
        {
            "method": "a_lr1e-04",
            "evaluation": "separate",
            lr_sweep.PRIMARY: {"mean": 0.30, "ci95": 0.01},
        },
        {
            "method": "a_lr1e-03",
            "evaluation": "separate",
            lr_sweep.PRIMARY: {"mean": 0.31, "ci95": None},
        },
        {
            "method": "b_lr1e-04",
            "evaluation": "separate",
            lr_sweep.PRIMARY: {"mean": 0.10, "ci95": 0.02},
        },
        {
            "method": "b_lr1e-03",
            "evaluation": "separate",
            lr_sweep.PRIMARY: {"mean": 0.25, "ci95": 0.02},
        },
    ]
    table = lr_sweep.pivot_table(summary, ["a", "b"], [1e-4, 1e-3])
    lines = table.splitlines()
    assert lines[0] == "| head | 0.0001 | 0.001 | best lr | lrs within 2 points of best |"
    assert lines[2] == "| a | 30.00 ± 1.00 | 31.00 | 0.001 | 0.0001, 0.001 |"
    assert lines[3] == "| b | 10.00 ± 2.00 | 25.00 ± 2.00 | 0.001 | 0.001 |"


@needs_omniglot
def test_sweep_runs_every_head_at_every_lr_and_publishes(tmp_path):
    import yaml

    config_path = tmp_path / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(TINY))
    publish = tmp_path / "pub"
    result = lr_sweep.main(
        [
            "--config",
            str(config_path),
            "--lrs",
            "1e-4",
            "1e-2",
            "--out",
            str(tmp_path / "runs"),
            "--publish",
            str(publish),
            "--no-progress",
        ]
    )
    methods = {entry["method"] for entry in result["summary"]}
    assert methods == {"pool_lr1e-04", "pool_lr1e-02", "crt_lr1e-04", "crt_lr1e-02"}
    pivot = (publish / "tiny_sweep_lr_sweep_by_lr.md").read_text()
    assert "| pool | " in pivot and "| crt | " in pivot and "frozen" not in pivot
    assert (publish / "tiny_sweep_lr_sweep_by_lr.png").stat().st_size > 0
    assert (publish / "tiny_sweep_lr_sweep.md").is_file()
