"""The similarity-consistency term: functional, loss and regularizer."""

from __future__ import annotations

import math
from itertools import combinations

import pytest
import torch
from pytorch_metric_learning.distances import (
    CosineSimilarity,
    DotProductSimilarity,
    LpDistance,
)
from pytorch_metric_learning.losses import ContrastiveLoss
from pytorch_metric_learning.reducers import DivisorReducer, MeanReducer, ThresholdReducer

from pml_crt.consistency import similarity_consistency, similarity_consistency_rows
from pml_crt.losses import MultiHeadLoss, SimilarityConsistencyLoss
from pml_crt.regularizers import SimilarityConsistencyRegularizer
from pml_crt.utils.validation import NonFiniteError

MODES = ("mse", "l1", "kl")
SIZES = [5, 3, 4]


# --------------------------------------------------------------------------- reference


def _cosine(u: list[float], v: list[float]) -> float:
    dot = sum(a * b for a, b in zip(u, v, strict=True))
    return dot / (math.sqrt(sum(a * a for a in u)) * math.sqrt(sum(b * b for b in v)))


def _dot(u: list[float], v: list[float]) -> float:
    return sum(a * b for a, b in zip(u, v, strict=True))


def _euclidean(u: list[float], v: list[float]) -> float:
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(u, v, strict=True)))


REFERENCE_SIMILARITIES = {
    "cosine": (_cosine, True, CosineSimilarity),
    "dot": (_dot, True, lambda: DotProductSimilarity(normalize_embeddings=False)),
    "l2": (_euclidean, False, lambda: LpDistance(normalize_embeddings=False)),
}


def _softmax(row: list[float]) -> list[float]:
    top = max(row)
    exps = [math.exp(v - top) for v in row]
    total = sum(exps)
    return [e / total for e in exps]


def reference(
    embeddings: torch.Tensor,
    sizes: list[int],
    ref: torch.Tensor | None = None,
    mode: str = "mse",
    similarity: str = "cosine",
    temperature: float = 0.1,
    stop_gradient: str | None = None,
    include_diagonal: bool = False,
) -> float:
    """Slow loop-by-loop version of the consistency term, in Python floats."""
    func, is_similarity, _ = REFERENCE_SIMILARITIES[similarity]
    rows = embeddings.double().tolist()
    ref_rows = rows if ref is None else ref.double().tolist()
    starts = [sum(sizes[:h]) for h in range(len(sizes))]

    def head(row: list[float], h: int) -> list[float]:
        return row[starts[h] : starts[h] + sizes[h]]

    def columns(i: int) -> list[int]:
        return [j for j in range(len(ref_rows)) if ref is not None or include_diagonal or j != i]

    matrices = []
    for h in range(len(sizes)):
        matrix = [
            [func(head(rows[i], h), head(ref_rows[j], h)) for j in columns(i)]
            for i in range(len(rows))
        ]
        matrices.append(matrix)

    pair_values = []
    for a, b in combinations(range(len(sizes)), 2):
        teacher, student = a, b
        if stop_gradient == "larger" and sizes[b] > sizes[a]:
            teacher, student = b, a
        target, other = matrices[teacher], matrices[student]
        if mode in ("mse", "l1"):
            total, count = 0.0, 0
            for i in range(len(target)):
                for j in range(len(target[i])):
                    diff = target[i][j] - other[i][j]
                    total += diff * diff if mode == "mse" else abs(diff)
                    count += 1
            pair_values.append(total / count)
        else:
            sign = 1.0 if is_similarity else -1.0
            kl_rows = []
            for i in range(len(target)):
                p = _softmax([sign * v / temperature for v in target[i]])
                q = _softmax([sign * v / temperature for v in other[i]])
                kl_rows.append(
                    sum(pj * (math.log(pj) - math.log(qj)) for pj, qj in zip(p, q, strict=True))
                )
            pair_values.append(sum(kl_rows) / len(kl_rows))
    return sum(pair_values) / len(pair_values)


def _embeddings(batch: int = 6, sizes=SIZES, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, sum(sizes), generator=generator, dtype=dtype)


# --------------------------------------------------------------------------- values


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("similarity", sorted(REFERENCE_SIMILARITIES))
@pytest.mark.parametrize("include_diagonal", [False, True])
def test_matches_reference(dtype, tol, mode, similarity, include_diagonal):
    x = _embeddings(dtype=dtype)
    distance = REFERENCE_SIMILARITIES[similarity][2]()
    temperature = 0.5 if similarity == "cosine" else 4.0
    value = similarity_consistency(
        x,
        SIZES,
        mode=mode,
        distance=distance,
        temperature=temperature,
        include_diagonal=include_diagonal,
    )
    expected = reference(
        x,
        SIZES,
        mode=mode,
        similarity=similarity,
        temperature=temperature,
        include_diagonal=include_diagonal,
    )
    assert value.dtype == dtype and value.dim() == 0
    assert value.item() == pytest.approx(expected, rel=tol, abs=tol)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stop_gradient", [None, "first", "larger"])
@pytest.mark.parametrize("sizes", [[5, 3, 4], [3, 6], [4, 4]])
def test_stop_gradient_value_matches_reference(mode, stop_gradient, sizes):
    x = _embeddings(sizes=sizes)
    value = similarity_consistency(x, sizes, mode=mode, stop_gradient=stop_gradient)
    expected = reference(x, sizes, mode=mode, stop_gradient=stop_gradient)
    assert value.item() == pytest.approx(expected, rel=1e-10, abs=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_default_temperature_and_mode(mode):
    x = _embeddings()
    assert similarity_consistency(x, SIZES).item() == pytest.approx(
        reference(x, SIZES, mode="kl"), rel=1e-10
    )
    assert similarity_consistency(x, SIZES, mode=mode).item() == pytest.approx(
        reference(x, SIZES, mode=mode, temperature=0.1), rel=1e-10
    )


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("similarity", ["cosine", "l2"])
def test_ref_embeddings_matches_reference(mode, similarity):
    x = _embeddings(batch=5)
    ref = _embeddings(batch=7, seed=1)
    distance = REFERENCE_SIMILARITIES[similarity][2]()
    value = similarity_consistency(
        x, SIZES, ref_embeddings=ref, mode=mode, distance=distance, temperature=0.5
    )
    expected = reference(x, SIZES, ref, mode=mode, similarity=similarity, temperature=0.5)
    assert value.item() == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("mode", MODES)
def test_ref_equal_to_embeddings_is_the_self_term_with_diagonal(mode):
    x = _embeddings()
    with_ref = similarity_consistency(x, SIZES, ref_embeddings=x.clone(), mode=mode)
    self_term = similarity_consistency(x, SIZES, mode=mode, include_diagonal=True)
    torch.testing.assert_close(with_ref, self_term)


# --------------------------------------------------------------------------- per-sample rows


def reference_rows(
    embeddings: torch.Tensor,
    sizes: list[int],
    ref: torch.Tensor | None = None,
    mode: str = "kl",
    temperature: float = 0.1,
) -> tuple[list[float], list[float]]:
    """Per-sample cosine term in Python floats, and a float rounding bound per row (in eps).

    Row ``i`` is the mean over head pairs ``a < b`` of ``mean_j (S_a - S_b)^2``
    (mse), ``mean_j |S_a - S_b|`` (l1) or ``KL(P_a[i] || P_b[i])`` (kl), ``S``
    without the diagonal when there is no ``ref``.

    The bound is first order in the machine epsilon ``eps`` of the computation
    (returned in units of eps): a cosine of normalised ``d``-vectors is off by
    at most ``s = (d + 4) eps``; a difference of two by ``2 s``. mse: the square
    of a difference ``D`` is off by ``2 |D| 2s + eps D^2``; l1: ``2 s + eps |D|``.
    kl: a logit ``S / T`` is off by ``(s + eps) / T``, a log-softmax entry by
    ``l = 2 (s + eps) / T + (2 + log n)(1 + 1/T) eps``, and a KL row
    ``sum_j p_j (lp_j - lq_j)`` by ``2 l + l max_j |lp_j - lq_j|`` (``p`` moves
    by ``p l``). Every mean or sum of ``n`` terms adds ``(n + 3) eps`` times the
    sum of ``|terms|``. The bound is doubled for second-order terms.
    """
    rows = embeddings.double().tolist()
    ref_rows = rows if ref is None else ref.double().tolist()
    starts = [sum(sizes[:h]) for h in range(len(sizes))]

    def head(row: list[float], h: int) -> list[float]:
        return row[starts[h] : starts[h] + sizes[h]]

    def columns(i: int) -> list[int]:
        return [j for j in range(len(ref_rows)) if ref is not None or j != i]

    matrices = [
        [
            [_cosine(head(rows[i], h), head(ref_rows[j], h)) for j in columns(i)]
            for i in range(len(rows))
        ]
        for h in range(len(sizes))
    ]
    sim_error = max(sizes) + 4  # in eps
    pairs = list(combinations(range(len(sizes)), 2))
    values, bounds = [0.0] * len(rows), [0.0] * len(rows)
    for a, b in pairs:
        for i in range(len(rows)):
            sa, sb = matrices[a][i], matrices[b][i]
            n = len(sa)
            if mode in ("mse", "l1"):
                diffs = [x - y for x, y in zip(sa, sb, strict=True)]
                terms = [d * d if mode == "mse" else abs(d) for d in diffs]
                if mode == "mse":
                    term_error = sum(4 * abs(d) * sim_error + d * d for d in diffs) / n
                else:
                    term_error = 2 * sim_error + sum(abs(d) for d in diffs) / n
                value = sum(terms) / n
            else:
                lp = [math.log(v) for v in _softmax([v / temperature for v in sa])]
                lq = [math.log(v) for v in _softmax([v / temperature for v in sb])]
                terms = [math.exp(x) * (x - y) for x, y in zip(lp, lq, strict=True)]
                log_error = 2 * (sim_error + 1) / temperature + (2 + math.log(n)) * (
                    1 + 1 / temperature
                )
                term_error = 2 * log_error + log_error * max(
                    abs(x - y) for x, y in zip(lp, lq, strict=True)
                )
                value = sum(terms)
            values[i] += value / len(pairs)
            sum_error = (n + 3) * sum(abs(t) for t in terms) / (n if mode != "kl" else 1)
            bounds[i] += 2 * (term_error + sum_error) / len(pairs)
    return values, bounds


def _close(actual: float, expected: float, bound_in_eps: float, dtype: torch.dtype) -> bool:
    return abs(actual - expected) <= bound_in_eps * torch.finfo(dtype).eps


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("with_ref", [False, True], ids=["self", "ref"])
def test_rows_match_reference_and_the_mean_reducer_gives_the_mean(dtype, mode, with_ref):
    x = _embeddings(batch=7, dtype=dtype)
    ref = _embeddings(batch=5, dtype=dtype, seed=1) if with_ref else None
    expected, bounds = reference_rows(x, SIZES, ref, mode=mode, temperature=0.1)

    rows = similarity_consistency_rows(x, SIZES, ref_embeddings=ref, mode=mode)
    assert rows.shape == (7,) and rows.dtype == dtype
    for value, want, bound in zip(rows.tolist(), expected, bounds, strict=True):
        assert _close(value, want, bound, dtype), (value, want, bound)

    # PML's element losses: one per sample, indexed by row, divisor = rows.
    loss = SimilarityConsistencyLoss(SIZES, mode=mode)
    info = loss.compute_loss(x, None, None, x if ref is None else ref, None)["loss"]
    assert info["reduction_type"] == "element" and info["divisor"] == 7
    torch.testing.assert_close(info["indices"], torch.arange(7))
    torch.testing.assert_close(info["losses"], rows, rtol=0, atol=0)
    regularizer = SimilarityConsistencyRegularizer(SIZES, mode=mode)
    if ref is None:
        torch.testing.assert_close(regularizer.compute_loss(x)["loss"]["losses"], rows)

    # The default MeanReducer gives the mean of the rows: the value as before
    # (the mean over pairs of each pair's mean), checked against the loop reference.
    mean_bound = sum(bounds) / len(bounds) + (len(bounds) + 3) * max(expected)  # + the mean's
    mean = sum(expected) / len(expected)
    assert abs(reference(x, SIZES, ref, mode=mode) - mean) <= 1e-12 * max(1.0, mean)
    for value in (
        loss(x, ref_emb=ref),
        similarity_consistency(x, SIZES, ref_embeddings=ref, mode=mode),
        regularizer(x) if ref is None else loss(x, ref_emb=ref),
    ):
        assert value.dim() == 0
        assert _close(value.item(), mean, mean_bound, dtype), (value.item(), mean)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("mode", MODES)
def test_threshold_and_divisor_reducers_act_on_the_rows(dtype, mode):
    x = _embeddings(batch=9, dtype=dtype, seed=3)
    expected, bounds = reference_rows(x, SIZES, mode=mode, temperature=0.1)
    ordered = sorted(expected)
    # A threshold halfway between two rows, farther from both than their rounding bound.
    gaps = [(ordered[k + 1] - ordered[k], k) for k in range(2, len(ordered) - 2)]
    _, k = max(gaps)
    low = (ordered[k] + ordered[k + 1]) / 2
    eps = torch.finfo(dtype).eps
    assert all(abs(v - low) > b * eps for v, b in zip(expected, bounds, strict=True))
    kept = [(v, b) for v, b in zip(expected, bounds, strict=True) if v > low]
    assert 0 < len(kept) < len(expected)
    kept_mean = sum(v for v, _ in kept) / len(kept)
    kept_bound = sum(b for _, b in kept) / len(kept) + (len(kept) + 3) * max(expected)

    for module in (
        SimilarityConsistencyLoss(SIZES, mode=mode, reducer=ThresholdReducer(low=low)),
        SimilarityConsistencyRegularizer(SIZES, mode=mode, reducer=ThresholdReducer(low=low)),
    ):
        value = module(x)
        assert _close(value.item(), kept_mean, kept_bound, dtype), (value.item(), kept_mean)

    divisor_loss = SimilarityConsistencyLoss(
        SIZES, mode=mode, reducer=DivisorReducer(collect_stats=True)
    )
    value = divisor_loss(x)
    assert divisor_loss.reducer.divisor == 9  # sum of the rows / their number: the mean
    mean = sum(expected) / len(expected)
    mean_bound = sum(bounds) / 9 + 12 * max(expected)
    assert _close(value.item(), mean, mean_bound, dtype)

    # MultiHeadLoss calls the consistency loss, so its reducer acts there too.
    labels = torch.arange(3).repeat(3)
    multi = MultiHeadLoss(
        ContrastiveLoss(),
        SIZES,
        consistency={"mode": mode, "reducer": ThresholdReducer(low=low)},
        collect_stats=True,
    )
    multi(x, labels)
    assert _close(multi.consistency_loss.item(), kept_mean, kept_bound, dtype)
    mean_multi = MultiHeadLoss(
        ContrastiveLoss(), SIZES, consistency={"mode": mode, "reducer": MeanReducer()}
    )
    total = mean_multi(x, labels)
    heads = sum(ContrastiveLoss()(z, labels) for z in torch.split(x, SIZES, dim=1))
    # The subtraction adds the rounding of the total and of the head losses.
    bound = mean_bound + 4 * (abs(total.item()) + abs(heads.item()))
    assert _close((total - heads).item(), mean, bound, dtype)


# --------------------------------------------------------------------------- properties


@pytest.mark.parametrize("mode", MODES)
def test_zero_when_heads_agree_up_to_scale_rotation_and_padding(mode):
    z = _embeddings(batch=8, sizes=[4])
    rotation, _ = torch.linalg.qr(torch.randn(4, 4, dtype=torch.float64))
    padded = torch.cat([2.5 * z, torch.zeros(8, 3, dtype=torch.float64)], dim=1)
    x = torch.cat([z, 0.3 * z @ rotation, padded], dim=1)
    value = similarity_consistency(x, [4, 4, 7], mode=mode)
    assert value.item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("mode", MODES)
def test_batch_permutation_invariant(mode):
    x = _embeddings(batch=9)
    permutation = torch.randperm(9, generator=torch.Generator().manual_seed(0))
    permuted = similarity_consistency(x[permutation], SIZES, mode=mode)
    assert permuted.item() == pytest.approx(reference(x, SIZES, mode=mode), rel=1e-10)


@pytest.mark.parametrize("mode", ["mse", "l1"])
def test_symmetric_modes_do_not_depend_on_head_order(mode):
    x = _embeddings(sizes=[5, 3])
    swapped = torch.cat([x[:, 5:], x[:, :5]], dim=1)
    torch.testing.assert_close(
        similarity_consistency(x, [5, 3], mode=mode),
        similarity_consistency(swapped, [3, 5], mode=mode),
    )


def test_kl_direction_is_first_head_as_target():
    x = _embeddings(sizes=[5, 3])
    swapped = torch.cat([x[:, 5:], x[:, :5]], dim=1)
    forward = similarity_consistency(x, [5, 3], mode="kl")
    backward = similarity_consistency(swapped, [3, 5], mode="kl")
    assert forward.item() == pytest.approx(reference(x, [5, 3], mode="kl"), rel=1e-10)
    assert not torch.allclose(forward, backward)
    # "larger" makes the wider head the target whatever its position.
    torch.testing.assert_close(
        similarity_consistency(swapped, [3, 5], mode="kl", stop_gradient="larger"), forward
    )


# --------------------------------------------------------------------------- gradients


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("include_diagonal", [False, True])
def test_gradcheck(mode, include_diagonal):
    x = _embeddings(batch=5).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda e: similarity_consistency(
            e, SIZES, mode=mode, temperature=0.5, include_diagonal=include_diagonal
        ),
        (x,),
    )


@pytest.mark.parametrize("mode", MODES)
def test_gradcheck_with_ref_embeddings(mode):
    x = _embeddings(batch=4).requires_grad_()
    ref = _embeddings(batch=5, seed=3).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda e, r: similarity_consistency(e, SIZES, ref_embeddings=r, mode=mode, temperature=0.5),
        (x, ref),
    )


def _grads(x: torch.Tensor, sizes: list[int], **kwargs) -> list[torch.Tensor]:
    x = x.clone().requires_grad_()
    similarity_consistency(x, sizes, **kwargs).backward()
    return list(torch.split(x.grad, sizes, dim=1))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes", [[5, 3], [5, 3, 4], [5, 3, 4, 6]])
def test_stop_gradient_first_detaches_the_primary_head_only(mode, sizes):
    """Only head 0's matrix is detached: every other head gets exactly the gradient it
    gets with no stop-gradient, including its share from the pairs between two other
    heads, where both sides keep their gradients."""
    x = _embeddings(sizes=sizes)
    free = _grads(x, sizes, mode=mode)
    stopped = _grads(x, sizes, mode=mode, stop_gradient="first")
    assert torch.count_nonzero(stopped[0]) == 0 and torch.count_nonzero(free[0]) > 0
    for h in range(1, len(sizes)):
        torch.testing.assert_close(stopped[h], free[h], rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("sizes, teacher", [([3, 6], 1), ([6, 3], 0), ([4, 4], 0)])
def test_stop_gradient_larger_detaches_the_wider_head(mode, sizes, teacher):
    x = _embeddings(sizes=sizes)
    grads = _grads(x, sizes, mode=mode, stop_gradient="larger")
    assert torch.count_nonzero(grads[teacher]) == 0
    assert torch.count_nonzero(grads[1 - teacher]) > 0
    if mode != "kl" or teacher == 0:  # same target direction as stop_gradient=None
        torch.testing.assert_close(grads[1 - teacher], _grads(x, sizes, mode=mode)[1 - teacher])


# --------------------------------------------------------------------------- loss / regularizer


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("stop_gradient", [None, "larger"])
def test_loss_regularizer_and_functional_agree(mode, stop_gradient):
    x = _embeddings(batch=8, dtype=torch.float32)
    labels = torch.arange(4).repeat(2)
    options = dict(mode=mode, temperature=0.2, stop_gradient=stop_gradient)
    expected = similarity_consistency(x, SIZES, **options)
    loss = SimilarityConsistencyLoss(SIZES, **options)
    regularizer = SimilarityConsistencyRegularizer(SIZES, **options)
    torch.testing.assert_close(loss(x), expected)
    torch.testing.assert_close(loss(x, labels), expected)
    torch.testing.assert_close(regularizer(x), expected)


def test_loss_and_regularizer_pass_distance_and_diagonal_options():
    x = _embeddings(batch=6)
    distance_options = dict(
        distance=DotProductSimilarity(normalize_embeddings=False),
        include_diagonal=True,
        mode="mse",
    )
    expected = reference(x, SIZES, similarity="dot", include_diagonal=True)
    assert SimilarityConsistencyLoss(SIZES, **distance_options)(x).item() == pytest.approx(
        expected, rel=1e-10
    )
    assert SimilarityConsistencyRegularizer(SIZES, **distance_options)(x).item() == pytest.approx(
        expected, rel=1e-10
    )
    assert isinstance(SimilarityConsistencyLoss(SIZES).distance, CosineSimilarity)
    assert isinstance(SimilarityConsistencyRegularizer(SIZES).distance, CosineSimilarity)


def test_loss_with_ref_emb_uses_the_cross_matrix():
    x, ref = _embeddings(batch=5), _embeddings(batch=7, seed=2)
    loss = SimilarityConsistencyLoss(SIZES)
    torch.testing.assert_close(
        loss(x, ref_emb=ref), similarity_consistency(x, SIZES, ref_embeddings=ref)
    )
    # ref_emb given as the very same tensor means "no ref_emb" (PML's convention).
    torch.testing.assert_close(loss(x, ref_emb=x), similarity_consistency(x, SIZES))


def test_regularizer_inside_a_pml_loss():
    x = _embeddings(batch=8, dtype=torch.float32)
    labels = torch.arange(4).repeat(2)
    regularizer = SimilarityConsistencyRegularizer(SIZES)
    regularized = ContrastiveLoss(embedding_regularizer=regularizer, embedding_reg_weight=0.5)
    assert "embedding_reg_loss" in regularized.sub_loss_names()
    expected = ContrastiveLoss()(x, labels) + 0.5 * similarity_consistency(x, SIZES)
    torch.testing.assert_close(regularized(x, labels), expected)


def test_loss_has_an_embedding_regularizer_and_records_hyperparameters():
    x = _embeddings(batch=8, dtype=torch.float32)
    loss = SimilarityConsistencyLoss(
        SIZES,
        temperature=0.3,
        embedding_regularizer=SimilarityConsistencyRegularizer(SIZES, mode="l1"),
        embedding_reg_weight=2.0,
    )
    expected = similarity_consistency(x, SIZES, temperature=0.3) + 2.0 * similarity_consistency(
        x, SIZES, mode="l1"
    )
    torch.testing.assert_close(loss(x), expected)
    for name in ("num_heads", "temperature", "include_diagonal"):
        assert name in loss._record_these
    assert loss.num_heads == 3 and loss.temperature == 0.3


def test_backward_through_loss_reaches_every_head():
    x = _embeddings(batch=6, dtype=torch.float32).requires_grad_()
    SimilarityConsistencyLoss(SIZES)(x).backward()
    assert all(torch.count_nonzero(g) > 0 for g in torch.split(x.grad, SIZES, dim=1))


# --------------------------------------------------------------------------- errors


def test_single_head_is_an_error():
    x = _embeddings(sizes=[8])
    with pytest.raises(ValueError, match="at least 2 heads"):
        similarity_consistency(x, [8])
    with pytest.raises(ValueError, match="at least 2 heads"):
        SimilarityConsistencyLoss([8])
    with pytest.raises(ValueError, match="at least 2 heads"):
        SimilarityConsistencyRegularizer([8])


@pytest.mark.parametrize(
    "x, match",
    [
        (torch.randn(6, 11), r"embeddings must have shape \(B, 12\)"),
        (torch.randn(12), r"embeddings must have shape \(B, 12\)"),
        (torch.randn(2, 6, 12), r"embeddings must have shape \(B, 12\)"),
        (torch.randn(1, 12), "at least 2 rows"),
        (torch.ones(6, 12, dtype=torch.long), "floating-point"),
    ],
)
def test_bad_embeddings(x, match):
    with pytest.raises((ValueError, TypeError), match=match):
        similarity_consistency(x, SIZES)
    with pytest.raises((ValueError, TypeError), match=match):
        SimilarityConsistencyLoss(SIZES)(x)
    with pytest.raises((ValueError, TypeError), match=match):
        SimilarityConsistencyRegularizer(SIZES)(x)


def test_non_finite_embeddings_are_rejected_only_with_check_inputs():
    # The value check reads back to the host (a device synchronisation): opt-in.
    x = torch.randn(6, 12)
    x[2, 3] = float("nan")
    with pytest.raises(NonFiniteError, match="embeddings contains NaN"):
        similarity_consistency(x, SIZES, check_inputs=True)
    with pytest.raises(NonFiniteError, match="embeddings contains NaN"):
        SimilarityConsistencyLoss(SIZES, check_inputs=True)(x)
    with pytest.raises(NonFiniteError, match="embeddings contains NaN"):
        SimilarityConsistencyRegularizer(SIZES, check_inputs=True)(x)
    with pytest.raises(NonFiniteError, match="ref_embeddings contains NaN"):
        similarity_consistency(torch.randn(6, 12), SIZES, ref_embeddings=x, check_inputs=True)
    assert torch.isnan(similarity_consistency(x, SIZES))
    assert torch.isnan(SimilarityConsistencyLoss(SIZES)(x))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="embeddings must be a torch.Tensor"):
        similarity_consistency([[0.0] * 12] * 3, SIZES)


def test_bad_ref_embeddings():
    x = _embeddings()
    with pytest.raises(ValueError, match=r"ref_embeddings must have shape \(B, 12\)"):
        similarity_consistency(x, SIZES, ref_embeddings=torch.randn(4, 10, dtype=x.dtype))
    with pytest.raises(ValueError, match="at least 1 row"):
        similarity_consistency(x, SIZES, ref_embeddings=torch.zeros(0, 12, dtype=x.dtype))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(mode="l2"), ValueError, "mode must be one of"),
        (dict(stop_gradient="smaller"), ValueError, "stop_gradient must be one of"),
        (dict(temperature=0.0), ValueError, "temperature must be a finite number > 0"),
        (dict(temperature=-1), ValueError, "temperature must be a finite number > 0"),
        (dict(distance="cosine"), TypeError, "distance must be a pytorch_metric_learning"),
    ],
)
def test_bad_options(kwargs, error, match):
    with pytest.raises(error, match=match):
        similarity_consistency(_embeddings(), SIZES, **kwargs)
    with pytest.raises(error, match=match):
        SimilarityConsistencyLoss(SIZES, **kwargs)
    with pytest.raises(error, match=match):
        SimilarityConsistencyRegularizer(SIZES, **kwargs)


@pytest.mark.parametrize(
    "sizes, error",
    [(8, TypeError), ([], ValueError), ([4, 0], ValueError), ([4, 2.0], ValueError)],
)
def test_bad_embedding_sizes(sizes, error):
    with pytest.raises(error, match="embedding_sizes"):
        similarity_consistency(torch.randn(4, 8), sizes)
    with pytest.raises(error, match="embedding_sizes"):
        SimilarityConsistencyLoss(sizes)
