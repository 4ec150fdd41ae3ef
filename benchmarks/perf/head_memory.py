"""CRT's memory against NetVLAD's, and a least-squares model of CRT's bytes.

:func:`memory_sweeps` measures the peak of forward + backward and the bytes saved for
backward (:func:`forward_bytes`) as the positions ``N`` or the prototypes ``K`` grow,
with linear fits, against what one ``(B, N, K, d)`` float32 residual tensor would take;
:func:`memory_model_fit` fits CRT's bytes over all measured configurations to products
of the sizes. Part of ``python -m benchmarks.perf.head_cost``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from .heads import build_head, feature_map, train_step
from .memory import LiveTensorMemory, measure_peak

__all__ = ["forward_bytes", "memory_model_fit", "memory_sweeps"]


def forward_bytes(head: torch.nn.Module, x: torch.Tensor) -> int:
    """Bytes alive after the forward pass: what autograd saved for backward, plus the output."""
    for p in head.parameters():
        p.grad = None
    with LiveTensorMemory() as mem:
        out = head(x)
        live = mem.live
    del out
    return live


def _linear_fit(xs: np.ndarray, ys: np.ndarray) -> dict[str, float]:
    slope, intercept = np.polyfit(xs, ys, 1)
    fitted = slope * xs + intercept
    r2 = 1 - float(((ys - fitted) ** 2).sum() / ((ys - ys.mean()) ** 2).sum())
    return {"slope_bytes": float(slope), "intercept_bytes": float(intercept), "r2": r2}


def memory_sweeps(base: dict[str, int], sweeps: dict[str, list[int]]) -> dict:
    """CRT and NetVLAD memory over ``N`` and ``K``, with linear fits for CRT.

    Two measures: the peak of forward + backward (parameter gradients
    included, e.g. the fusion weight's ``K*d*D``) and the bytes alive after
    the forward pass (the activations saved for backward), against what one
    ``(B, N, K, d)`` float32 residual tensor would take.
    """
    out: dict[str, Any] = {}
    d = min(base["C"], 512)
    for factor, values in sweeps.items():
        rows = []
        for value in values:
            point = {**base, factor: value}
            B, side, C, K, D = (point[k] for k in ("B", "side", "C", "K", "D"))
            x = feature_map(B, C, side)
            row = {"value": value, "N": side * side, "K": K}
            for name in ("crt", "netvlad"):
                torch.manual_seed(0)
                head = build_head(name, C, K, D)
                step = train_step(head, x)
                step()
                row[f"{name}_peak_bytes"] = measure_peak(step)["peak"]
                row[f"{name}_forward_bytes"] = forward_bytes(head, x)
            row["residual_tensor_bytes"] = 4 * B * side * side * K * d
            rows.append(row)
        variable = "N" if factor == "side" else "K"
        xs = np.array([r[variable] for r in rows], dtype=float)
        per_unit = 4 * base["B"] * (base["K"] * d if factor == "side" else base["side"] ** 2 * d)
        out[factor] = {
            "variable": variable,
            "rows": rows,
            "crt_fit": _linear_fit(xs, np.array([r["crt_peak_bytes"] for r in rows], float)),
            "crt_forward_fit": _linear_fit(
                xs, np.array([r["crt_forward_bytes"] for r in rows], float)
            ),
            "residual_tensor_slope_bytes": per_unit,
        }
    return out


def memory_model_fit(points: list[dict], key: str, terms: list[str]) -> dict:
    """Non-negative least squares of CRT's ``key`` bytes on products of the sizes in ``terms``.

    Each term is a product such as ``"B*N*K"`` (``"1"`` is a constant); the
    coefficients are bytes per element.
    """
    from scipy.optimize import nnls

    def value(p: dict, term: str) -> float:
        out = 1.0
        for name in term.split("*"):
            out *= 1.0 if name == "1" else p[name]
        return out

    a = np.array([[value(p, t) for t in terms] for p in points], dtype=float)
    y = np.array([p[key] for p in points], dtype=float)
    scale = np.abs(a).max(axis=0)
    coef, _ = nnls(a / scale, y)
    coef = coef / scale
    fitted = a @ coef
    r2 = 1 - float(((y - fitted) ** 2).sum() / ((y - y.mean()) ** 2).sum())
    return {
        "measure": key,
        "terms": terms,
        "bytes_per_element": [float(c) for c in coef],
        "r2": r2,
        "max_relative_error": float(np.max(np.abs(fitted - y) / y)),
        "n_points": len(y),
    }
