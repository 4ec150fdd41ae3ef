"""What an embedding head costs: time, FLOP/s and peak memory of forward + backward.

Usage::

    python -m benchmarks.perf.head_cost [--quick] [--out benchmarks/results/perf]

Heads (``pml_crt.models``), all mapping a ``(B, C, H, W)`` feature map to
``(B, D)``, with the projection width ``d = min(C, 512)`` (the default):

- ``avg``: ``GlobalPoolEmbedder(C, D)`` (average pooling + Linear, the MLRC head);
- ``gem``: ``GlobalPoolEmbedder(C, D, pooling="gem")``;
- ``netvlad``: ``NetVLAD(C, D, K)``;
- ``crt``: ``CRT(C, D, K)`` (default options: ``fusion="flatten"``, one
  ``Linear(K*d, D)``, and a GeM branch);
- ``crt_sum``: ``CRT(C, D, K, fusion="sum")`` (one ``Linear(d, D)`` shared by
  the prototypes, then summed), for comparison;
- ``multihead``: ``MultiHeadCRT(C, heads=((K, D), (K // 2, D // 4)))``, which
  at the base point is the default ``((64, 512), (32, 128))``.

Grid: one factor at a time around the base point ``B=32, N=7x7, C=1280,
K=64, D=512`` (MobileNetV2's 7x7x1280 map at 224 px). At every point each
head's forward + backward (``head(x).sum().backward()``, the input requiring
a gradient as when the trunk trains) is timed side by side with the others
and with a plain square ``matmul`` of the same FLOP count, in rotating order
(:func:`benchmarks.perf.common.interleaved_times`); the report uses medians
and ratios of medians.

- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` (exact for matrix
  products; element-wise work is not counted), checked against the hand
  formulas of :mod:`benchmarks.perf.flops`.
- Peak memory: :class:`benchmarks.perf.memory.LiveTensorMemory` (bytes of
  live tensor storages created during forward + backward, parameter
  gradients included; inputs and parameters excluded). Extra memory-only
  sweeps over ``N`` and ``K`` for CRT check the ``O(B*N*K + B*K*d)`` claim.
- Trunk: one MobileNetV2 training step (``FeatureMapTrunk("mobilenet_v2")``,
  random weights, 224 px, SGD with momentum) is timed side by side with the
  default heads at the same batch, giving each head's share of a step.
- Input check: the cost of ``torch.isfinite(x).all()`` (what the heads run
  on every forward) against a single-pass ``torch.aminmax`` check.
- Allocator: CRT's step in fresh processes with the default glibc allocator,
  with ``THP_MEM_ALLOC_ENABLE=1`` (PyTorch's transparent huge pages) and with
  ``MALLOC_MMAP_THRESHOLD_`` raised, counting minor page faults per step.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .common import DEFAULT_OUT, REPO_ROOT, Run, interleaved_times, load_average, summarize
from .flops import count_flops, head_matmul_flops
from .head_memory import forward_bytes, memory_model_fit, memory_sweeps
from .heads import HEADS, build_head, feature_map, multihead_specs, train_step
from .memory import measure_peak

BASE = {"B": 32, "side": 7, "C": 1280, "K": 64, "D": 512}
SWEEPS = {
    "B": [8, 32, 128],
    "side": [7, 14, 28],
    "C": [256, 512, 1280, 2048],
    "K": [8, 16, 32, 64, 128],
    "D": [128, 512, 1024],
}
MEMORY_SWEEPS = {"side": [4, 7, 10, 14, 20, 28], "K": [8, 16, 32, 64, 128, 256]}
QUICK_BASE = {"B": 8, "side": 7, "C": 1280, "K": 64, "D": 512}
QUICK_SWEEPS = {"B": [8, 16], "side": [7, 14], "C": [512, 1280], "K": [16, 64], "D": [128, 512]}
QUICK_MEMORY_SWEEPS = {"side": [4, 7, 14], "K": [16, 64, 128]}

ALLOCATOR_SETTINGS = {
    "default": {},
    "THP_MEM_ALLOC_ENABLE=1": {"THP_MEM_ALLOC_ENABLE": "1"},
    "MALLOC_MMAP_THRESHOLD_=1GiB": {
        "MALLOC_MMAP_THRESHOLD_": str(2**30),
        "MALLOC_TRIM_THRESHOLD_": str(2**32),
    },
}

MODULE = "benchmarks.perf.head_cost"


def matched_matmul(flops: float, seed: int = 0) -> tuple[Callable[[], Any], int]:
    """A square ``n x n`` matmul with ``2 n^3`` closest to ``flops``, and its FLOPs."""
    n = max(8, round((flops / 2) ** (1 / 3)))
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=generator)
    b = torch.randn(n, n, generator=generator)
    return (lambda: a @ b), 2 * n**3


def minor_faults() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def rounds_for(fns: dict[str, Callable[[], Any]], budget_s: float, lo: int, hi: int) -> int:
    """Rounds that fit ``budget_s`` after one timed warm-up round, within ``[lo, hi]``."""
    start = time.perf_counter()
    for fn in fns.values():
        fn()
    per_round = time.perf_counter() - start
    return int(min(hi, max(lo, budget_s // max(per_round, 1e-9))))


def measure_point(point: dict[str, int], budget_s: float, rounds: tuple[int, int]) -> dict:
    """Time, FLOPs and memory of every head at one grid point."""
    B, side, C, K, D = (point[k] for k in ("B", "side", "C", "K", "D"))
    N = side * side
    torch.manual_seed(0)
    x = feature_map(B, C, side)
    heads = {name: build_head(name, C, K, D) for name in HEADS}
    steps = {name: train_step(head, x) for name, head in heads.items()}
    result: dict[str, Any] = {"point": dict(point), "N": N, "d": min(C, 512), "heads": {}}
    fns: dict[str, Callable[[], Any]] = {}
    for name, step in steps.items():
        step()  # warm-up outside the counters
        flops = count_flops(step)
        formula = head_matmul_flops(
            name, B=B, N=N, C=C, K=K, D=D, heads=multihead_specs(K, D), backward=True
        )
        memory = measure_peak(step)
        saved = forward_bytes(heads[name], x)
        mm, mm_flops = matched_matmul(flops)
        fns[name] = step
        fns[f"matmul:{name}"] = mm
        result["heads"][name] = {
            "flops": flops,
            "flops_formula": formula,
            "matmul_flops": mm_flops,
            "peak_bytes": memory["peak"],
            "forward_bytes": saved,
            "allocated_bytes": memory["total"],
            "parameters": sum(p.numel() for p in heads[name].parameters()),
        }
    n_rounds = rounds_for(fns, budget_s, *rounds)
    faults_before = minor_faults()
    times = interleaved_times(fns, n_rounds, warmup=0)
    result["minor_faults_per_round"] = (minor_faults() - faults_before) / n_rounds
    for name in HEADS:
        entry = result["heads"][name]
        head_t = summarize(times[name])
        mm_t = summarize(times[f"matmul:{name}"])
        entry["time"] = head_t
        entry["matmul_time"] = mm_t
        entry["gflops_per_s"] = entry["flops"] / head_t["median_s"] / 1e9
        entry["matmul_gflops_per_s"] = entry["matmul_flops"] / mm_t["median_s"] / 1e9
        entry["flops_rate_vs_matmul"] = entry["gflops_per_s"] / entry["matmul_gflops_per_s"]
    avg_median = result["heads"]["avg"]["time"]["median_s"]
    for name in HEADS:
        entry = result["heads"][name]
        entry["time_vs_avg"] = entry["time"]["median_s"] / avg_median
    result["crt_vs_netvlad"] = (
        result["heads"]["crt"]["time"]["median_s"] / result["heads"]["netvlad"]["time"]["median_s"]
    )
    result["rounds"] = n_rounds
    result["load_average"] = load_average()
    return result


def profile_heads(point: dict[str, int], names: tuple[str, ...], steps: int, top: int) -> dict:
    """Where a step's time goes: ``torch.profiler`` self CPU time per operator and input shapes."""
    B, side, C, K, D = (point[k] for k in ("B", "side", "C", "K", "D"))
    x = feature_map(B, C, side)
    out = {}
    for name in names:
        torch.manual_seed(0)
        step = train_step(build_head(name, C, K, D), x)
        step()
        with torch.profiler.profile(record_shapes=True) as prof:
            for _ in range(steps):
                step()
        events = prof.key_averages(group_by_input_shape=True)
        total = sum(e.self_cpu_time_total for e in events)
        rows = sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
        out[name] = {
            "steps": steps,
            "self_cpu_ms_per_step": total / 1000 / steps,
            "top": [
                {
                    "op": e.key,
                    "input_shapes": str(e.input_shapes),
                    "calls_per_step": e.count / steps,
                    "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps,
                    "share": e.self_cpu_time_total / total,
                }
                for e in rows
            ],
        }
    return out


def grid_points(base: dict[str, int], sweeps: dict[str, list[int]]) -> list[tuple[str, dict]]:
    """``(factor, point)`` pairs, one factor varied at a time; the base point once (``"base"``)."""
    points = [("base", dict(base))]
    for factor, values in sweeps.items():
        for value in values:
            if value != base[factor]:
                points.append((factor, {**base, factor: value}))
    return points


def check_cost(points: list[dict[str, int]], rounds: int) -> list[dict]:
    """``torch.isfinite(x).all()`` vs a single-pass ``torch.aminmax`` check, per input size."""

    def isfinite_all(x: torch.Tensor) -> bool:
        return bool(torch.isfinite(x).all())

    def aminmax(x: torch.Tensor) -> bool:
        low, high = torch.aminmax(x)
        return bool(torch.isfinite(low) & torch.isfinite(high))

    out = []
    for point in points:
        x = feature_map(point["B"], point["C"], point["side"]).detach()
        times = interleaved_times(
            {"isfinite_all": lambda x=x: isfinite_all(x), "aminmax": lambda x=x: aminmax(x)},
            rounds,
        )
        out.append(
            {
                "point": dict(point),
                "isfinite_all": summarize(times["isfinite_all"]),
                "aminmax": summarize(times["aminmax"]),
            }
        )
    return out


def trunk_step_cost(B: int, K: int, D: int, rounds: int) -> dict:
    """A MobileNetV2 training step at 224 px beside the default heads at the same batch."""
    from pml_crt.trunks import FeatureMapTrunk

    torch.manual_seed(0)
    trunk = FeatureMapTrunk("mobilenet_v2").train()
    optimizer = torch.optim.SGD(trunk.parameters(), lr=0.01, momentum=0.9)
    images = torch.randn(B, 3, 224, 224)

    def trunk_step() -> None:
        optimizer.zero_grad()
        trunk(images).mean().backward()
        optimizer.step()

    with torch.no_grad():
        side = trunk(images[:1]).shape[-1]
    C = trunk.out_channels
    x = feature_map(B, C, side)
    fns: dict[str, Callable[[], Any]] = {"trunk": trunk_step}
    for name in HEADS:
        fns[name] = train_step(build_head(name, C, K, D), x)
    times = interleaved_times(fns, rounds, warmup=1)
    trunk_t = summarize(times["trunk"])
    heads = {}
    for name in HEADS:
        t = summarize(times[name])
        heads[name] = {
            "time": t,
            "vs_trunk": t["median_s"] / trunk_t["median_s"],
            "share_of_step": t["median_s"] / (trunk_t["median_s"] + t["median_s"]),
        }
    return {
        "B": B,
        "image_side": 224,
        "feature_map": [C, side, side],
        "K": K,
        "D": D,
        "trunk": trunk_t,
        "heads": heads,
        "load_average": load_average(),
    }


def allocator_worker(side: int, B: int, C: int, K: int, D: int, steps: int) -> dict:
    """Median CRT step time and minor page faults per step in this process."""
    torch.manual_seed(0)
    step = train_step(build_head("crt", C, K, D), feature_map(B, C, side))
    step()
    step()
    times: dict[str, list[float]] = {"wall": [], "cpu": []}
    faults = []
    for _ in range(steps):
        f0 = minor_faults()
        wall, cpu = time.perf_counter(), time.process_time()
        step()
        times["cpu"].append(time.process_time() - cpu)
        times["wall"].append(time.perf_counter() - wall)
        faults.append(minor_faults() - f0)
    return {**summarize(times), "faults_per_step": statistics.median(faults)}


def allocator_experiment(base: dict[str, int], repeats: int, steps: int) -> dict:
    """CRT's step under each :data:`ALLOCATOR_SETTINGS`, fresh processes, alternating."""
    results: dict[str, list[dict]] = {name: [] for name in ALLOCATOR_SETTINGS}
    args = [str(base[k]) for k in ("side", "B", "C", "K", "D")] + [str(steps)]
    for _ in range(repeats):
        for name, env in ALLOCATOR_SETTINGS.items():
            proc = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    MODULE,
                    "--threads",
                    str(torch.get_num_threads()),
                    "--allocator-worker",
                    *args,
                ],
                env={**os.environ, **env},
                cwd=REPO_ROOT,
                capture_output=True,
                text=True,
                check=True,
            )
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
    summary = {}
    for name, runs in results.items():
        summary[name] = {
            "env": ALLOCATOR_SETTINGS[name],
            "clock": runs[0]["clock"],
            "median_s": statistics.median(r["median_s"] for r in runs),
            "faults_per_step": statistics.median(r["faults_per_step"] for r in runs),
            "runs": runs,
        }
    default = summary["default"]["median_s"]
    for entry in summary.values():
        entry["vs_default"] = entry["median_s"] / default
    return {"point": dict(base), "repeats": repeats, "steps": steps, "settings": summary}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small grid for development")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared machine, CPU time of one thread is stable)",
    )
    parser.add_argument("--skip-trunk", action="store_true", help="skip the MobileNetV2 step")
    parser.add_argument("--allocator-worker", nargs=6, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.allocator_worker:
        print(json.dumps(allocator_worker(*args.allocator_worker)))
        return {}

    quick = args.quick
    base = QUICK_BASE if quick else BASE
    sweeps = QUICK_SWEEPS if quick else SWEEPS
    budget, rounds = (2.0, (3, 5)) if quick else (20.0, (5, 11))
    run = Run(MODULE)
    points = []
    for factor, point in grid_points(base, sweeps):
        entry = measure_point(point, budget, rounds)
        entry["factor"] = factor
        points.append(entry)
        crt = entry["heads"]["crt"]
        print(
            f"[{run.elapsed():6.0f}s] {factor:>4} {point}: "
            f"crt {1000 * crt['time']['median_s']:.1f} ms "
            f"({crt['flops_rate_vs_matmul']:.2f}x matmul FLOP/s, "
            f"{crt['time_vs_avg']:.1f}x avg, {entry['crt_vs_netvlad']:.2f}x NetVLAD), "
            f"peak {crt['peak_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
    fit_rows = [
        {
            **{k: p["point"][k] for k in ("B", "C", "K", "D")},
            "N": p["N"],
            "d": p["d"],
            "peak_bytes": p["heads"]["crt"]["peak_bytes"],
            "forward_bytes": p["heads"]["crt"]["forward_bytes"],
        }
        for p in points
    ]
    memory = memory_sweeps(base, QUICK_MEMORY_SWEEPS if quick else MEMORY_SWEEPS)
    for sweep in memory.values():
        for row in sweep["rows"]:
            fit_rows.append(
                {
                    **base,
                    "N": row["N"],
                    "K": row["K"],
                    "d": min(base["C"], 512),
                    "peak_bytes": row["crt_peak_bytes"],
                    "forward_bytes": row["crt_forward_bytes"],
                }
            )
    print(f"[{run.elapsed():6.0f}s] memory sweeps done", flush=True)
    profiles = profile_heads(base, ("avg", "netvlad", "crt", "multihead"), 3, 8)
    checks = check_cost([base, {**base, "side": max(sweeps["side"])}], 11 if quick else 31)
    allocator = allocator_experiment(base, 1 if quick else 2, 3 if quick else 7)
    print(f"[{run.elapsed():6.0f}s] allocator experiment done", flush=True)
    trunk = None
    if not args.skip_trunk:
        trunk = trunk_step_cost(base["B"], base["K"], base["D"], 2 if quick else 3)
        print(f"[{run.elapsed():6.0f}s] trunk step done", flush=True)
    data = {
        "base": base,
        "heads": list(HEADS),
        "points": points,
        "memory_sweeps": memory,
        "memory_fit": {
            "forward": memory_model_fit(
                fit_rows, "forward_bytes", ["B*N*C", "B*N*d", "B*N*K", "B*K*d", "1"]
            ),
            "peak": memory_model_fit(
                fit_rows, "peak_bytes", ["B*N*C", "B*N*d", "B*N*K", "B*K*d", "K*d*D", "1"]
            ),
        },
        "profiles": profiles,
        "input_check": checks,
        "allocator": allocator,
        "trunk_step": trunk,
    }
    name = "head_cost_quick.json" if quick else "head_cost.json"
    return run.write({"quick": quick}, data, args.out / name)


if __name__ == "__main__":
    main()
