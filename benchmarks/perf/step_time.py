"""One training step of CRT and of MultiHeadCRT + MultiHeadLoss, now against a baseline revision.

Usage::

    python -m benchmarks.perf.step_time [--quick] [--baseline-rev 874a137] [--device cpu]

The baseline is ``pml_crt`` as of ``--baseline-rev`` (default ``874a137``, the
commit before issue 12's work), extracted with ``git archive`` into a
temporary package ``pml_crt_before`` and imported in this process next to the
working tree's ``pml_crt``; both sides get identical parameters
(``load_state_dict``) and the same batch.

Steps (forward, backward, ``SGD`` step; PML's Multi-Similarity loss and miner):

- ``crt``: ``CRT(C)`` (defaults: ``K=64``, ``D=512``) + ``MultiSimilarityLoss``
  with the miner's pairs;
- ``multihead``: ``MultiHeadCRT(C)`` (defaults: heads ``((64, 512), (32, 128))``)
  + ``MultiHeadLoss(MultiSimilarityLoss(), sizes, miner=MultiSimilarityMiner())``
  (consistency on, default weight 1).

Both with the coded-residual heads only (``global_pooling=None`` where the
revision has that argument): the same model on both sides, so the ratio
measures the code, not the GeM branch that became the default after the
baseline.

Each step of both sides is timed side by side, in rotating order
(:func:`benchmarks.perf.common.interleaved_times`); the report gives medians,
the ratio of medians, and the geometric mean of the per-round ratios
now/baseline with its 95% Student-t confidence interval (rounds are paired:
both sides ran back to back). It also counts each side's host reads
(:class:`HostSyncCounter`: what would be a device synchronisation on an
accelerator) in one step, by call site; with ``--device cuda`` also the
synchronisations CUDA reports (``torch.cuda.set_sync_debug_mode("warn")``).
Labels live on ``--device``, as after PML's own ``to_device``.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import math
import tempfile
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.overrides import TorchFunctionMode

from pml_crt.utils.stats import t_quantile_975

from .common import (
    DEFAULT_OUT,
    REPO_ROOT,
    Run,
    coded_residual_heads_only,
    interleaved_times,
    load_average,
    load_baseline,
    summarize,
)

__all__ = ["HostSyncCounter", "build_step", "load_baseline", "main"]

MODULE = "benchmarks.perf.step_time"
BASELINE_REV = "874a137"
FULL_SIZES = {"batch": 32, "channels": 1280, "side": 7, "rounds": 21}
QUICK_SIZES = {"batch": 8, "channels": 64, "side": 4, "rounds": 5}

# Calls that read a tensor's values into Python: on an accelerator each one
# waits for the device to finish the queued work (a synchronisation).
_VALUE_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.__bool__: "__bool__",
    torch.Tensor.__float__: "__float__",
    torch.Tensor.__int__: "__int__",
    torch.Tensor.__index__: "__index__",
    torch.Tensor.__complex__: "__complex__",
    torch.Tensor.__format__: "__format__",
    torch.Tensor.__array__: "__array__",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.numpy: "numpy",
}
# Calls whose output shape depends on the values: the host must read how many
# elements come out before it can allocate the result.
_DATA_DEPENDENT_SHAPES = {
    torch.nonzero: "nonzero",
    torch.Tensor.nonzero: "nonzero",
    torch.argwhere: "argwhere",
    torch.Tensor.argwhere: "argwhere",
    torch.masked_select: "masked_select",
    torch.Tensor.masked_select: "masked_select",
    torch.unique: "unique",
    torch.Tensor.unique: "unique",
    torch.unique_consecutive: "unique_consecutive",
    torch.Tensor.unique_consecutive: "unique_consecutive",
    torch.bincount: "bincount",
    torch.Tensor.bincount: "bincount",
}


def _is_bool_index(index: object) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def _sync_name(func: Callable, args: tuple, kwargs: dict) -> str | None:
    """The name under which ``func(*args, **kwargs)`` is counted, or ``None``."""
    if func in _VALUE_READS:
        return _VALUE_READS[func]
    if func in _DATA_DEPENDENT_SHAPES:
        return _DATA_DEPENDENT_SHAPES[func]
    if func is torch.where and len(args) + len(kwargs) == 1:
        return "where(condition)"  # the one-argument form is nonzero
    if func in (torch.Tensor.__getitem__, torch.Tensor.__setitem__) and _is_bool_index(args[1]):
        return "boolean-mask indexing"
    if func in (torch.repeat_interleave, torch.Tensor.repeat_interleave):
        repeats = args[1] if len(args) > 1 else kwargs.get("repeats")
        if isinstance(repeats, torch.Tensor) and kwargs.get("output_size") is None:
            return "repeat_interleave"
    return None


class HostSyncCounter(TorchFunctionMode):
    """Count the calls that read tensor values back to the host, by call site.

    Counted: value reads (``item``, ``bool``, ``float``, ``int``, ``index``,
    ``tolist``, ``numpy``, ...) and ops whose output shape depends on the values
    (``nonzero``, one-argument ``where``, ``masked_select``, ``unique``,
    boolean-mask indexing, ``repeat_interleave`` without ``output_size``). On
    an accelerator each waits for the device; on the CPU they cost nothing,
    so the count stands for the synchronisations the same step makes on a
    GPU (a read of a tensor that is on the CPU there too, e.g. labels, is
    counted all the same). Only calls made from Python are seen (a read inside
    a C++ op is not), and a call made inside a counted call is not counted
    again.

    ``counts`` maps ``(name, "file:line")`` of the innermost frame outside
    ``torch`` to the number of calls; ``total`` is their sum.
    """

    def __init__(self) -> None:
        super().__init__()
        self.counts: collections.Counter[tuple[str, str]] = collections.Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _sync_name(func, args, kwargs)
        if name is not None:
            self.counts[(name, _call_site())] += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def total_in(self, package: str) -> int:
        """Calls whose site lies in ``package``, a path part (``pml_crt/losses``)."""
        return sum(n for (_, site), n in self.counts.items() if _site_in(site, package))

    def report(self) -> dict[str, int]:
        return {f"{name} @ {site}": n for (name, site), n in sorted(self.counts.items())}


def _site_in(site: str, package: str) -> bool:
    return f"/{package}/" in site or site.startswith(f"{package}/")


def _call_site() -> str:
    torch_dir = str(Path(torch.__file__).parent)
    for frame in reversed(traceback.extract_stack()[:-2]):
        if not frame.filename.startswith(torch_dir):
            path = frame.filename
            for root in (str(REPO_ROOT) + "/", "site-packages/"):
                if root in path:
                    path = path.split(root, 1)[1]
            return f"{path}:{frame.lineno}"
    return "?"


def build_step(
    package: Any,
    case: str,
    x: torch.Tensor,
    labels: torch.Tensor,
    state: dict[str, torch.Tensor] | None = None,
) -> tuple[Callable[[], None], torch.nn.Module]:
    """A closure running one training step of ``case`` with ``package``'s classes.

    ``package`` is ``pml_crt`` or ``pml_crt_before``; ``state`` (the other
    side's model ``state_dict``) makes both sides start from the same weights.
    Returns the step and the model.
    """
    from pytorch_metric_learning import losses, miners

    models = importlib.import_module(f"{package.__name__}.models")
    channels = x.shape[1]
    if case == "crt":
        model = models.CRT(channels, **coded_residual_heads_only(models.CRT))
        loss = losses.MultiSimilarityLoss()
        miner = miners.MultiSimilarityMiner()
    elif case == "multihead":
        model = models.MultiHeadCRT(channels, **coded_residual_heads_only(models.MultiHeadCRT))
        multi_head_loss = importlib.import_module(f"{package.__name__}.losses").MultiHeadLoss
        loss = multi_head_loss(
            losses.MultiSimilarityLoss(),
            model.embedding_sizes,
            miner=miners.MultiSimilarityMiner(),
        )
        miner = None
    else:
        raise ValueError(f"unknown case {case!r}")
    model = model.to(x.device).train()
    loss = loss.to(x.device)
    if state is not None:
        model.load_state_dict(state)
    optimizer = torch.optim.SGD([*model.parameters(), *loss.parameters()], lr=1e-3)

    def step(synchronize: bool = True) -> None:
        embeddings = model(x)
        if miner is None:
            value = loss(embeddings, labels)
        else:
            value = loss(embeddings, labels, miner(embeddings, labels))
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        if synchronize and x.device.type == "cuda":
            torch.cuda.synchronize(x.device)

    return step, model


def count_cuda_syncs(step: Callable[..., None]) -> int:
    """Synchronisations CUDA itself reports in one step (``torch.cuda.set_sync_debug_mode``).

    The step runs without its closing ``torch.cuda.synchronize`` (the timing's
    own wait); every synchronising CUDA call in it warns once, and the warnings
    are counted. A cross-check of :class:`HostSyncCounter` on a GPU, which
    also sees the reads made inside C++ ops.
    """
    step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            step(synchronize=False)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    torch.cuda.synchronize()
    return sum("synchroniz" in str(w.message) for w in caught)


def count_step_syncs(step: Callable[[], None]) -> HostSyncCounter:
    """The host reads of one call of ``step`` (after a warm-up call)."""
    step()
    with HostSyncCounter() as counter:
        step()
    return counter


def paired_ratio(now: list[float], before: list[float]) -> dict[str, float]:
    """Geometric mean of ``now[r] / before[r]`` and its 95% Student-t interval."""
    logs = [math.log(a / b) for a, b in zip(now, before, strict=True)]
    n = len(logs)
    mean = sum(logs) / n
    if n < 2:
        return {"geomean": math.exp(mean), "ci95_low": math.nan, "ci95_high": math.nan}
    sd = math.sqrt(sum((v - mean) ** 2 for v in logs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {
        "geomean": math.exp(mean),
        "ci95_low": math.exp(mean - half),
        "ci95_high": math.exp(mean + half),
    }


def measure(
    case: str, before: Any, now: Any, args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, args.channels, args.side, args.side, generator=generator)
    labels = torch.arange(args.batch // 4).repeat_interleave(4)
    x, labels = x.to(device), labels.to(device)
    torch.manual_seed(0)
    step_now, model_now = build_step(now, case, x, labels)
    step_before, _ = build_step(before, case, x, labels, state=model_now.state_dict())
    steps = {"baseline": step_before, "now": step_now}
    syncs = {label: count_step_syncs(step) for label, step in steps.items()}
    times = interleaved_times(steps, args.rounds, warmup=1)
    summary = {label: summarize(times[label]) for label in steps}
    clock = summary["now"]["clock"]
    return {
        "case": case,
        "input_shape": list(x.shape),
        "baseline": summary["baseline"],
        "now": summary["now"],
        "now_vs_baseline_medians": summary["now"]["median_s"] / summary["baseline"]["median_s"],
        "now_vs_baseline_paired": paired_ratio(times["now"][clock], times["baseline"][clock]),
        "host_syncs": {
            label: {"total": c.total, "sites": c.report()} for label, c in syncs.items()
        },
        "cuda_reported_syncs": (
            {label: count_cuda_syncs(step) for label, step in steps.items()}
            if device.type == "cuda"
            else None
        ),
        "load_average": load_average(),
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="defaults B=8, C=64, 4x4, 5 rounds")
    parser.add_argument("--baseline-rev", default=BASELINE_REV, help="git revision of 'baseline'")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--batch", type=int, help="batch size, 4 per class (default 32)")
    parser.add_argument("--channels", type=int, help="C of the feature map (default 1280)")
    parser.add_argument("--side", type=int, help="H = W of the feature map (default 7)")
    parser.add_argument("--rounds", type=int, help="timed rounds (default 21)")
    parser.add_argument("--cases", nargs="+", default=["crt", "multihead"])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the JSON")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    args = parser.parse_args(argv)
    defaults = QUICK_SIZES if args.quick else FULL_SIZES
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    run = Run(MODULE)
    import pml_crt as now

    with tempfile.TemporaryDirectory(prefix="pml-crt-baseline-") as tmp:
        before = load_baseline(args.baseline_rev, Path(tmp))
        results = []
        for case in args.cases:
            entry = measure(case, before, now, args, device)
            results.append(entry)
            paired = entry["now_vs_baseline_paired"]
            print(
                f"[{run.elapsed():5.0f}s] {case}: baseline "
                f"{entry['baseline']['median_s'] * 1e3:.1f} ms, now "
                f"{entry['now']['median_s'] * 1e3:.1f} ms, now/baseline "
                f"{paired['geomean']:.3f} [{paired['ci95_low']:.3f}, {paired['ci95_high']:.3f}], "
                f"host syncs {entry['host_syncs']['baseline']['total']} -> "
                f"{entry['host_syncs']['now']['total']}",
                flush=True,
            )
    settings = {"baseline_rev": args.baseline_rev, "device": str(device), "quick": args.quick}
    name = "step_time_quick.json" if args.quick else "step_time.json"
    return run.write(settings, {"cases": results}, args.out / name)


if __name__ == "__main__":
    main()
