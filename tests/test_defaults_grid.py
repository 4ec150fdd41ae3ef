"""The safety-first default rule (benchmarks.defaults_grid) on hand-made sweep CSVs."""

from __future__ import annotations

import csv
import math

import pytest

from benchmarks.search import defaults_grid
from benchmarks.search.lr_sweep import lr_label

LRS = (1e-5, 1e-3)
SEEDS = (0, 1, 2)
T_975_DF2 = 4.303


def _write(path, values):
    """``values[(method, lr)] = [MAP@R per seed]`` as the runner's published CSV."""
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", "evaluation", "seed", "fold", "precision_at_1",
                         "mean_average_precision_at_r"])  # fmt: skip
        for (method, lr), per_seed in values.items():
            for seed, value in zip(SEEDS, per_seed, strict=True):
                name = f"{method}_{lr_label(lr)}"
                writer.writerow([name, "fold", seed, 0, 0.5, value])  # ignored: not "separate"
                writer.writerow([name, "separate", seed, "", 0.5, value])
    return path


def _reference(candidate, base):
    """Mean and t-CI half-width of the per-seed differences, in loops."""
    diffs = [c - b for c, b in zip(candidate, base, strict=True)]
    mean = sum(diffs) / len(diffs)
    variance = sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1)
    return mean, T_975_DF2 * math.sqrt(variance / len(diffs))


@pytest.fixture
def sweeps(tmp_path):
    base = {lr: [0.40, 0.42, 0.41] for lr in LRS}
    values = {"omni": {}, "cub": {}}
    for dataset in values:
        for lr in LRS:
            values[dataset][("linear", lr)] = base[lr]
        # risky: best on average, but far below the linear head at 1e-3 on cub
        values[dataset][("risky", 1e-5)] = [0.50, 0.52, 0.51]
        values[dataset][("safe", 1e-5)] = [0.43, 0.44, 0.44]
        values[dataset][("safer_mean", 1e-5)] = [0.44, 0.45, 0.45]
    values["omni"][("risky", 1e-3)] = [0.45, 0.47, 0.46]
    values["cub"][("risky", 1e-3)] = [0.35, 0.37, 0.35]
    for dataset in values:
        values[dataset][("safe", 1e-3)] = [0.40, 0.43, 0.41]  # worst cell +0.0033, CI > 0.01
        values[dataset][("safer_mean", 1e-3)] = [0.40, 0.425, 0.41]  # worst within safe's CI
    paths = [(d, _write(tmp_path / f"{d}.csv", v)) for d, v in values.items()]
    return paths, values


def test_cells_are_the_paired_differences_and_the_rule_puts_safety_first(sweeps, tmp_path):
    paths, values = sweeps
    candidates = defaults_grid.grid_cells(paths, ["risky", "safe", "safer_mean"], "linear", LRS)
    for candidate in candidates:
        for (dataset, lr), (mean, half) in candidate.cells.items():
            expected = _reference(
                values[dataset][(candidate.name, lr)], values[dataset][("linear", lr)]
            )
            assert mean == pytest.approx(expected[0], abs=1e-12)
            assert half == pytest.approx(expected[1], rel=1e-3)  # t quantile to 3 decimals
    by_name = {c.name: c for c in candidates}
    assert by_name["risky"].below_zero == [("cub", 1e-3)]
    assert by_name["risky"].mean > by_name["safer_mean"].mean > by_name["safe"].mean
    # risky fails the proviso; safe and safer_mean tie on their worst cells; the tie
    # goes to the higher mean over all cells.
    chosen, proviso = defaults_grid.choose(candidates)
    assert (chosen.name, proviso) == ("safer_mean", True)

    out = tmp_path / "grid.md"
    text = defaults_grid.main(
        ["--sweep", *(f"{d}={p}" for d, p in paths), "--base", "linear",
         "--candidates", "risky", "safe", "safer_mean", "--lrs", "1e-5", "1e-3",
         "--out", str(out)]
    )  # fmt: skip
    assert out.read_text().startswith(text) and (tmp_path / "grid.png").stat().st_size > 0
    assert "**Chosen: `safer_mean`**" in text and "| risky |" in text
    assert "seeds [0, 1, 2]" in text and "cub 0.001" in text


def test_without_a_safe_candidate_the_report_says_so(sweeps):
    paths, _ = sweeps
    (risky,) = defaults_grid.grid_cells(paths, ["risky"], "linear", LRS)
    chosen, proviso = defaults_grid.choose([risky])
    assert chosen is risky and not proviso
    text = defaults_grid.markdown([risky], "linear", paths, "cmd")
    assert "**No candidate passes the proviso**" in text


def test_a_missing_method_is_named_and_a_later_sweep_may_leave_a_candidate_out(sweeps, tmp_path):
    paths, values = sweeps
    with pytest.raises(
        ValueError, match=r"omni \(the first dataset\) has no sweep of \['nothing'\]"
    ):
        defaults_grid.grid_cells(paths, ["nothing"], "linear", LRS)
    later = {k: v for k, v in values["cub"].items() if k[0] != "risky"}
    paths = [paths[0], ("cub", _write(tmp_path / "later.csv", later))]
    risky, safe = defaults_grid.grid_cells(paths, ["risky", "safe"], "linear", LRS)
    assert sorted(risky.cells) == [("omni", 1e-5), ("omni", 1e-3)] and len(safe.cells) == 4
    text = defaults_grid.markdown([risky, safe], "linear", paths, "cmd")
    assert text.count("| not run") == 2 and "Not run: the candidate failed" in text
    # risky has no cell below zero on omni, so its missing cub sweep is still to come
    assert "**Provisional: " in text and "`risky` passed the proviso so far" in text
    assert "Chosen" not in text
    failed = defaults_grid.Candidate("failed", {("omni", 1e-5): (-0.2, 0.01)})
    text = defaults_grid.markdown([failed, safe], "linear", paths, "cmd")
    assert "**Chosen: `safe`**" in text  # a candidate that failed earlier is not awaited
    partial = {k: v for k, v in later.items() if k != ("safe", 1e-3)}
    paths[1] = ("cub", _write(tmp_path / "partial.csv", partial))
    with pytest.raises(ValueError, match="'safe_lr1e-03'"):
        defaults_grid.grid_cells(paths, ["safe"], "linear", LRS)


def test_a_dataset_split_over_sweeps_pairs_each_candidate_with_its_own_base(sweeps, tmp_path):
    paths, values = sweeps
    first = {k: v for k, v in values["cub"].items() if k[0] in ("linear", "safe")}
    # the second invocation's linear head came out differently: its candidates pair with it
    second = {k: v for k, v in values["cub"].items() if k[0] in ("risky", "safer_mean")}
    second.update({("linear", lr): [v + 0.01 for v in values["cub"][("linear", lr)]] for lr in LRS})
    split = [paths[0], ("cub", _write(tmp_path / "a.csv", first)),
             ("cub", _write(tmp_path / "b.csv", second))]  # fmt: skip
    whole = {c.name: c for c in defaults_grid.grid_cells(paths, ["safe", "risky"], "linear", LRS)}
    parts = {c.name: c for c in defaults_grid.grid_cells(split, ["safe", "risky"], "linear", LRS)}
    assert parts["safe"].cells == whole["safe"].cells
    for lr in LRS:
        mean, _ = parts["risky"].cells[("cub", lr)]
        assert mean == pytest.approx(whole["risky"].cells[("cub", lr)][0] - 0.01, abs=1e-12)


def test_a_dataset_still_to_run_makes_the_report_provisional(sweeps):
    paths, _ = sweeps
    candidates = defaults_grid.grid_cells(paths[:1], ["safe", "safer_mean"], "linear", LRS)
    text = defaults_grid.markdown(candidates, "linear", paths[:1], "cmd", ["omni", "cub", "cars"])
    assert "**Provisional: `" in text and "leads** on omni; cub, cars have not run yet" in text
    assert "Chosen" not in text
    whole = defaults_grid.markdown(candidates, "linear", paths[:1], "cmd", ["omni"])
    assert "**Chosen: `" in whole
    with pytest.raises(ValueError, match=r"sweeps of \['omni'\], which are not among"):
        defaults_grid.markdown(candidates, "linear", paths[:1], "cmd", ["cub"])
