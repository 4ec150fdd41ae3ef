"""The performance changes to the model code, before vs after, side by side.

Usage::

    python -m benchmarks.perf.model_changes [--quick] [--baseline-rev 5a5d0e3]

The "before" modules are ``pml_crt`` as of ``--baseline-rev`` (extracted with
``git archive`` into a temporary package ``pml_crt_before``); "after" is the
working tree. Both get identical parameters (``load_state_dict``) and the same
input; forward + backward (``head(x).sum().backward()``) is timed side by side
(:func:`benchmarks.perf.common.interleaved_times`), the peak memory measured
with :class:`benchmarks.perf.memory.LiveTensorMemory`, and the outputs and
gradients compared.

Changes measured:

- ``MultiHeadCRT``: the heads share the token view and the input check, and
  their input projections run as one stacked GEMM (both sides without the GeM
  branch, :func:`~benchmarks.perf.common.coded_residual_heads_only`);
- ``GlobalPoolEmbedder(pooling="gem")``: ``x ** p`` as ``exp(p * log x)``
  (no transcendental functions in backward);
- ``CRT`` (refactored into private code/embed steps only) and the average-pool
  head (unchanged) as controls.
"""

from __future__ import annotations

import argparse
import importlib
import tempfile
from pathlib import Path
from typing import Any

import torch

from .common import (
    DEFAULT_OUT,
    Run,
    coded_residual_heads_only,
    interleaved_times,
    load_average,
    load_baseline,
    summarize,
)
from .heads import feature_map, train_step
from .memory import measure_peak

MODULE = "benchmarks.perf.model_changes"
BASELINE_REV = "5a5d0e3"


def cases(quick: bool) -> list[dict[str, Any]]:
    B = 8 if quick else 32
    return [
        {"name": "multihead", "cls": "MultiHeadCRT", "args": (1280,), "kwargs": {}, "B": B},
        {"name": "gem", "cls": "GlobalPoolEmbedder", "args": (1280, 512), "B": B},
        {"name": "gem,N=14x14", "cls": "GlobalPoolEmbedder", "args": (1280, 512), "B": B},
        {"name": "crt", "cls": "CRT", "args": (1280,), "kwargs": {}, "B": B},
        {"name": "avg", "cls": "GlobalPoolEmbedder", "args": (1280, 512), "B": B},
    ]


def _kwargs(case: dict[str, Any]) -> dict[str, Any]:
    if case["name"].startswith("gem"):
        return {"pooling": "gem"}
    return dict(case.get("kwargs", {}))


def measure(case: dict[str, Any], before_models: Any, rounds: int) -> dict[str, Any]:
    import pml_crt.models as after_models

    side = 14 if "14x14" in case["name"] else 7
    torch.manual_seed(0)
    modules = {}
    for label, package in (("after", after_models), ("before", before_models)):
        cls = getattr(package, case["cls"])
        modules[label] = cls(*case["args"], **_kwargs(case), **coded_residual_heads_only(cls))
    after, before = modules["after"].train(), modules["before"].train()
    before.load_state_dict(after.state_dict())
    x = feature_map(case["B"], 1280, side)
    steps = {"before": train_step(before, x), "after": train_step(after, x)}

    outputs, grads = {}, {}
    for label, module in (("before", before), ("after", after)):
        for p in module.parameters():
            p.grad = None
        x.grad = None
        out = module(x)
        out.sum().backward()
        outputs[label] = out.detach()
        grads[label] = [x.grad.clone()] + [p.grad.clone() for p in module.parameters()]
    peak = {label: measure_peak(step)["peak"] for label, step in steps.items()}
    times = interleaved_times(steps, rounds, warmup=1)
    t = {label: summarize(times[label]) for label in steps}
    return {
        "case": case["name"],
        "input_shape": list(x.shape),
        "before": t["before"],
        "after": t["after"],
        "after_vs_before": t["after"]["median_s"] / t["before"]["median_s"],
        "peak_bytes_before": peak["before"],
        "peak_bytes_after": peak["after"],
        "max_abs_diff_output": float((outputs["after"] - outputs["before"]).abs().max()),
        "max_abs_diff_grads": max(
            float((a - b).abs().max()) for a, b in zip(grads["after"], grads["before"], strict=True)
        ),
        "load_average": load_average(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, fewer rounds")
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of 'before'")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Run(MODULE)
    with tempfile.TemporaryDirectory(prefix="pml-crt-before-") as tmp:
        before = load_baseline(args.baseline_rev, Path(tmp))
        before_models = importlib.import_module(f"{before.__name__}.models")
        results = []
        for case in cases(args.quick):
            entry = measure(case, before_models, 5 if args.quick else 15)
            results.append(entry)
            mib_before = entry["peak_bytes_before"] / 2**20
            mib_after = entry["peak_bytes_after"] / 2**20
            print(
                f"{entry['case']:>12}: after/before {entry['after_vs_before']:.3f}, peak "
                f"{mib_before:.1f} -> {mib_after:.1f} MiB, "
                f"max |diff| out {entry['max_abs_diff_output']:.1e}, "
                f"grads {entry['max_abs_diff_grads']:.1e}",
                flush=True,
            )
    settings = {"quick": args.quick, "baseline_rev": args.baseline_rev}
    name = "model_changes_quick.json" if args.quick else "model_changes.json"
    return run.write(settings, {"cases": results}, args.out / name)


if __name__ == "__main__":
    main()
