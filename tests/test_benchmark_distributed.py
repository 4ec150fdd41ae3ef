"""The benchmark runner under torchrun: 2 CPU processes (gloo) reproduce 1 process.

The same tiny CUB config (MobileNetV2 with frozen BatchNorm and cached frozen
blocks, so no output depends on the rest of the batch) runs as
``torchrun --nproc_per_node=1`` and ``--nproc_per_node=2`` with the same global
batch. Both draw the same global batches (``RankShardSampler``), the loss sees
the whole global batch (``AllGatherLossWrapper``, ``DistributedMinerWrapper`` for
the trainer's miner) and DDP averages the gradients, so the logged loss of
every iteration, the validation accuracies of every epoch and the test
embeddings must agree to float rounding: each process runs one thread, the
test embeddings stay within the float32 bound of ``float32_tolerance`` and the
ranking metrics within two near-tied queries (``ranking_tolerance``). Rank 0
alone writes the run folder: one row per iteration and per epoch in the
record-keeper logs.

A 2-process Omniglot run killed (torchrun and its workers, SIGKILL) after its
first resume point and started again with the same command ends with the
same results, embeddings, CSV logs and SQLite tables as an uninterrupted
2-process run, bitwise.
"""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from benchmarks.protocol.build import build_embedder
from benchmarks.protocol.config import load_config, method_config
from pml_crt.trunks import feature_map_trunk
from tests.test_benchmark_resume import (
    HANG_GUARD_S,
    UNIT,
    _argv,
    _assert_same,
    _marker_epoch,
    _snapshot,
    _wait_for_marker,
    needs_omniglot,
)
from tests.test_benchmark_runner import assert_rows_close, float32_tolerance, ranking_tolerance

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
DATA = SHARED / "data"
WEIGHTS = SHARED / "weights" / "mobilenet_v2-b0353104.pth"
CONFIG = ROOT / "benchmarks" / "configs" / "cub_compare.yaml"

needs_cub = pytest.mark.skipif(
    not (DATA / "CUB_200_2011" / "images.txt").is_file() or not WEIGHTS.is_file(),
    reason=f"needs the CUB subset under {DATA} and MobileNetV2 weights at {WEIGHTS}",
)

METHODS = ["global_avg", "multihead_crt"]  # a trainer tuple_miner; per-head miners
EPOCHS, ITERATIONS = 2, 3
OVERRIDES = [
    # One thread in every process (torchrun alone would give 1 to each of 2 processes and
    # the machine's default to a single one), so that the runs differ only in the split.
    "threads=1",
    f"dataset.root={DATA}",
    f"trunk.weights_path={WEIGHTS}",
    "dataset.max_classes=12",  # 6 train+val species: 4 folds of 4-5 train / 1-2 val
    "seeds=[0]",
    "folds=[0]",
    "images.resize=64",
    "images.crop=64",
    f"training.num_epochs={EPOCHS}",
    f"training.iterations_per_epoch={ITERATIONS}",
    "training.patience=null",
    "training.batch_size=16",
    "training.log_freq=1",
    "eval.batch_size=64",
    "device=cpu",
]


def _torchrun_command(processes: int) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={processes}",
        "-m",
        "benchmarks.run",
    ]


def _torchrun(processes: int, out: Path) -> subprocess.CompletedProcess:
    command = [
        *_torchrun_command(processes),
        "--config",
        str(CONFIG),
        "--out",
        str(out),
        "--no-progress",
        "--methods",
        *METHODS,
    ]
    for override in OVERRIDES:
        command += ["--set", override]
    return _run(command)


def _run(command: list[str]) -> subprocess.CompletedProcess:
    completed = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False
    )
    assert completed.returncode == 0, completed.stdout[-3000:] + completed.stderr[-3000:]
    return completed


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[int, Path]:
    out = tmp_path_factory.mktemp("torchrun")
    logs = {n: _torchrun(n, out / f"nproc{n}") for n in (1, 2)}
    assert "2 processes x" in logs[2].stdout
    assert logs[2].stdout.count("## cub_compare") == 1  # only rank 0 prints the table
    return {n: out / f"nproc{n}" / "cub_compare" for n in (1, 2)}


@needs_cub
@pytest.mark.parametrize("method", METHODS)
def test_two_processes_reproduce_one(runs, method):
    units = {n: root / method / "seed0" / "fold0" for n, root in runs.items()}
    assert json.loads((units[2] / "env.json").read_text())["world_size"] == 2

    losses = {n: _rows(unit / "logs" / "loss_histories.csv") for n, unit in units.items()}
    assert [int(r["~iteration~"]) for r in losses[2]] == list(range(EPOCHS * ITERATIONS))
    one, two = (torch.tensor([float(r["total_loss"]) for r in losses[n]]) for n in (1, 2))
    torch.testing.assert_close(two, one, rtol=1e-4, atol=1e-6)

    results = {n: json.loads((unit / "results.json").read_text()) for n, unit in units.items()}
    name = "accuracies_normalized_GlobalEmbeddingSpaceTester_level_0_VAL_vs_self.csv"
    val = {n: _rows(unit / "logs" / name) for n, unit in units.items()}
    assert [int(r["epoch"]) for r in val[2]] == list(range(1, EPOCHS + 1))
    near_ties = ranking_tolerance(results[1]["num_images"]["val"])
    for row_one, row_two in zip(val[1], val[2], strict=True):
        for key in ("mean_average_precision_at_r_level0", "precision_at_1_level0"):
            assert float(row_two[key]) == pytest.approx(float(row_one[key]), abs=near_ties)

    embeddings = {
        n: torch.load(unit / "test_embeddings.pt", weights_only=True) for n, unit in units.items()
    }
    assert torch.equal(embeddings[1]["labels"], embeddings[2]["labels"])
    trunk = feature_map_trunk("mobilenet_v2", None)  # for its layers' fan-ins only
    config = method_config(load_config(CONFIG, OVERRIDES), method)
    tolerance = float32_tolerance(trunk, build_embedder(config["embedder"], trunk.out_channels))
    assert_rows_close(embeddings[2]["embeddings"], embeddings[1]["embeddings"], tolerance)
    assert results[2]["best_epoch"] == results[1]["best_epoch"]


def _children(pid: int) -> list[int]:
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue  # gone meanwhile
        if parent == pid:
            children.append(int(stat.parent.name))
    return children


def _stop_tree(pid: int) -> list[int]:
    """SIGSTOP ``pid``, then its descendants; returns them all, ``pid`` first."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGSTOP)
    return [pid, *(p for child in _children(pid) for p in _stop_tree(child))]


def _gone(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants, every one stopped first, and wait for them.

    torchrun starts each worker in a session of its own: killing torchrun's process group
    would leave the workers running on, finishing the unit the test means to cut short.
    """
    tree = _stop_tree(pid)
    for each in tree:
        with contextlib.suppress(ProcessLookupError):
            os.kill(each, signal.SIGKILL)
    deadline = time.time() + 60
    while not all(_gone(each) for each in tree[1:]):  # not our children: no wait() for them
        assert time.time() < deadline, "torchrun's workers outlived SIGKILL for 60 s"
        time.sleep(0.02)


@needs_omniglot
def test_killed_two_process_run_resumes_exactly(tmp_path):
    command = _torchrun_command(2)
    _run([*command, *_argv(tmp_path / "uninterrupted")])
    reference = _snapshot(tmp_path / "uninterrupted" / UNIT)

    out = tmp_path / "killed"
    unit = out / UNIT
    process = subprocess.Popen(
        [*command, *_argv(out)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    try:
        _wait_for_marker(process, unit, HANG_GUARD_S)
    finally:
        _kill_tree(process.pid)  # torchrun and both workers
        process.wait()
        process.stderr.close()
    assert not (unit / "results.json").exists(), "killed too late: the unit had finished"
    killed_at = _marker_epoch(unit)
    assert 1 <= killed_at < 3

    _run([*command, *_argv(out)])  # the same command again
    _assert_same(_snapshot(unit), reference)
    env = json.loads((unit / "env.json").read_text())
    assert env["world_size"] == 2
    assert [r["epoch"] for r in env["resumes"]] == [killed_at]
