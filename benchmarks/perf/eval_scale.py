"""Evaluation at Stanford Online Products scale: k-NN time and peak memory.

Usage::

    python -m benchmarks.perf.eval_scale [--quick] [--out benchmarks/results/perf]

Synthetic SOP-like embeddings: 22,634 classes of 2 to 12 images each, 120,053
in all (SOP's counts; mean 5.3 per class), 512-d, L2-normalised (as PML's
tester normalises). Each class has a random centre; its images are the centre
plus isotropic noise (``--noise`` times the centre's norm), so the metrics are
far from 0 and 1. ``--quick`` uses about 20,000 embeddings.

For each k-NN method, ``AccuracyCalculator(include=(P@1, R-Precision,
MAP@R), k="max_bin_count", knn_func=...)`` runs ``get_accuracy(emb, labels)``
(query = reference, as PML's tester does for one split) in a fresh Python
process, so that its peak resident memory (``VmHWM`` of ``/proc/self/status``)
is its own; ``extra`` is the growth of that peak over the process after
imports, data loading and a 256-row warm-up call. Times are CPU seconds of
the process (user + system; with one thread, stable on a shared machine)
and wall seconds. Methods:

- ``faiss``: PML's ``FaissKNN()`` (exact ``IndexFlatL2`` on CPU);
- ``custom:<b>``: PML's ``CustomKNN(CosineSimilarity(), batch_size=b)``
  (query blocks of ``b`` rows against all references, ``torch.topk`` per block).

The metrics of all methods are compared (they must agree: with unit-norm
embeddings L2 and cosine rank neighbours alike).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from .common import DEFAULT_OUT, command_line, load_average, machine_info, write_json

REPO_ROOT = Path(__file__).resolve().parents[2]
MODULE = "benchmarks.perf.eval_scale"
SOP_CLASSES = 22_634
SOP_IMAGES = 120_053
METRICS = ("precision_at_1", "r_precision", "mean_average_precision_at_r")
DEFAULT_METHODS = ("faiss", "custom:1024", "custom:4096")
QUICK_METHODS = (
    "faiss",
    "faiss+stock-labels",
    "custom:1024",
    "custom:4096",
    "custom:16384",
)


def sop_like_labels(
    num_classes: int,
    num_images: int,
    *,
    low: int = 2,
    high: int = 12,
    seed: int = 0,
) -> np.ndarray:
    """Labels of ``num_images`` images in ``num_classes`` classes of ``low``..``high`` each.

    Class sizes are ``low + Binomial(high - low, p)`` with the mean matching
    ``num_images / num_classes``, then nudged one image at a time (within the
    bounds) until they sum to ``num_images``. Returns int64 labels, shuffled.
    """
    mean = num_images / num_classes
    if not low <= mean <= high:
        raise ValueError(f"mean class size {mean:.2f} is outside [{low}, {high}]")
    rng = np.random.default_rng(seed)
    sizes = low + rng.binomial(high - low, (mean - low) / (high - low), size=num_classes)
    while (excess := int(sizes.sum()) - num_images) != 0:
        step = -1 if excess > 0 else 1
        movable = np.flatnonzero(sizes > low) if step < 0 else np.flatnonzero(sizes < high)
        chosen = rng.choice(movable, size=min(abs(excess), len(movable)), replace=False)
        sizes[chosen] += step
    labels = np.repeat(np.arange(num_classes, dtype=np.int64), sizes)
    return labels[rng.permutation(len(labels))]


def synthetic_embeddings(
    labels: np.ndarray, dim: int, noise: float, seed: int = 0, chunk: int = 16384
) -> np.ndarray:
    """Unit-norm float32 ``(len(labels), dim)``: class centre + ``noise`` x isotropic noise."""
    rng = np.random.default_rng(seed)
    num_classes = int(labels.max()) + 1
    centres = rng.standard_normal((num_classes, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    out = np.empty((len(labels), dim), dtype=np.float32)
    for start in range(0, len(labels), chunk):
        idx = labels[start : start + chunk]
        block = rng.standard_normal((len(idx), dim), dtype=np.float32)
        block *= noise / np.sqrt(dim, dtype=np.float32)
        block += centres[idx]
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        out[start : start + chunk] = block
    return out


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def make_knn(method: str) -> Any:
    """The ``knn_func`` of a method name (``faiss`` or ``custom:<batch_size>``)."""
    method = method.split("+", 1)[0]
    if method == "faiss":
        from pytorch_metric_learning.utils.inference import FaissKNN

        return FaissKNN()
    if method.startswith("custom:"):
        from pytorch_metric_learning.distances import CosineSimilarity
        from pytorch_metric_learning.utils.inference import CustomKNN

        return CustomKNN(CosineSimilarity(), batch_size=int(method.split(":", 1)[1]))
    raise ValueError(f"unknown method {method!r}")


def label_comparison(method: str) -> Any:
    """PML's ``EQUALITY`` for ``...+stock-labels``, else pml-crt's per-class ``labels_equal``."""
    if method.endswith("+stock-labels"):
        from pytorch_metric_learning.utils.accuracy_calculator import EQUALITY

        return EQUALITY
    from pml_crt.utils.accuracy import labels_equal

    return labels_equal


def _set_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:
        pass


def run_method(method: str, data_dir: Path, threads: int) -> dict[str, Any]:
    """Time one method on the stored embeddings (run in a fresh process)."""
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import AccuracyCalculator

    _set_threads(threads)
    embeddings = np.load(data_dir / "embeddings.npy")
    labels = np.load(data_dir / "labels.npy")
    query = torch.from_numpy(embeddings)
    query_labels = torch.from_numpy(labels)
    calculator = AccuracyCalculator(
        include=METRICS,
        k="max_bin_count",
        knn_func=make_knn(method),
        label_comparison_fn=label_comparison(method),
    )
    # Warm-up on 256 rows: lazy library loading is not the method's memory.
    calculator.get_accuracy(query[:256], query_labels[:256])
    baseline_kib = _status_kib("VmHWM")
    wall, cpu = time.perf_counter(), time.process_time()
    metrics = calculator.get_accuracy(query, query_labels)
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    return {
        "method": method,
        "metrics": {k: float(v) for k, v in metrics.items()},
        "wall_s": wall,
        "cpu_s": cpu,
        "peak_rss_mib": _status_kib("VmHWM") / 1024,
        "baseline_rss_mib": baseline_kib / 1024,
        "extra_peak_rss_mib": (_status_kib("VmHWM") - baseline_kib) / 1024,
        "threads": threads,
    }


def run_label_count(method: str, num_images: int, threads: int) -> dict[str, Any]:
    """PML's per-label match counting alone (``labels:stock`` or ``labels:per-class``)."""
    import torch
    from pytorch_metric_learning.utils.accuracy_calculator import (
        EQUALITY,
        get_label_match_counts,
    )

    from pml_crt.utils.accuracy import labels_equal

    _set_threads(threads)
    num_classes = max(1, round(num_images * SOP_CLASSES / SOP_IMAGES))
    # AccuracyCalculator turns labels into float32 before counting.
    labels = torch.from_numpy(sop_like_labels(num_classes, num_images)).float()
    fn = EQUALITY if method == "labels:stock" else labels_equal
    get_label_match_counts(labels[:256], labels[:256], fn)  # warm-up
    baseline_kib = _status_kib("VmHWM")
    wall, cpu = time.perf_counter(), time.process_time()
    unique, counts = get_label_match_counts(labels, labels, fn)
    cpu = time.process_time() - cpu
    wall = time.perf_counter() - wall
    return {
        "method": method,
        "num_images": num_images,
        "num_classes": num_classes,
        "pairs": num_classes * num_images,
        "counts_sum": int(counts.sum()),
        "wall_s": wall,
        "cpu_s": cpu,
        "extra_peak_rss_mib": (_status_kib("VmHWM") - baseline_kib) / 1024,
    }


def run_in_subprocess(method: str, threads: int, *extra: str) -> dict[str, Any]:
    """:func:`run_method` or :func:`run_label_count` in a fresh interpreter; its JSON back."""
    proc = subprocess.run(
        [sys.executable, "-m", MODULE, "--worker", method, "--threads", str(threads), *extra],
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": str(threads)},
        cwd=REPO_ROOT,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{method} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_metrics(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Largest absolute difference of every metric across methods."""
    diffs = {}
    for metric in METRICS:
        values = [r["metrics"][metric] for r in results]
        diffs[metric] = max(values) - min(values)
    return {"max_abs_diff": diffs, "agree": all(d <= 1e-3 for d in diffs.values())}


def run(
    num_images: int,
    dim: int,
    methods: tuple[str, ...],
    threads: int,
    noise: float,
    seed: int = 0,
    isolate: bool = True,
) -> dict[str, Any]:
    """Generate the data, run every method (each in its own process if ``isolate``), compare.

    ``isolate=False`` runs the methods in this process (for tests); their peak
    RSS figures are then not their own.
    """
    num_classes = max(1, round(num_images * SOP_CLASSES / SOP_IMAGES))
    labels = sop_like_labels(num_classes, num_images, seed=seed)
    embeddings = synthetic_embeddings(labels, dim, noise, seed=seed)
    sizes = np.bincount(labels)
    with tempfile.TemporaryDirectory(prefix="eval-scale-") as tmp:
        data_dir = Path(tmp)
        np.save(data_dir / "embeddings.npy", embeddings)
        np.save(data_dir / "labels.npy", labels)
        del embeddings
        results = []
        for method in methods:
            if isolate:
                entry = run_in_subprocess(method, threads, "--data", str(data_dir))
            else:
                entry = run_method(method, data_dir, threads)
            entry["load_average"] = load_average()
            results.append(entry)
            print(
                f"{method:>18}: cpu {entry['cpu_s']:7.1f} s, wall {entry['wall_s']:7.1f} s, "
                f"peak RSS {entry['peak_rss_mib']:7.0f} MiB "
                f"(+{entry['extra_peak_rss_mib']:.0f}), "
                + ", ".join(f"{k} {v:.4f}" for k, v in entry["metrics"].items()),
                flush=True,
            )
    clock = "cpu_s" if threads == 1 else "wall_s"
    fastest = min(results, key=lambda r: r[clock])
    return {
        "num_images": int(len(labels)),
        "num_classes": int(num_classes),
        "class_size": {
            "min": int(sizes.min()),
            "max": int(sizes.max()),
            "mean": float(sizes.mean()),
        },
        "dim": dim,
        "noise": noise,
        "threads": threads,
        "clock": clock,
        "methods": results,
        "comparison": compare_metrics(results),
        "fastest": fastest["method"],
    }


def label_count_scaling(sizes: list[int], full_size: int, threads: int) -> dict[str, Any]:
    """Memory of PML's stock label counting over ``sizes`` (fitted), and per class at full size.

    The stock path's extra peak is fitted as ``bytes_per_pair * classes * N``
    and extrapolated to ``full_size``; the per-class path is measured at
    ``full_size`` itself.
    """
    rows = []
    for n in sizes:
        for method in ("labels:stock", "labels:per-class"):
            rows.append(run_in_subprocess(method, threads, "--n", str(n)))
    full = run_in_subprocess("labels:per-class", threads, "--n", str(full_size))
    stock = [r for r in rows if r["method"] == "labels:stock"]
    pairs = np.array([r["pairs"] for r in stock], dtype=float)
    extra = np.array([r["extra_peak_rss_mib"] * 2**20 for r in stock], dtype=float)
    bytes_per_pair = float((pairs * extra).sum() / (pairs * pairs).sum())  # fit through 0
    full_classes = max(1, round(full_size * SOP_CLASSES / SOP_IMAGES))
    return {
        "rows": rows,
        "per_class_at_full_size": full,
        "stock_bytes_per_pair": bytes_per_pair,
        "full_size": full_size,
        "full_classes": full_classes,
        "stock_extrapolated_gib": bytes_per_pair * full_classes * full_size / 2**30,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about 20,000 embeddings")
    parser.add_argument("--n", type=int, default=None, help="number of embeddings")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--noise", type=float, default=2.0)
    parser.add_argument("--methods", nargs="+", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch and faiss threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON")
    parser.add_argument("--name", default=None, help="JSON file name (default by mode)")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker and args.worker.startswith("labels:"):
        print(json.dumps(run_label_count(args.worker, args.n, args.threads)))
        return {}
    if args.worker:
        print(json.dumps(run_method(args.worker, args.data, args.threads)))
        return {}
    import torch

    torch.set_num_threads(args.threads)  # recorded by machine_info; workers set their own
    num_images = args.n or (20_000 if args.quick else SOP_IMAGES)
    methods = tuple(args.methods or (QUICK_METHODS if args.quick else DEFAULT_METHODS))
    started = time.perf_counter()
    info = machine_info()
    result = {
        "script": MODULE,
        "command": command_line(MODULE),
        "quick": args.quick,
        "machine": info,
        **run(num_images, args.dim, methods, args.threads, args.noise),
    }
    sizes = [2_000, 5_000, 10_000] if args.quick else [10_000, 20_000, 40_000]
    result["label_counting"] = label_count_scaling(sizes, num_images, args.threads)
    print(
        "stock label counting: {:.2f} bytes per (class, image) pair -> {:.1f} GiB at N={}; "
        "per class at N={}: {:.1f} s, +{:.0f} MiB".format(
            result["label_counting"]["stock_bytes_per_pair"],
            result["label_counting"]["stock_extrapolated_gib"],
            num_images,
            num_images,
            result["label_counting"]["per_class_at_full_size"]["cpu_s"],
            result["label_counting"]["per_class_at_full_size"]["extra_peak_rss_mib"],
        ),
        flush=True,
    )
    result["machine"]["load_average_end"] = load_average()
    result["elapsed_s"] = time.perf_counter() - started
    name = args.name or ("eval_scale_quick.json" if args.quick else "eval_scale.json")
    path = write_json(result, args.out / name)
    print(f"wrote {path} in {result['elapsed_s']:.0f} s")
    return result


if __name__ == "__main__":
    main()
