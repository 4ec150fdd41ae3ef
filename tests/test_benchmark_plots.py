"""benchmarks.plots: the three PNGs of a run and the data behind them.

A tiny omniglot_quick run (2 seeds x 2 folds, 2 epochs of 2 iterations) is made
with the runner itself, published (``--publish`` writes the plots), and the
plotted series are checked against the record-keeper CSVs, the saved test
embeddings (singular values by ``torch.linalg.svdvals``) and ``summary.json``,
each read here independently.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from benchmarks.protocol.results import publish_results
from benchmarks.reports import plots
from tests.test_benchmark_runner import DATA, TINY_OMNIGLOT, _run

pytestmark = pytest.mark.filterwarnings(
    "ignore:Converting a tensor with requires_grad=True:UserWarning"  # PML trainer's pbar
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
KINDS = ("val_curves", "metrics", "spectra")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    if not (DATA / "omniglot-py" / "images_background").is_dir():
        pytest.skip(f"Omniglot not found under {DATA}: the plots need a real (tiny) run")
    tmp = tmp_path_factory.mktemp("plots")
    overrides = [*TINY_OMNIGLOT, "seeds=[0, 1]", "folds=[0, 1]"]
    result = _run("omniglot_quick", overrides, tmp / "runs", publish=tmp / "published")
    return result["root"], tmp


def _assert_png(path):
    assert path.is_file(), path
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    assert len(data) > 10_000, f"{path}: only {len(data)} bytes"


def test_write_plots_and_publish(tiny_run):
    root, tmp = tiny_run
    for kind in KINDS:  # run_benchmark(publish=...) wrote them next to the table
        _assert_png(tmp / "published" / f"omniglot_quick_{kind}.png")
    assert (tmp / "published" / "omniglot_quick.md").is_file()

    written = plots.write_plots(root, tmp / "out", "tiny", strict=True)
    assert set(written) == set(KINDS)
    for kind in KINDS:
        assert written[kind] == tmp / "out" / f"tiny_{kind}.png"
        _assert_png(written[kind])

    # the command line: default --out is the run folder, prefix its name
    assert plots.main([str(root)]) == {k: root / f"omniglot_quick_{k}.png" for k in KINDS}


def _val_csv(folder):
    (path,) = (folder / "logs").glob("accuracies_*_VAL_vs_self.csv")
    with path.open(newline="") as f:
        return {
            int(row["epoch"]): float(row["mean_average_precision_at_r_level0"])
            for row in csv.DictReader(f)
        }


def test_validation_curves_match_the_csvs(tiny_run):
    root, _ = tiny_run
    curves = plots.validation_curves(root)
    assert list(curves) == ["frozen", "global_pool", "multihead_crt"]
    for method, curve in curves.items():
        units = sorted((root / method).glob("seed*/fold*"))
        assert len(units) == (2 if method == "frozen" else 4)  # frozen: first fold only
        assert curve.units == len(units)
        per_unit = [_val_csv(u) for u in units]
        epochs = sorted(set().union(*per_unit))
        assert epochs == ([0] if method == "frozen" else [1, 2])
        np.testing.assert_array_equal(curve.epochs, epochs)
        for i, epoch in enumerate(epochs):
            values = [v[epoch] for v in per_unit if epoch in v]
            assert curve.mean[i] == pytest.approx(np.mean(values), abs=1e-12)
            assert curve.low[i] == min(values) and curve.high[i] == max(values)


def test_spectra_match_svdvals(tiny_run):
    root, _ = tiny_run
    spectra = plots.spectra(root)
    assert list(spectra) == ["frozen", "global_pool", "multihead_crt"]
    for method, spectrum in spectra.items():
        expected = []
        for seed in (0, 1):
            saved = torch.load(
                root / method / f"seed{seed}" / "fold0" / "test_embeddings.pt", weights_only=True
            )
            x = torch.nn.functional.normalize(saved["embeddings"].double(), dim=1)
            s = torch.linalg.svdvals(x)
            expected.append((s / s.sum()).numpy())
        np.testing.assert_allclose(spectrum, np.mean(expected, axis=0), rtol=1e-9, atol=1e-12)
        assert spectrum.sum() == pytest.approx(1.0)
        assert np.all(np.diff(spectrum) <= 1e-15)  # descending


def test_final_metrics_match_summary(tiny_run):
    root, _ = tiny_run
    summary = json.loads((root / "summary.json").read_text())
    values = plots.final_metrics(root)
    assert set(values) == {(e["method"], e["evaluation"]) for e in summary}
    # two folds ran: the trained methods also have a concatenated evaluation
    assert ("multihead_crt", "concatenated") in values and ("frozen", "concatenated") not in values
    for entry in summary:
        got = values[(entry["method"], entry["evaluation"])]
        assert set(got) == set(plots.BAR_METRICS)
        for metric, (mean, ci) in got.items():
            assert mean == entry[metric]["mean"] and ci == entry[metric]["ci95"]
    assert plots.report_split(root) == "test"


def test_a_failing_plot_warns_and_the_rest_are_written(tiny_run, monkeypatch):
    root, tmp = tiny_run

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setitem(plots.PLOTS, "metrics", boom)
    with pytest.warns(UserWarning, match="x_metrics.png not written: RuntimeError"):
        written = plots.write_plots(root, tmp / "failing", "x")
    assert set(written) == {"val_curves", "spectra"}
    with pytest.raises(RuntimeError, match="boom"):
        plots.write_plots(root, tmp / "failing", "x", strict=True)


def test_publish_keeps_the_results_when_plotting_fails(tiny_run, monkeypatch):
    root, tmp = tiny_run

    def boom(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(plots, "write_plots", boom)
    rows = [{"method": "m", "evaluation": "separate", "seed": 0, "fold": "", "p": 0.5}]
    folder = tmp / "publish_failing"
    with pytest.warns(UserWarning, match="plots of t not written: RuntimeError"):
        publish_results(folder, "t", "table", rows, ["p"], torch.device("cpu"), "cmd", root)
    assert (folder / "t.md").read_text().startswith("table")
    assert (folder / "t.csv").is_file()


def test_an_empty_run_folder_gives_no_plots(tmp_path):
    (tmp_path / "empty_run").mkdir()
    assert plots.write_plots(tmp_path / "empty_run", tmp_path / "out", strict=True) == {}
    assert not list((tmp_path / "out").glob("*.png"))
