"""Resumable benchmark units: a run killed mid-training and restarted loses and repeats nothing.

A tiny Omniglot unit (global_pool, 3 epochs, a log row every iteration) runs
uninterrupted once; then the same command runs as a real subprocess, is
killed with SIGKILL once epoch 1's resume marker exists, and is run again to
completion. The resumed unit's results, test embeddings, every record-keeper
CSV file and every SQLite table (row ids included) must equal the
uninterrupted run's exactly (CPU and the same thread count in every process,
so bitwise). A second test crashes the
unit at the worst moment, after epoch 2's log rows and checkpoint files are
written but before its marker, and checks the same. A third interrupts a real
run with Ctrl-C (SIGINT): it exits with 130 and the command that resumes it,
its logs consistent, and that command completes it. A fourth crashes the unit after
its last epoch's marker, before the best checkpoint is loaded and tested: the
resumed process trains nothing and must still finish it exactly.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.protocol import resume
from benchmarks.protocol import runner as bench
from benchmarks.protocol import unit as unit_module
from benchmarks.protocol.layout import MARKER, RESULTS, RESUME

pytestmark = pytest.mark.filterwarnings(
    "ignore:Converting a tensor with requires_grad=True:UserWarning"  # PML trainer's pbar
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "benchmarks" / "configs" / "omniglot_quick.yaml"
DATA = ROOT.parent / "shared" / "data"

needs_omniglot = pytest.mark.skipif(
    not (DATA / "omniglot-py" / "images_background").is_dir(),
    reason=f"Omniglot not found under {DATA} (see SPEC section 4)",
)

OVERRIDES = [
    # The thread count changes how sums are split, so their rounding: the in-process
    # reference run and the subprocesses must use the same one.
    "threads=1",
    f"dataset.root={DATA}",
    "dataset.max_classes=16",
    "seeds=[0]",
    "training.iterations_per_epoch=20",
    "training.num_epochs=3",
    "training.patience=null",
    "training.batch_size=12",
    "training.num_workers=0",
    "training.log_freq=1",
    "eval.batch_size=64",
]
UNIT = Path("omniglot_quick") / "global_pool" / "seed0" / "fold0"
# A guard against a hung subprocess, not a speed check: on an idle machine the marker comes in
# seconds, but a machine whose cores are busy with other work can take minutes (120 s ran out
# once beside a benchmark using both cores). A crashed subprocess fails at once (poll()).
HANG_GUARD_S = 900.0
VAL_TABLE = "accuracies_normalized_GlobalEmbeddingSpaceTester_level_0_VAL_vs_self"


def _argv(out: Path) -> list[str]:
    argv = ["--config", str(CONFIG), "--out", str(out), "--no-progress"]
    argv += ["--methods", "global_pool"]
    for override in OVERRIDES:
        argv += ["--set", override]
    return argv


def _snapshot(unit: Path) -> dict:
    """Results, test embeddings, every CSV log file and every SQLite table of a unit."""
    result = json.loads((unit / "results.json").read_text())
    csvs = {p.name: p.read_text() for p in sorted((unit / "logs").glob("*.csv"))}
    tables = {}
    with sqlite3.connect(unit / "logs" / "logs.db") as conn:
        names = conn.execute("SELECT name FROM sqlite_master WHERE type='table'").fetchall()
        for (name,) in names:
            order = "" if name == "sqlite_sequence" else " ORDER BY id"
            tables[name] = conn.execute(f'SELECT * FROM "{name}"{order}').fetchall()
    conn.close()
    embeddings = torch.load(unit / "test_embeddings.pt", weights_only=True)
    models = sorted(p.name for p in (unit / "models").glob("*.pth"))
    return {
        "result": {k: result[k] for k in ("val", "test", "best_epoch", "epochs_run")},
        "csv": csvs,
        "db": tables,
        "embeddings": embeddings,
        "models": models,
    }


def _assert_same(resumed: dict, reference: dict) -> None:
    assert resumed["result"] == reference["result"]
    assert resumed["models"] == reference["models"]
    for key in ("embeddings", "labels"):
        assert torch.equal(resumed["embeddings"][key], reference["embeddings"][key])
    assert resumed["csv"].keys() == reference["csv"].keys()
    for name, text in reference["csv"].items():
        assert resumed["csv"][name] == text, name
    assert resumed["db"].keys() == reference["db"].keys()
    for name, rows in reference["db"].items():
        assert resumed["db"][name] == rows, name
    # every iteration logged exactly once: 3 epochs x 20 iterations
    iterations = [row[1] for row in resumed["db"]["loss_histories"]]
    assert iterations == list(range(60))
    lines = resumed["csv"]["loss_histories.csv"].splitlines()
    assert lines[0].startswith("~iteration~") and len(lines) == 1 + 60
    epochs = [row[1] for row in resumed["db"]["test_accuracies"]]
    assert len(epochs) == 1


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    assert bench.main(_argv(out))["units_run"] == 1
    snapshot = _snapshot(out / UNIT)
    assert not (out / UNIT / RESUME).exists()
    assert snapshot["result"]["epochs_run"] == 3
    return snapshot


def _marker_epoch(unit: Path) -> int:
    try:
        return json.loads((unit / RESUME / MARKER).read_text())["epoch"]
    except (OSError, ValueError):
        return 0


def _wait_for_marker(process: subprocess.Popen, unit: Path, seconds: float) -> None:
    """Wait until the running ``process`` has written the unit's first resume marker."""
    deadline = time.time() + seconds
    while _marker_epoch(unit) < 1:
        assert process.poll() is None, process.stderr.read().decode()[-2000:]
        assert time.time() < deadline, f"no resume marker after {seconds} s"
        time.sleep(0.02)


def _kill_at_marker(process: subprocess.Popen, unit: Path, seconds: float) -> None:
    """SIGKILL ``process`` once it has written ``unit``'s first resume marker, and reap it."""
    try:
        _wait_for_marker(process, unit, seconds)
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
        process.stderr.close()
    assert not (unit / RESULTS).exists(), "killed too late: the unit had finished"


def _start(argv: list[str], module: str = "benchmarks.run") -> subprocess.Popen:
    """``python -m module argv`` in the background, stderr piped."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *argv],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        # A shell that starts the tests in the background ignores SIGINT, and so would the
        # child (Python keeps an inherited "ignore"): give it the default disposition.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


@needs_omniglot
def test_killed_run_resumes_exactly(reference, tmp_path):
    out = tmp_path / "runs"
    unit = out / UNIT
    process = _start(_argv(out))
    _kill_at_marker(process, unit, HANG_GUARD_S)
    assert process.returncode == -signal.SIGKILL
    killed_at = _marker_epoch(unit)
    assert 1 <= killed_at < 3

    resumed = bench.main(_argv(out))  # the same command again
    assert resumed["units_run"] == 1
    _assert_same(_snapshot(unit), reference)
    assert not (unit / RESUME).exists()
    resumes = json.loads((unit / "env.json").read_text())["resumes"]
    assert [r["epoch"] for r in resumes] == [killed_at]


class _Crash(Exception):
    pass


@needs_omniglot
def test_crash_before_marker_drops_newer_rows(reference, tmp_path, monkeypatch):
    # The worst moment: epoch 2's log rows and checkpoint files (incl. a new best that
    # replaced best1) are on disk, its marker is not.
    out = tmp_path / "runs"
    unit = out / UNIT
    write = resume.write_resume_point

    def crash_at_epoch_2(folder, trainer, sampler, stopped):
        if trainer.epoch == 2:
            raise _Crash
        return write(folder, trainer, sampler, stopped)

    monkeypatch.setattr(resume, "write_resume_point", crash_at_epoch_2)
    with pytest.raises(_Crash):
        bench.main(_argv(out))
    monkeypatch.undo()
    assert _marker_epoch(unit) == 1
    lines = (unit / "logs" / "loss_histories.csv").read_text().splitlines()
    assert len(lines) == 1 + 40  # epoch 2's rows were written after the marker

    assert bench.main(_argv(out))["units_run"] == 1
    _assert_same(_snapshot(unit), reference)


def _table_rows(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as conn:
        names = conn.execute(
            "SELECT name FROM sqlite_master WHERE type='table' AND name != 'sqlite_sequence'"
        ).fetchall()
        rows = {
            name: conn.execute(f'SELECT count(*) FROM "{name}"').fetchone()[0] for (name,) in names
        }
    conn.close()
    return rows


@needs_omniglot
def test_ctrl_c_says_how_to_resume_and_the_same_command_does(tmp_path):
    out = tmp_path / "runs"
    unit = out / UNIT
    epochs = 8  # 7 epochs (a few seconds) left to interrupt after the first marker
    argv = [*_argv(out), "--set", f"training.num_epochs={epochs}"]
    process = _start(argv)
    try:
        _wait_for_marker(process, unit, HANG_GUARD_S)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=HANG_GUARD_S)
    finally:
        process.kill()
        process.wait()
    stderr = stderr.decode()
    assert process.returncode == 130, stderr[-2000:]
    assert "Traceback" not in stderr
    assert "interrupted" in stderr and bench.cli_command(argv) in stderr
    assert not (unit / RESULTS).exists()
    stopped_at = _marker_epoch(unit)
    assert 1 <= stopped_at < epochs
    # Every record-keeper CSV file holds as many rows as its logs.db table: whole saves only.
    logs = unit / "logs"
    tables = _table_rows(logs / "logs.db")
    csvs = {p.stem: len(p.read_text().splitlines()) - 1 for p in logs.glob("*.csv")}
    assert csvs and csvs == {name: tables[name] for name in csvs}
    assert csvs["loss_histories"] >= 20 * stopped_at  # nothing saved before is lost

    resumed = bench.main(argv)  # the command it printed
    assert resumed["units_run"] == 1 and (unit / RESULTS).exists()
    env = json.loads((unit / "env.json").read_text())
    assert [r["epoch"] for r in env["resumes"]] == [stopped_at]
    with sqlite3.connect(unit / "logs" / "logs.db") as conn:
        losses = conn.execute("SELECT * FROM loss_histories ORDER BY id").fetchall()
        validated = conn.execute(f'SELECT epoch FROM "{VAL_TABLE}" ORDER BY id').fetchall()
    conn.close()
    assert [row[1] for row in losses] == list(range(20 * epochs))  # each iteration once
    assert [epoch for (epoch,) in validated] == list(range(1, epochs + 1))


@needs_omniglot
def test_crash_after_the_last_epoch_resumes_without_training(reference, tmp_path, monkeypatch):
    # Killed after the last epoch's marker, before the best checkpoint was loaded and tested:
    # the resumed process trains nothing, so its tester never validated. It must still find
    # the best epoch in the records (it once failed with KeyError: 'val').
    out = tmp_path / "runs"
    unit = out / UNIT
    load_best = unit_module._load_best
    crashed = []

    def crash_once(unit_state, trainer):
        if not crashed:
            crashed.append(True)
            raise _Crash
        return load_best(unit_state, trainer)

    monkeypatch.setattr(unit_module, "_load_best", crash_once)
    with pytest.raises(_Crash):
        bench.main(_argv(out))
    assert _marker_epoch(unit) == 3 and not (unit / RESULTS).exists()

    assert bench.main(_argv(out))["units_run"] == 1
    _assert_same(_snapshot(unit), reference)
    resumes = json.loads((unit / "env.json").read_text())["resumes"]
    assert [r["epoch"] for r in resumes] == [3]
