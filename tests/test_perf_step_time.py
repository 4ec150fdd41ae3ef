"""``benchmarks.perf.step_time``: the paired ratio's arithmetic and a tiny end-to-end run."""

from __future__ import annotations

import json
import math
import subprocess

import pytest

from benchmarks.perf import step_time
from pml_crt.utils.stats import t_quantile_975


def test_paired_ratio_is_the_geometric_mean_with_a_t_interval():
    now, before = [2.0, 3.0, 5.0], [1.0, 2.0, 4.0]
    logs = [math.log(2.0), math.log(1.5), math.log(1.25)]
    mean = sum(logs) / 3
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / 2)
    half = t_quantile_975(2) * sd / math.sqrt(3)
    ratio = step_time.paired_ratio(now, before)
    assert ratio["geomean"] == pytest.approx(math.exp(mean), rel=1e-12)
    assert ratio["ci95_low"] == pytest.approx(math.exp(mean - half), rel=1e-12)
    assert ratio["ci95_high"] == pytest.approx(math.exp(mean + half), rel=1e-12)
    single = step_time.paired_ratio([3.0], [2.0])
    assert single["geomean"] == pytest.approx(1.5) and math.isnan(single["ci95_low"])


def _has_revision(rev: str) -> bool:
    found = subprocess.run(
        ["git", "cat-file", "-e", f"{rev}^{{commit}}"],
        cwd=step_time.REPO_ROOT,
        capture_output=True,
        check=False,
    )
    return found.returncode == 0


@pytest.mark.skipif(
    not _has_revision(step_time.BASELINE_REV), reason="baseline revision not in this clone"
)
def test_tiny_run_against_the_baseline_writes_times_and_sync_counts(tmp_path):
    argv = ["--quick", "--rounds", "2", "--batch", "8", "--channels", "8", "--side", "2"]
    result = step_time.main([*argv, "--out", str(tmp_path)])
    written = json.loads((tmp_path / "step_time_quick.json").read_text())
    assert [case["case"] for case in written["cases"]] == ["crt", "multihead"]
    for case in result["cases"]:
        assert case["baseline"]["n"] == case["now"]["n"] == 2
        assert case["input_shape"] == [8, 8, 2, 2]
        paired = case["now_vs_baseline_paired"]
        assert paired["ci95_low"] <= paired["geomean"] <= paired["ci95_high"]
        syncs = case["host_syncs"]
        for side in ("baseline", "now"):
            assert syncs[side]["total"] == sum(syncs[side]["sites"].values()) > 0
    # The baseline's MultiHeadLoss read every recorded value with float().
    multihead = result["cases"][1]["host_syncs"]
    assert multihead["now"]["total"] < multihead["baseline"]["total"]
