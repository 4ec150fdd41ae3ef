"""Export a trunk + embedder for inference: ``torch.export``, TorchScript (trace) and ONNX.

Put the model in ``eval()`` mode first: in training mode ``MultiHeadCRT``
returns every head concatenated and BatchNorm uses batch statistics. Then::

    model = torch.nn.Sequential(trunk, embedder).eval()
    example = torch.randn(2, 3, 224, 224)

    program = export_program(model, example)          # torch.export, dynamic batch
    embeddings = program.module()(images)             # any batch size >= 1
    torch.export.save(program, "model.pt2")

    export_onnx(model, example, "model.onnx")         # ONNX (opset 18), dynamic batch
    # onnxruntime.InferenceSession("model.onnx").run(None, {"images": images.numpy()})

    scripted = trace_torchscript(model, example)      # TorchScript by tracing
    torch.jit.save(scripted, "model.ts")

These are thin wrappers over the torch calls; what they add is the dynamic
batch dimension and two pitfalls handled for you:

- An example batch of size 1 would make ``torch.export`` specialise the batch
  to 1 (its "0/1 specialisation"); the example is repeated to batch 2.
- The embedders' input check (NaN/inf raises ``ValueError``) reads tensor
  values, which a graph cannot do; it is skipped while a graph is captured
  (:func:`pml_crt.utils.validation.is_graph_capture`), so the exported
  graph does not check values, while the eager module still does.

``torch.jit.script`` is not supported: the modules use Python features that
TorchScript cannot compile (``object``/``Literal`` annotations, f-strings of
shapes, properties of ``ModuleWithRecords``);
tracing gives the same inference graph. The batch dimension of a trace is
dynamic; its shape checks are baked in for the example's channel count.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import torch

__all__ = ["batch_dynamic_shapes", "export_onnx", "export_program", "trace_torchscript"]


def _check_example(model: torch.nn.Module, example: torch.Tensor) -> torch.Tensor:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if model.training:
        raise ValueError(
            "model is in training mode: call model.eval() before exporting it for inference"
        )
    if not isinstance(example, torch.Tensor) or example.dim() == 0 or example.shape[0] == 0:
        raise ValueError(
            "example must be a tensor with a non-empty batch dimension first, got "
            f"{getattr(example, 'shape', type(example).__name__)}"
        )
    if example.shape[0] == 1:
        # torch.export specialises size-1 dimensions: trace with batch 2 instead.
        example = example.expand(2, *example.shape[1:]).clone()
    return example


def batch_dynamic_shapes(max_batch: int | None = None) -> tuple[dict[int, Any]]:
    """``dynamic_shapes`` for one input with a dynamic batch (dim 0), ``1 <= B <= max_batch``."""
    return ({0: torch.export.Dim("batch", min=1, max=max_batch)},)


def export_program(
    model: torch.nn.Module, example: torch.Tensor, *, max_batch: int | None = None
) -> torch.export.ExportedProgram:
    """``torch.export.export`` with a dynamic batch dimension.

    Args:
        model: the module in ``eval()`` mode, e.g. ``Sequential(trunk, embedder)``.
        example: an example input ``(B, ...)``; every dimension but the batch
            is fixed in the exported program.
        max_batch: the largest batch the program accepts (``None``: no bound).

    Returns:
        The ``ExportedProgram``; run it with ``program.module()(x)``, save it
        with ``torch.export.save``.
    """
    example = _check_example(model, example)
    return torch.export.export(model, (example,), dynamic_shapes=batch_dynamic_shapes(max_batch))


def export_onnx(
    model: torch.nn.Module,
    example: torch.Tensor,
    path: str | os.PathLike,
    *,
    opset_version: int = 18,
    dynamo: bool = True,
    input_name: str = "images",
    output_name: str = "embeddings",
) -> None:
    """Write ``model`` to an ONNX file with a dynamic batch dimension.

    Args:
        model: the module in ``eval()`` mode.
        example: an example input ``(B, ...)``.
        path: the ``.onnx`` file to write.
        opset_version: the ONNX opset (17 or later).
        dynamo: use the ``torch.export``-based exporter (needs ``onnxscript``);
            ``False`` uses the older TorchScript-based exporter.
        input_name: the ONNX graph's input name.
        output_name: the ONNX graph's output name.
    """
    if opset_version < 17:
        raise ValueError(f"opset_version must be >= 17, got {opset_version}")
    example = _check_example(model, example)
    common = dict(
        input_names=[input_name],
        output_names=[output_name],
        opset_version=opset_version,
        dynamo=dynamo,
    )
    if dynamo:
        torch.onnx.export(
            model, (example,), os.fspath(path), dynamic_shapes=batch_dynamic_shapes(), **common
        )
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                model,
                (example,),
                os.fspath(path),
                dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}},
                **common,
            )


def trace_torchscript(model: torch.nn.Module, example: torch.Tensor) -> torch.jit.ScriptModule:
    """``torch.jit.trace`` of ``model`` (TorchScript), without the tracer's shape-check warnings.

    The trace accepts any batch size; save it with ``torch.jit.save``.
    """
    example = _check_example(model, example)
    with warnings.catch_warnings():
        # The input checks compare shapes with Python ints; the trace bakes them
        # in for the example's channel count, which is what the model expects.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in torch >= 2.9
        return torch.jit.trace(model, example)
