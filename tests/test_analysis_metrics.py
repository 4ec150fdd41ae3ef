"""Roth et al.'s spectral decay and embedding density, checked against loop references."""

import math

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import testers
from pytorch_metric_learning.distances import CosineSimilarity
from pytorch_metric_learning.utils.inference import CustomKNN
from torch.utils.data import TensorDataset

from pml_crt.utils import (
    AnalysisAccuracyCalculator,
    embedding_density,
    make_accuracy_calculator,
    spectral_decay,
)

ALL_METRICS = (
    "precision_at_1",
    "mean_average_precision_at_r",
    "spectral_decay",
    "embedding_density",
)


# ---------------------------------------------------------------- references
# Plain Python floats (float64) and explicit loops: no torch linear algebra.


def _rows(x):
    return [[float(v) for v in row] for row in x.double().tolist()]


def _jacobi_eigenvalues(a, max_sweeps=100):
    """Eigenvalues of a symmetric matrix by cyclic Jacobi rotations (descending)."""
    n = len(a)
    a = [row[:] for row in a]
    scale = sum(a[i][j] ** 2 for i in range(n) for j in range(n)) or 1.0
    for _ in range(max_sweeps):
        off = sum(a[i][j] ** 2 for i in range(n) for j in range(n) if i != j)
        if off <= 1e-30 * scale:
            break
        for p in range(n - 1):
            for q in range(p + 1, n):
                if a[p][q] == 0.0:
                    continue
                theta = (a[q][q] - a[p][p]) / (2.0 * a[p][q])
                t = (1.0 if theta >= 0 else -1.0) / (abs(theta) + math.sqrt(theta * theta + 1.0))
                c = 1.0 / math.sqrt(t * t + 1.0)
                s = t * c
                for k in range(n):  # A <- A J
                    akp, akq = a[k][p], a[k][q]
                    a[k][p] = c * akp - s * akq
                    a[k][q] = s * akp + c * akq
                for k in range(n):  # A <- J^T A
                    apk, aqk = a[p][k], a[q][k]
                    a[p][k] = c * apk - s * aqk
                    a[q][k] = s * apk + c * aqk
    off = sum(a[i][j] ** 2 for i in range(n) for j in range(n) if i != j)
    assert off <= 1e-24 * scale, "reference Jacobi iteration did not converge"
    return sorted((a[i][i] for i in range(n)), reverse=True)


def _reference_spectral_decay(x, eps=1e-12):
    rows = _rows(x)
    n_rows, dim = len(rows), len(rows[0])
    if n_rows >= dim:  # X^T X
        gram = [
            [sum(rows[k][i] * rows[k][j] for k in range(n_rows)) for j in range(dim)]
            for i in range(dim)
        ]
    else:  # X X^T
        gram = [
            [sum(rows[i][k] * rows[j][k] for k in range(dim)) for j in range(n_rows)]
            for i in range(n_rows)
        ]
    singular = [math.sqrt(max(v, 0.0)) for v in _jacobi_eigenvalues(gram)]
    total = sum(singular)
    n = len(singular)
    rho = 0.0
    for value in singular:
        p = max(value / total, eps)
        rho += (1.0 / n) * math.log((1.0 / n) / p)
    return rho


def _distance(a, b):
    return math.sqrt(sum((u - v) ** 2 for u, v in zip(a, b, strict=True)))


def _mean_pair_distance(points):
    total, pairs = 0.0, 0
    for i in range(len(points)):
        for j in range(len(points)):
            if i != j:
                total += _distance(points[i], points[j])
                pairs += 1
    return total / pairs


def _reference_embedding_density(x, labels):
    rows = _rows(x)
    classes = {}
    for row, label in zip(rows, labels.tolist(), strict=True):
        classes.setdefault(label, []).append(row)
    intra = [_mean_pair_distance(members) for members in classes.values() if len(members) > 1]
    centres = [
        [sum(col) / len(members) for col in zip(*members, strict=True)]
        for members in classes.values()
    ]
    return (sum(intra) / len(intra)) / _mean_pair_distance(centres)


def _clustered(seed=0, classes=5, per_class=7, dim=6, spread=0.7, dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=generator, dtype=torch.float64)
    labels = torch.arange(classes).repeat_interleave(per_class)
    x = centres[labels] + spread * torch.randn(
        len(labels), dim, generator=generator, dtype=torch.float64
    )
    return F.normalize(x, dim=1).to(dtype), labels


# ---------------------------------------------------------------- agreement


def test_reference_jacobi_matches_known_spectrum():
    # The reference itself: eigenvalues of a matrix with a known spectrum.
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=torch.Generator().manual_seed(3)).double())
    known = [9.0, 4.0, 2.5, 1.0, 0.25]
    a = (q @ torch.diag(torch.tensor(known, dtype=torch.float64)) @ q.T).tolist()
    assert _jacobi_eigenvalues(a) == pytest.approx(known, rel=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", [(40, 6), (4, 9), (7, 7)])
def test_spectral_decay_matches_reference(dtype, shape):
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0]), dtype=torch.float64)
    x = (x * torch.linspace(0.2, 2.0, shape[1], dtype=torch.float64)).to(dtype)
    got = spectral_decay(x)
    assert isinstance(got, float)
    assert got == pytest.approx(_reference_spectral_decay(x), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_embedding_density_matches_reference(dtype):
    x, labels = _clustered(dtype=dtype)
    # Uneven classes, a singleton (in the centres, not in pi_intra), unsorted labels.
    labels = torch.cat([labels[:-1], torch.tensor([17])])
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(1))
    x, labels = x[perm], labels[perm]
    got = embedding_density(x, labels)
    assert isinstance(got, float)
    assert got == pytest.approx(_reference_embedding_density(x, labels), rel=1e-9)


def test_blocking_does_not_change_results():
    x, labels = _clustered(classes=4, per_class=9)
    for block_elements in (1, 7, 50):
        assert spectral_decay(x, block_elements=block_elements) == pytest.approx(
            spectral_decay(x), rel=1e-12
        )
        assert embedding_density(x, labels, block_elements=block_elements) == pytest.approx(
            embedding_density(x, labels), rel=1e-12
        )


# ---------------------------------------------------------------- known cases


def test_spectral_decay_hand_computed():
    x = torch.tensor([[3.0, 0.0], [0.0, 1.0]])  # s = (3, 1) -> (0.75, 0.25)
    expected = -math.log(2) - 0.5 * (math.log(0.75) + math.log(0.25))
    assert spectral_decay(x) == pytest.approx(expected, rel=1e-12)


def test_spectral_decay_flat_spectrum_is_zero():
    eye = torch.eye(8)
    x = torch.cat([eye, -eye, 2 * eye])  # every singular value sqrt(6)
    assert spectral_decay(x) == pytest.approx(0.0, abs=1e-12)
    iso = F.normalize(torch.randn(4000, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    rho = spectral_decay(iso)
    # rho (~3e-4) is a difference of terms ~2; 4000-row Gram sums round at ~4000 * 2**-53
    # relative, i.e. ~1e-12 on rho's terms: 1e-6 relative to rho leaves a wide margin.
    assert rho == pytest.approx(_reference_spectral_decay(iso), rel=1e-6) and rho < 1e-3


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_spectral_decay_low_rank_is_large(dtype):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(50, 1, generator=generator, dtype=torch.float64)
    v = torch.randn(1, 8, generator=generator, dtype=torch.float64)
    rank1 = (a @ v).to(dtype)
    w = torch.randn(2, 8, generator=generator, dtype=torch.float64)
    rank2 = (torch.randn(50, 2, generator=generator, dtype=torch.float64) @ w).to(dtype)
    full = torch.randn(50, 8, generator=generator, dtype=torch.float64).to(dtype)
    rho1, rho2, rho_full = spectral_decay(rank1), spectral_decay(rank2), spectral_decay(full)
    assert rho1 > 10.0
    assert rho1 <= -math.log(8 * 1e-12) + 1e-9  # the eps floor bounds it
    assert rho1 > rho2 > 5.0
    assert rho_full == pytest.approx(_reference_spectral_decay(full), rel=1e-9) and rho_full < 0.5


def test_embedding_density_hand_computed():
    x = torch.tensor([[0.0], [2.0], [10.0], [12.0], [20.0]])
    labels = torch.tensor([0, 0, 1, 1, 2])
    # pi_intra = mean(2, 2) = 2 (singleton class 2 has no pairs);
    # centres 1, 11, 20 -> pi_inter = (10 + 19 + 9) / 3.
    assert embedding_density(x, labels) == pytest.approx(2.0 / (38.0 / 3.0), rel=1e-12)


def test_embedding_density_collapsed_classes_is_zero():
    centres = F.normalize(torch.randn(4, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    labels = torch.tensor([0, 1, 2, 3]).repeat(25)
    assert embedding_density(centres[labels], labels) == pytest.approx(0.0, abs=1e-12)
    tight, labels = _clustered(spread=0.05)
    loose, _ = _clustered(spread=2.0)
    assert embedding_density(tight, labels) < embedding_density(loose, labels)


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_clear_errors():
    x = torch.randn(6, 3)
    with pytest.raises(ValueError, match="labels.*at least 2 classes"):
        embedding_density(x, torch.zeros(6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must have shape \(N,\) = \(6,\)"):
        embedding_density(x, torch.tensor([0, 1, 0, 1, 0]))
    with pytest.raises(ValueError, match="labels must have shape"):
        embedding_density(x, torch.zeros(6, 2))
    with pytest.raises(ValueError, match="labels.*2 or more samples"):
        embedding_density(x, torch.arange(6))
    with pytest.raises(ValueError, match="embeddings must be a 2-D"):
        spectral_decay(torch.randn(6))
    with pytest.raises(ValueError, match="embeddings must be a 2-D"):
        embedding_density(torch.randn(6), torch.arange(6) % 2)
    with pytest.raises(ValueError, match="embeddings contains NaN"):
        spectral_decay(torch.tensor([[1.0, float("nan")]]))
    with pytest.raises(ValueError, match="embeddings are all zero"):
        spectral_decay(torch.zeros(4, 3))


# ---------------------------------------------------------------- calculator


class _ForbiddenKNN:
    def __call__(self, *args, **kwargs):
        raise AssertionError("k-NN search was run for metrics that do not need it")


def test_analysis_metrics_need_no_knn():
    calculator = AnalysisAccuracyCalculator(
        include=("spectral_decay", "embedding_density"),
        knn_func=_ForbiddenKNN(),
        device=torch.device("cpu"),
    )
    for name in ("spectral_decay", "embedding_density"):
        assert name not in calculator.requires_knn()
        assert name not in calculator.requires_clustering()
    x, labels = _clustered()
    got = calculator.get_accuracy(x, labels)
    assert got["spectral_decay"] == pytest.approx(spectral_decay(x.float()), rel=1e-12)
    assert got["embedding_density"] == pytest.approx(
        embedding_density(x.float(), labels), rel=1e-12
    )


def test_calculator_with_knn_metrics_and_make_accuracy_calculator():
    x, labels = _clustered(classes=6, per_class=8)
    direct = AnalysisAccuracyCalculator(
        include=ALL_METRICS,
        k="max_bin_count",
        knn_func=CustomKNN(CosineSimilarity(), batch_size=16),
        device=torch.device("cpu"),
    )
    built = make_accuracy_calculator(
        include=ALL_METRICS,
        prefer_faiss=False,
        calculator_class=AnalysisAccuracyCalculator,
        device=torch.device("cpu"),
    )
    assert isinstance(built, AnalysisAccuracyCalculator)
    a, b = direct.get_accuracy(x, labels), built.get_accuracy(x, labels)
    assert set(a) == set(b) == set(ALL_METRICS)
    for name in ALL_METRICS:
        assert a[name] == pytest.approx(b[name], rel=1e-9)
    assert a["embedding_density"] == pytest.approx(
        _reference_embedding_density(x.float(), labels), rel=1e-9
    )


def test_stock_tester_reports_analysis_metrics():
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(6).repeat_interleave(10)
    x = torch.randn(6, 8, generator=generator)[labels] + 0.5 * torch.randn(
        60, 8, generator=generator
    )
    dataset = TensorDataset(x, labels)
    tester = testers.GlobalEmbeddingSpaceTester(
        batch_size=16,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        accuracy_calculator=make_accuracy_calculator(
            include=ALL_METRICS,
            calculator_class=AnalysisAccuracyCalculator,
            device=torch.device("cpu"),
        ),
    )
    accuracies = tester.test(
        {"val": dataset},
        0,
        torch.nn.Identity(),
        torch.nn.Identity(),
        splits_to_eval=[("val", ["val"])],
    )["val"]
    for name in ALL_METRICS:
        assert f"{name}_level0" in accuracies
    normalised = F.normalize(x, dim=1)  # the tester L2-normalises before the metrics
    assert accuracies["spectral_decay_level0"] == pytest.approx(
        _reference_spectral_decay(normalised), rel=1e-6
    )
    assert accuracies["embedding_density_level0"] == pytest.approx(
        _reference_embedding_density(normalised, labels), rel=1e-6
    )


def test_calculator_reports_nan_density_for_a_single_class():
    from pml_crt.utils import AnalysisAccuracyCalculator

    calculator = AnalysisAccuracyCalculator(
        include=("embedding_density",), knn_func=lambda *a: 1 / 0
    )
    x = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    result = calculator.get_accuracy(x, torch.zeros(6, dtype=torch.long))
    assert math.isnan(result["embedding_density"])
