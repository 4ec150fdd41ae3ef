"""benchmarks.mlrc_table: MLRC's layout, the paired column, the budget and the one command.

The table's numbers are checked against plain loops over synthetic per-seed rows
(mean, sample standard deviation, Student t); MLRC's published numbers against
``../shared/SPEC.md`` (section 3) where it exists; and the command end to end on a tiny
Omniglot slice (16 characters, a small convnet, 2 trials per method, 2 seeds), run twice:
the second invocation trains nothing new and adds its wall time to the first's.
Every process pins one thread.
"""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.protocol.config import ConfigError, load_config
from benchmarks.reports import mlrc_report
from benchmarks.reports.mlrc_report import MethodBudget, loss_rows
from benchmarks.search import mlrc_table

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
SPEC = ROOT.parent / "shared" / "SPEC.md"
T_975 = {1: 12.706, 2: 4.303, 3: 3.182}
MAP_R = "mean_average_precision_at_r"


def _mean_ci(values: list[float]) -> tuple[float, float]:
    n = len(values)
    mean = 0.0
    for v in values:
        mean += v / n
    squares = 0.0
    for v in values:
        squares += (v - mean) ** 2
    return mean, T_975[n - 1] * math.sqrt(squares / (n - 1) / n)


# --------------------------------------------------------------------------- rows


def test_rows_follow_mlrc_order_with_pretrained_first_and_others_last():
    methods = ["zeta_crt", "ms_linear", "frozen", "contrastive_crt", "contrastive_linear"]
    methods += ["ms_miner_linear", "ms_miner_crt", "ms_crt"]
    rows = loss_rows(methods)
    assert [r.label for r in rows] == ["Pretrained", "Contrastive", "MS", "MS+Miner", "zeta"]
    assert rows[0] == ("Pretrained", "frozen", None)
    assert rows[3] == ("MS+Miner", "ms_miner_linear", "ms_miner_crt")
    assert rows[4] == ("zeta", None, "zeta_crt")


def test_a_method_outside_the_naming_scheme_is_an_error():
    with pytest.raises(ConfigError, match=r"\['global_avg'\] are neither 'frozen'"):
        loss_rows(["frozen", "global_avg", "ms_linear"])


def test_every_shipped_mlrc13_config_has_all_13_losses_in_pairs():
    for name in ("omniglot7x7_mlrc13", "cub224_mlrc13"):
        config = load_config(str(ROOT / "benchmarks" / "configs" / f"{name}.yaml"))
        rows = loss_rows(list(config["methods"]))
        assert [r.label for r in rows] == ["Pretrained", *mlrc_report.MLRC_LOSSES.values()]
        assert all(r.linear and r.crt for r in rows[1:])


# --------------------------------------------------------------------------- values

# Per seed: P@1, R-Precision, MAP@R for three methods.
VALUES = {
    "frozen": {0: (0.40, 0.20, 0.10), 1: (0.40, 0.20, 0.10), 2: (0.40, 0.20, 0.10)},
    "ms_linear": {0: (0.70, 0.41, 0.30), 1: (0.66, 0.38, 0.28), 2: (0.72, 0.44, 0.33)},
    "ms_crt": {0: (0.74, 0.43, 0.33), 1: (0.69, 0.40, 0.29), 2: (0.71, 0.45, 0.37)},
}


def _rows(evaluations=("separate",)) -> list[dict]:
    rows = []
    for method, seeds in VALUES.items():
        for seed, (p1, rp, mapr) in seeds.items():
            for evaluation in ("fold", *evaluations):
                shift = 0.01 if evaluation == "concatenated" else 0.0
                rows.append(
                    {
                        "method": method,
                        "evaluation": evaluation,
                        "seed": seed,
                        "fold": 0 if evaluation == "fold" else "",
                        "precision_at_1": p1 + shift,
                        "r_precision": rp + shift,
                        MAP_R: mapr + shift,
                    }
                )
    return rows


def _cells(table: str, label: str, embedder: str) -> list[str]:
    """The cells of the table line whose first two cells are ``label`` and ``embedder``."""
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip("|").split("|")]
        if cells[:2] == [label, embedder]:
            return cells
    raise AssertionError(f"no row {label!r} / {embedder!r} in\n{table}")


BUDGETS = {
    "frozen": MethodBudget(0, 0, 0.0, 0.5),
    "ms_linear": MethodBudget(2, 1, 3.25, 4.0),
    "ms_crt": MethodBudget(1, 2, 5.5, 6.0),
}


def test_metric_cells_and_paired_difference_match_plain_loops():
    table = mlrc_report.evaluation_table(_rows(), loss_rows(list(VALUES)), BUDGETS, "separate")
    linear, crt = _cells(table, "MS", "linear"), _cells(table, "", "MultiHeadCRT")
    for column, index in ((2, 0), (3, 1), (4, 2)):
        for cells, method in ((linear, "ms_linear"), (crt, "ms_crt")):
            mean, half = _mean_ci([VALUES[method][s][index] for s in range(3)])
            assert cells[column] == f"{100 * mean:.2f} ± {100 * half:.2f}"
    diffs = [VALUES["ms_crt"][s][2] - VALUES["ms_linear"][s][2] for s in range(3)]
    mean, half = _mean_ci(diffs)
    assert crt[5] == f"{100 * mean:+.2f} ± {100 * half:.2f}"
    assert crt[6] == ("better" if mean - half > 0 else "no difference")
    summary = mlrc_report.verdict_summary(_rows(), loss_rows(list(VALUES)), "separate")
    assert f"): {crt[6]} for MS." in summary
    assert linear[5:7] == ["", ""]
    assert linear[7:] == ["2 + 1", "3.2 min", "4.0 min"]
    assert crt[7:] == ["1 + 2", "5.5 min", "6.0 min"]
    pretrained = _cells(table, "Pretrained", "untrained trunk + average pooling")
    assert pretrained[2:5] == ["40.00 ± 0.00", "20.00 ± 0.00", "10.00 ± 0.00"]


def test_a_clear_difference_gets_a_verdict():
    rows = _rows()
    for row in rows:
        if row["method"] == "ms_crt":
            linear = VALUES["ms_linear"][row["seed"]][2]
            row[MAP_R] = linear - 0.05 + 0.001 * row["seed"]  # 4.8 to 5 points below
    table = mlrc_report.evaluation_table(rows, loss_rows(list(VALUES)), BUDGETS, "separate")
    assert _cells(table, "", "MultiHeadCRT")[6] == "worse"
    summary = mlrc_report.verdict_summary(rows, loss_rows(list(VALUES)), "separate")
    assert summary.endswith(
        "paired MAP@R against the linear embedder of the same loss): worse for MS."
    )


def test_report_has_one_table_per_evaluation_and_states_the_budget():
    config = load_config(
        data={
            "name": "tiny",
            "seeds": [0, 1, 2],
            "tune": {"trials": 3},
            "methods": {method: {} for method in VALUES},
        }
    )
    wall = {"tune_min": 1.0, "final_min": 2.0, "total_min": 3.0, "invocations": 2}
    text = mlrc_report.mlrc_markdown(
        config, _rows(("separate", "concatenated")), BUDGETS, wall, "CMD", "tiny_tuned"
    )
    assert "## Test classes, separate (mean of fold models)" in text
    assert "## Test classes, concatenated folds" in text
    assert "Budget, the same for every method: 3 trials" in text
    assert "Measured wall time: 3.0 min over 2 invocation(s)" in text
    assert "Produced by `CMD`" in text
    concatenated = text.split("## Test classes, concatenated folds")[1]
    mean, half = _mean_ci([VALUES["ms_linear"][s][2] + 0.01 for s in range(3)])
    assert _cells(concatenated, "MS", "linear")[4] == f"{100 * mean:.2f} ± {100 * half:.2f}"


def test_report_words_follow_the_config():
    wall = {"tune_min": 1.0, "final_min": 2.0, "total_min": 3.0, "invocations": 1}
    methods = {method: {} for method in VALUES}

    def report(data):
        config = load_config(data={"name": "tiny", "methods": methods, **data})
        return mlrc_report.mlrc_markdown(config, _rows(("separate",)), BUDGETS, wall, "C", "t")

    default = report({})
    assert "median pruning; the test classes never embedded)" in default
    unpruned = report({"tune": {"pruner": {"name": "none"}}})
    assert "no pruning" in unpruned and "median" not in unpruned
    cub_like = {
        "images": {"resize": 224, "augmentation": "none"},
        "trunk": {"name": "mobilenet_v2", "weights": "IMAGENET1K_V1", "frozen_blocks": 5},
    }
    cached = report(cub_like)
    assert "never embedded" not in cached
    assert "pass only once through the trunk's frozen, cached ImageNet stages" in cached


# --------------------------------------------------------------------------- MLRC's numbers


@pytest.mark.skipif(not SPEC.exists(), reason=f"{SPEC} not found")
def test_published_numbers_are_the_specs():
    text = SPEC.read_text()
    names = {"N.Softmax": "N. Softmax"}
    for dataset in mlrc_report.MLRC_PUBLISHED:
        line = re.search(rf"{dataset}, 512-dim: (.*?)(\.|$)\s", text).group(1)
        parsed = {}
        for m in re.finditer(r"([\w. +]+?) ([\d.]+)/([\d.]+)/([\d.]+)", line):
            name = m.group(1).strip()
            parsed[names.get(name, name)] = tuple(float(v) for v in m.group(2, 3, 4))
        assert parsed == mlrc_report.MLRC_PUBLISHED[dataset]


def test_published_block_names_why_it_is_not_comparable():
    config = load_config(data={"name": "tiny", "tune": {"trials": 3}})
    block = mlrc_report.published_block(config)
    assert "not comparable" in block and "227 px" in block
    assert "3 trials per method" in block
    table_lines = [line for line in block.splitlines() if line.startswith("| ")]
    assert len(table_lines) == 1 + len(mlrc_report.MLRC_PUBLISHED["CUB200"])


def test_the_wall_clock_is_on_disk_while_a_stage_runs_and_adds_up_across_invocations(tmp_path):
    path = tmp_path / "wall.json"
    clock = mlrc_table.WallClock(path, every_s=0.05)
    with clock.stage("final"):
        deadline = time.monotonic() + 10.0
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        # a kill -9 now would keep this record: the stage's time so far
        written = json.loads(path.read_text())
        assert len(written) == 1 and written[0]["final"] > 0
    after = json.loads(path.read_text())[0]["final"]
    assert after >= written[0]["final"]
    later = mlrc_table.WallClock(path)
    with later.stage("tune"):
        pass
    assert later.totals()["invocations"] == 2
    assert later.totals()["final_min"] == pytest.approx(after)


# --------------------------------------------------------------------------- the command

needs_omniglot = pytest.mark.skipif(
    not (DATA / "omniglot-py" / "images_background").is_dir(),
    reason=f"Omniglot not found under {DATA} (see SPEC section 4)",
)

TINY = {
    "name": "tiny_mlrc",
    "seeds": [0, 1],
    "folds": [0],
    "device": "cpu",
    "threads": 1,
    "dataset": {"name": "omniglot", "root": str(DATA), "max_classes": 16},
    "images": {"resize": 28, "normalize": "invert"},
    "trunk": {"name": "small_convnet", "kwargs": {"channels": [8, 8, 8], "pool_last": False}},
    "miner": None,
    "training": {
        "batch_size": 12,
        "iterations_per_epoch": 4,
        "num_epochs": 2,
        "patience": None,
        "log_freq": 4,
        "num_workers": 0,
    },
    "eval": {"batch_size": 64},
    "search_space": {
        "optimizers.default.kwargs.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True}
    },
    "tune": {"trials": 2},
    "methods": {
        "frozen": {"embedder": {"type": "frozen"}, "search_space": None},
        "triplet_linear": {
            "embedder": {"type": "GlobalPoolEmbedder", "kwargs": {"embedding_size": 16}},
            "loss": {"name": "TripletMarginLoss", "kwargs": {"margin": 0.1}},
        },
        "triplet_crt": {
            "embedder": {"type": "MultiHeadCRT", "kwargs": {"heads": [[4, 16], [2, 8]]}},
            "loss": {"name": "TripletMarginLoss", "kwargs": {"margin": 0.1}},
        },
    },
}


@needs_omniglot
def test_one_command_tunes_runs_and_tables_and_a_rerun_trains_nothing(tmp_path, capsys):
    config = tmp_path / "tiny_mlrc.yaml"
    config.write_text(yaml.safe_dump(TINY))
    args = ["--config", str(config), "--out", str(tmp_path / "runs"), "--no-progress"]
    args += ["--publish", str(tmp_path / "pub")]
    first = mlrc_table.main(args)
    runs = tmp_path / "runs"
    finished = {p: p.stat().st_mtime_ns for p in runs.rglob("results.json")}
    trials = sorted(runs.glob("tiny_mlrc/tune/*/trial*"))
    capsys.readouterr()
    second = mlrc_table.main([*args, "--workers", "2"])  # the rerun starts no trial, no unit
    rerun = capsys.readouterr().out
    for method in ("triplet_linear", "triplet_crt"):
        assert f"{method}: its 2 trials finished before; nothing to run" in rerun
    assert "0 units run, 6 skipped" in rerun
    assert {p: p.stat().st_mtime_ns for p in runs.rglob("results.json")} == finished
    assert sorted(runs.glob("tiny_mlrc/tune/*/trial*")) == trials
    assert len(trials) == 4 and len(finished) == 4 + 3 * 2  # trials; frozen + 2 methods x 2 seeds
    published = (tmp_path / "pub" / "tiny_mlrc_mlrc.md").read_text()
    assert published == second
    assert (tmp_path / "pub" / "tiny_mlrc_mlrc.png").stat().st_size > 0
    assert (tmp_path / "pub" / "tiny_mlrc_tuned.csv").exists()
    assert (tmp_path / "pub" / "tiny_mlrc_tuning.md").exists()
    wall = json.loads((tmp_path / "runs" / "tiny_mlrc" / "mlrc_wall.json").read_text())
    assert len(wall) == 2 and all(set(w) == {"tune", "final"} for w in wall)
    assert "over 2 invocation(s)" in second
    table = second.split("## Test classes, separate (mean of fold models)")[1]
    for embedder in ("linear", "MultiHeadCRT"):
        cells = _cells(table, "Triplet" if embedder == "linear" else "", embedder)
        complete, pruned = (int(n) for n in cells[7].split(" + "))
        assert complete + pruned == 2
    # the tables of both invocations hold the same values: nothing was trained again
    strip = re.compile(r"(Measured wall time|Produced by).*")
    assert strip.sub("", first) == strip.sub("", second)


def test_methods_and_trials_narrow_the_table_for_a_quick_try(tmp_path, capsys):
    config = tmp_path / "tiny_mlrc.yaml"
    config.write_text(yaml.safe_dump(TINY))
    args = ["--config", str(config), "--out", str(tmp_path / "runs"), "--no-progress"]
    text = mlrc_table.main([*args, "--methods", "triplet_linear", "triplet_crt", "--trials", "1"])
    trials = sorted((tmp_path / "runs").glob("tiny_mlrc/tune/*/trial*"))
    assert [p.parent.name for p in trials] == ["triplet_crt", "triplet_linear"]
    table = text.split("## Test classes, separate (mean of fold models)")[1]
    for embedder in ("linear", "MultiHeadCRT"):
        cells = _cells(table, "Triplet" if embedder == "linear" else "", embedder)
        complete, pruned = (int(n) for n in cells[7].split(" + "))
        assert complete + pruned == 1
    assert "1 trials per method" in text and "2 trials" not in text
    printed = capsys.readouterr().out  # each stage ends by naming what it wrote
    runs = tmp_path / "runs"
    assert (
        f"the final runs on the test classes:\n  python -m benchmarks.run --config {runs}"
        in printed
    )
    assert f"The table: {runs / 'tiny_mlrc_tuned' / 'table.md'}" in printed
    assert printed.rstrip().endswith(f"The report: {runs / 'tiny_mlrc' / 'tiny_mlrc_mlrc.md'}")
    assert not (tmp_path / "runs" / "tiny_mlrc" / "frozen").exists()


def test_help_answers_before_the_heavy_imports():
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    for command in ("run", "tune", "mlrc_table"):
        started = time.perf_counter()
        shown = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", f"benchmarks.{command}", "--help"],
            cwd=root, capture_output=True, text=True, check=True,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        imported = {line.split("|")[-1].strip().split(".")[0] for line in shown.stderr.splitlines()}
        assert not {"torch", "optuna"} & imported, (command, "imported torch or optuna")
        assert seconds < 10, (command, seconds)  # about 0.1 s; generous for a loaded machine
        text = shown.stdout
        assert "Stages:" in text and "resumes" in text and "Measured on 2 CPUs" in text, text
        assert all(
            "--set" not in line or "override" in line or "usage" in line or "[" in line
            for line in text.splitlines()
        )
