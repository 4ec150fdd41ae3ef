"""The measuring tools of ``benchmarks/perf``: live-tensor memory and FLOP counts."""

import statistics

import pytest
import torch

from benchmarks.perf.common import interleaved_times, summarize
from benchmarks.perf.flops import count_flops, head_matmul_flops
from benchmarks.perf.head_memory import memory_model_fit
from benchmarks.perf.heads import build_head, multihead_specs
from benchmarks.perf.memory import LiveTensorMemory, measure_peak

FLOAT = 4


def test_live_memory_follows_a_known_allocation_pattern():
    with LiveTensorMemory() as mem:
        a = torch.empty(1000)
        assert mem.live == 1000 * FLOAT
        b = torch.empty(2000)
        assert mem.live == 3000 * FLOAT
        del a
        assert mem.live == 2000 * FLOAT
        c = torch.empty(500, dtype=torch.float64)
        assert mem.live == 2000 * FLOAT + 500 * 8
        view = c.view(5, 100)  # a view allocates nothing
        c.add_(1.0)  # nor does an in-place op
        assert mem.live == 2000 * FLOAT + 500 * 8
        del b, c, view
        assert mem.live == 0
    assert mem.peak == 3000 * FLOAT
    assert mem.total == 3000 * FLOAT + 500 * 8


def test_tensors_made_before_entering_are_not_counted():
    outside = torch.ones(10_000)
    with LiveTensorMemory() as mem:
        alias = outside.t()  # a view of an outside storage
        outside.mul_(2)
        assert mem.live == 0
        result = outside + 1
        assert mem.live == 10_000 * FLOAT
        del alias, result
    assert mem.live == 0


def test_tensors_saved_for_backward_stay_counted_until_the_graph_dies():
    x = torch.randn(64, 100, requires_grad=True)
    with LiveTensorMemory() as mem:
        y = x.exp()  # exp saves its result for backward
        z = y.sum()
        del y  # the Python tensor is gone, autograd still holds the storage
        assert mem.live == 64 * 100 * FLOAT + FLOAT
        z.backward()  # frees the graph; x.grad (64 x 100) is new
        del z
        assert mem.live == 64 * 100 * FLOAT
    x.grad = None
    assert mem.live == 0


def test_linear_forward_backward_peak():
    """Linear(100, 100) + ReLU + sum on (64, 100): the peak is known exactly."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(100, 100)
    x = torch.randn(64, 100, requires_grad=True)
    act = 64 * 100 * FLOAT

    def step():
        return linear(x).relu().sum().backward()

    result = measure_peak(step)
    # After backward: weight, bias and input gradients remain.
    assert result["end"] == 100 * 100 * FLOAT + 100 * FLOAT + act
    # Peak (in backward): relu's saved output, the incoming gradient, the
    # gradient through ReLU and the gradients being produced.
    assert act * 2 <= result["peak"] <= 100 * 100 * FLOAT + 100 * FLOAT + 4 * act


def test_crt_flops_match_the_hand_formula():
    B, C, side, K, D = 2, 24, 3, 5, 7
    N, d = side * side, C  # d = min(C, 512)
    x = torch.randn(B, C, side, side, requires_grad=True)
    head = build_head("crt", C, K, D)
    forward = count_flops(lambda: head(x))
    # projection, X P^T, A^T X, fusion, the GeM branch's Linear: one multiply-add = 2 FLOPs.
    coded = 2 * B * N * C * d + 2 * B * N * d * K + 2 * B * K * N * d + 2 * B * K * d * D
    by_hand = coded + 2 * B * C * D
    assert forward == by_hand == head_matmul_flops("crt", B=B, N=N, C=C, K=K, D=D)
    both = count_flops(lambda: head(x).sum().backward())
    assert both == 3 * by_hand == head_matmul_flops("crt", B=B, N=N, C=C, K=K, D=D, backward=True)


@pytest.mark.parametrize("name", ["avg", "gem", "netvlad", "crt_sum", "multihead"])
def test_other_heads_flops_match_their_formulas(name):
    B, C, side, K, D = 2, 24, 3, 6, 8
    x = torch.randn(B, C, side, side, requires_grad=True)
    head = build_head(name, C, K, D)
    counted = count_flops(lambda: head(x).sum().backward())
    formula = head_matmul_flops(
        name, B=B, N=side * side, C=C, K=K, D=D, heads=multihead_specs(K, D), backward=True
    )
    assert counted == formula


def test_interleaved_times_runs_every_function_every_round():
    calls = []
    times = interleaved_times({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, 3)
    assert calls.count("a") == calls.count("b") == 4  # 1 warm-up + 3 rounds
    assert calls[2:4] == ["a", "b"] and calls[4:6] == ["b", "a"]  # rotating order
    summary = summarize(times["a"])
    assert summary["n"] == 3
    assert summary["median_s"] == statistics.median(times["a"][summary["clock"]])


def test_memory_model_fit_recovers_known_coefficients():
    points = [
        {"B": b, "N": n, "K": k, "d": 8, "bytes": 4 * b * n * k + 12 * b * k * 8 + 100}
        for b in (1, 2, 4)
        for n in (4, 9, 16)
        for k in (2, 8)
    ]
    fit = memory_model_fit(points, "bytes", ["B*N*K", "B*K*d", "1"])
    assert fit["bytes_per_element"] == pytest.approx([4, 12, 100], rel=1e-6)
    assert fit["r2"] == pytest.approx(1.0)
