"""The paired ablation report: differences, CIs and verdicts from the runner's CSV."""

import csv

import pytest

from benchmarks.reports.ablation_report import main
from benchmarks.reports.paired import paired_differences, read_separate_rows, verdict


def _write(path, rows):
    fields = [
        "method",
        "evaluation",
        "seed",
        "fold",
        "precision_at_1",
        "mean_average_precision_at_r",
    ]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows(rows)


def _row(method, seed, p1, mapr, evaluation="separate"):
    return {
        "method": method,
        "evaluation": evaluation,
        "seed": seed,
        "fold": "",
        "precision_at_1": p1,
        "mean_average_precision_at_r": mapr,
    }


def test_paired_differences_by_hand(tmp_path):
    path = tmp_path / "ablation.csv"
    _write(
        path,
        [
            _row("base", 0, 0.50, 0.30),
            _row("base", 1, 0.60, 0.40),
            _row("base", 0, 0.99, 0.99, evaluation="fold"),  # ignored: not a "separate" row
            _row("up", 0, 0.52, 0.33),
            _row("up", 1, 0.62, 0.43),
            _row("noisy", 0, 0.55, 0.20),
            _row("noisy", 1, 0.55, 0.50),
        ],
    )
    rows = {r["method"]: r for r in paired_differences(read_separate_rows(path), "base")}
    mean, half = rows["up"]["mean_average_precision_at_r"]
    assert mean == pytest.approx(0.03) and half == pytest.approx(0.0)
    assert verdict(mean, half) == "better"
    mean, half = rows["noisy"]["mean_average_precision_at_r"]
    # differences -0.10 and +0.10: mean 0, sample sd 0.1 * sqrt(2), half-width t(1) * sd / sqrt(2)
    assert mean == pytest.approx(0.0) and half == pytest.approx(12.706 * 0.1)
    assert verdict(mean, half) == "no difference"
    text = main([str(path), "--base", "base", "--out", str(tmp_path / "out.md")])
    assert "| up | +2.00 ± 0.00 | +3.00 ± 0.00 | better |" in text
    assert (tmp_path / "out.md").read_text() == text
    assert "(validation classes)" in text
    assert "(test classes)" in main([str(path), "--base", "base", "--classes", "test"])


def test_missing_base_is_an_error(tmp_path):
    path = tmp_path / "ablation.csv"
    _write(path, [_row("a", 0, 0.5, 0.3)])
    with pytest.raises(ValueError, match="base method 'base' not in the results"):
        paired_differences(read_separate_rows(path), "base")


def test_explicit_pairs_one_per_learning_rate(tmp_path):
    path = tmp_path / "sweep.csv"
    _write(
        path,
        [
            _row("new_lr1e-03", 0, 0.50, 0.40),
            _row("new_lr1e-03", 1, 0.50, 0.42),
            _row("old_lr1e-03", 0, 0.40, 0.30),
            _row("old_lr1e-03", 1, 0.40, 0.32),
            _row("new_lr1e-04", 0, 0.50, 0.30),
            _row("new_lr1e-04", 1, 0.50, 0.30),
            _row("old_lr1e-04", 0, 0.50, 0.31),
            _row("old_lr1e-04", 1, 0.50, 0.31),
        ],
    )
    pairs = [("new_lr1e-03", "old_lr1e-03"), ("new_lr1e-04", "old_lr1e-04")]
    rows = paired_differences(read_separate_rows(path), pairs=pairs)
    assert [(r["method"], r["base"]) for r in rows] == pairs
    assert rows[0]["mean_average_precision_at_r"] == pytest.approx((0.10, 0.0))
    assert rows[1]["mean_average_precision_at_r"] == pytest.approx((-0.01, 0.0))
    text = main([str(path), "--pairs", "new_lr1e-03:old_lr1e-03", "new_lr1e-04:old_lr1e-04"])
    assert "| new_lr1e-03 | old_lr1e-03 | +10.00 ± 0.00 | +10.00 ± 0.00 | better |" in text
    assert "| new_lr1e-04 | old_lr1e-04 | +0.00 ± 0.00 | -1.00 ± 0.00 | worse |" in text
    assert "## Paired differences (validation classes)" in text
    with pytest.raises(ValueError, match="methods 'gone' not in the results"):
        paired_differences(read_separate_rows(path), pairs=[("gone", "old_lr1e-03")])
    with pytest.raises(ValueError, match="pass base or pairs, not both"):
        paired_differences(read_separate_rows(path), "old_lr1e-03", pairs)
    with pytest.raises(SystemExit, match="VARIANT:BASE"):
        main([str(path), "--pairs", "new_lr1e-03"])


def test_two_runs_of_the_same_seeds_pair_by_label(tmp_path):
    tuned, defaults = tmp_path / "tuned.csv", tmp_path / "defaults.csv"
    _write(tuned, [_row("crt", 0, 0.40, 0.10), _row("crt", 1, 0.42, 0.12)])
    _write(
        defaults,
        [
            _row("crt", 0, 0.50, 0.11),
            _row("crt", 1, 0.50, 0.13),
            _row("crt", 2, 0.90, 0.90),  # no tuned seed 2: left out of the pairs
        ],
    )
    text = main([f"tuned={tuned}", f"defaults={defaults}", "--pairs", "tuned/crt:defaults/crt"])
    # P@1 differences -0.10 and -0.08: mean -0.09, sd 0.01 * sqrt(2), half t(1) * 0.01
    assert (
        f"| tuned/crt | defaults/crt | -9.00 ± {100 * 12.706 * 0.01:.2f} | -1.00 ± 0.00 | worse |"
        in text
    )
    assert "seeds [0, 1]" in text
    assert f"Source: `tuned={tuned}`, `defaults={defaults}`." in text
    assert "variant minus its base, paired by seed" in text
    with pytest.raises(SystemExit, match="LABEL=PATH"):
        main([str(tuned), str(defaults), "--pairs", "a:b"])
    with pytest.raises(SystemExit, match="given twice"):
        main([f"x={tuned}", f"x={defaults}", "--pairs", "x/crt:x/crt"])
    # One CSV is a plain path, even with "=" in its name.
    plain = tmp_path / "lr=1e-3.csv"
    _write(plain, [_row("a", 0, 0.5, 0.3), _row("b", 0, 0.4, 0.2)])
    text = main([str(plain), "--base", "b"])
    assert "| a | +10.00 | +10.00 | one seed: no verdict |" in text
    assert "variant minus `b`, paired by seed" in text
