"""``torch.compile`` (inductor, CPU) of trunk + CRT against eager.

Usage::

    python -m benchmarks.perf.compile [--quick] [--out benchmarks/results/perf]

Cases (forward + backward of ``model(x).sum()``, training mode):

- ``smallconvnet+crt``: ``SmallConvNet(1, pool_last=False)`` (four 64-channel
  blocks) + ``CRT(64, 128)`` on ``(32, 1, 64, 64)`` images (Omniglot-sized);
- ``crt``: ``CRT(1280)`` (defaults: ``K=64``, ``D=512``) on a
  ``(32, 1280, 7, 7)`` feature map;
- ``crt,check_inputs=False``: the same without the input check, whose
  ``bool(tensor)`` is a data-dependent graph break under ``torch.compile``.

For each: the first compiled call's wall time (compile included; inductor's
cache is a fresh temporary folder, so this is a cold compile), the graph and
graph-break counts (``torch._dynamo.explain``), the largest differences of
output and gradients against eager, and eager vs compiled step time measured
side by side (:func:`benchmarks.perf.common.interleaved_times`).

Every CRT here is coded residuals only (``global_pooling=None``): with the
default GeM branch the fusion starts at zero, so the coded residuals would
reach neither the output nor the gradients compared.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pml_crt.models import CRT
from pml_crt.trunks import SmallConvNet

from .common import (
    DEFAULT_OUT,
    Run,
    coded_residual_heads_only,
    interleaved_times,
    load_average,
    summarize,
)

MODULE = "benchmarks.perf.compile"
CODED = coded_residual_heads_only(CRT)  # see the module docstring


def build_case(name: str, quick: bool) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (training mode) and its input for one case."""
    torch.manual_seed(0)
    batch = 8 if quick else 32
    if name == "smallconvnet+crt":
        trunk = SmallConvNet(1, pool_last=False)
        model = torch.nn.Sequential(trunk, CRT(trunk.out_channels, 128, **CODED))
        x = torch.randn(batch, 1, 64, 64)
    elif name == "crt":
        model = CRT(1280, **CODED)
        x = torch.randn(batch, 1280, 7, 7).relu_()
    elif name == "crt,check_inputs=False":
        model = CRT(1280, check_inputs=False, **CODED)
        x = torch.randn(batch, 1280, 7, 7).relu_()
    else:
        raise ValueError(f"unknown case {name!r}")
    return model.train(), x


CASES = ("smallconvnet+crt", "crt", "crt,check_inputs=False")


def _step(fn: Callable[[torch.Tensor], torch.Tensor], model: torch.nn.Module, x: torch.Tensor):
    def step() -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        for p in model.parameters():
            p.grad = None
        inp = x.detach().requires_grad_()
        out = fn(inp)
        out.sum().backward()
        return out, {n: p.grad for n, p in model.named_parameters()}, inp.grad

    return step


def measure_case(name: str, quick: bool, rounds: int) -> dict[str, Any]:
    model, x = build_case(name, quick)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    eager = _step(model, model, x)
    eager_out, eager_grads, eager_xgrad = eager()
    model.load_state_dict(state)  # BatchNorm running statistics moved; start alike

    torch._dynamo.reset()
    explain = torch._dynamo.explain(model)(x)
    model.load_state_dict(state)
    torch._dynamo.reset()
    compiled_model = torch.compile(model)
    compiled = _step(compiled_model, model, x)
    start = time.perf_counter()
    out, grads, xgrad = compiled()
    first_call_s = time.perf_counter() - start

    def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.detach() - b.detach()).abs().max())

    grad_diff = max(max_diff(grads[n], g) for n, g in eager_grads.items())
    scale = max(float(g.abs().max()) for g in eager_grads.values())
    times = interleaved_times(
        {"eager": lambda: eager(), "compiled": lambda: compiled()}, rounds, warmup=1
    )
    eager_t, compiled_t = summarize(times["eager"]), summarize(times["compiled"])
    return {
        "case": name,
        "input_shape": list(x.shape),
        "first_call_s": first_call_s,
        "graph_count": explain.graph_count,
        "graph_break_count": explain.graph_break_count,
        "break_reasons": sorted({str(r.reason).splitlines()[0] for r in explain.break_reasons}),
        "max_abs_diff_output": max_diff(out, eager_out),
        "max_abs_diff_input_grad": max_diff(xgrad, eager_xgrad),
        "max_abs_diff_param_grads": grad_diff,
        "max_abs_param_grad": scale,
        "eager": eager_t,
        "compiled": compiled_t,
        "compiled_vs_eager": compiled_t["median_s"] / eager_t["median_s"],
        "load_average": load_average(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="batch 8, fewer rounds")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    run = Run(MODULE)
    results = []
    with tempfile.TemporaryDirectory(prefix="inductor-cold-") as cache:
        previous = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        try:
            for name in CASES:
                entry = measure_case(name, args.quick, 3 if args.quick else 9)
                results.append(entry)
                print(
                    f"[{run.elapsed():5.0f}s] {name}: first call "
                    f"{entry['first_call_s']:.1f} s, {entry['graph_count']} graphs, "
                    f"compiled/eager {entry['compiled_vs_eager']:.2f}, "
                    f"max |diff| out {entry['max_abs_diff_output']:.1e}",
                    flush=True,
                )
        finally:
            if previous is None:
                os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
            else:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = previous
    name = "compile_quick.json" if args.quick else "compile.json"
    return run.write({"quick": args.quick}, {"cases": results}, args.out / name)


if __name__ == "__main__":
    main()
