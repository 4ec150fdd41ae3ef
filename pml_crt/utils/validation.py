"""Input checks shared by every embedder, loss and regularizer of pml-crt.

Each check raises ``ValueError`` or ``TypeError`` whose message names the
argument and the expected shape, so that bad input never turns into a silent
wrong answer or a NaN further down.

Only :func:`check_finite` reads tensor values (one read back to the host, a
device synchronisation); every other check looks at types, shapes and dtypes.

:mod:`pml_crt.utils.layout` builds on these checks; this module imports
nothing else from pml-crt.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch


class NonFiniteError(ValueError):
    """A tensor that must be finite holds NaN or infinite values (training diverged)."""


def check_tensor(x: object, name: str) -> torch.Tensor:
    """Raise ``TypeError`` unless ``x`` is a floating-point tensor."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
    return x


def check_positive_int(value: object, name: str) -> None:
    """Raise ``ValueError`` unless ``value`` is a positive integer (numpy ints too, not bools)."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_number(
    value: object,
    name: str,
    *,
    greater_than: float | None = None,
    at_least: float | None = None,
) -> float:
    """Return ``value`` as a float, or raise unless it is a finite real number in range.

    Args:
        value: the argument to check (bools are rejected).
        name: the argument name used in the error message.
        greater_than: exclusive lower bound, if any.
        at_least: inclusive lower bound, if any.
    """
    bounds = []
    if greater_than is not None:
        bounds.append(f"> {greater_than:g}")
    if at_least is not None:
        bounds.append(f">= {at_least:g}")
    expected = "a finite number" + (" " + " and ".join(bounds) if bounds else "")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    number = float(value)
    if (
        not math.isfinite(number)
        or (greater_than is not None and not number > greater_than)
        or (at_least is not None and not number >= at_least)
    ):
        raise ValueError(f"{name} must be {expected}, got {value!r}")
    return number


def check_choice(value: object, name: str, choices: tuple[str, ...]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")


def is_graph_capture() -> bool:
    """True while ``torch.export``, ``torch.jit.trace`` or ``torch.jit.script`` captures a graph.

    A value check (``bool(tensor)``) is data-dependent: ``torch.export``
    refuses it and a trace would bake its outcome in as a constant. Value
    checks are therefore skipped during capture (the exported graph does not
    check values); eager calls still check, and so does ``torch.compile``
    (at the cost of a graph break; ``fullgraph=True`` needs ``check_inputs=False``).
    """
    if torch.jit.is_scripting() or torch.jit.is_tracing():
        return True
    is_exporting = getattr(torch.compiler, "is_exporting", None)  # torch >= 2.4
    return is_exporting is not None and is_exporting()


def check_finite(x: torch.Tensor, name: str) -> None:
    """Raise :class:`NonFiniteError` if ``x`` holds NaN or infinite values (not during export)."""
    if is_graph_capture() or x.numel() == 0:
        return
    # min and max are NaN when any value is, and infinite when any value is: one
    # reduction pass, several times faster than materialising isfinite(x).
    low, high = torch.aminmax(x.detach())
    if not bool(torch.isfinite(low) & torch.isfinite(high)):
        raise NonFiniteError(f"{name} contains NaN or infinite values")


def check_input_dtype(x: torch.Tensor, dtype: torch.dtype, name: str = "x") -> None:
    """Raise ``TypeError`` unless ``x`` can meet parameters of ``dtype`` as it is.

    The input is never cast: a float64 feature map given to a float32 module
    (or the reverse) is an error: the module would fail in its first matrix
    product, and a silent cast would compute in a precision the caller did
    not choose.
    Under ``torch.autocast`` for ``x``'s device, autocast itself casts float32,
    float16 and bfloat16 to its dtype for every matrix product, so those mix
    freely; float64 is left alone by autocast, so it must still match.
    Only dtypes are compared: no host synchronisation.

    Args:
        x: a floating-point tensor.
        dtype: the dtype of the parameters ``x`` is multiplied with.
        name: the argument name used in the error message.
    """
    if x.dtype == dtype:
        return
    if (
        torch.is_autocast_enabled(x.device.type)
        and x.dtype != torch.float64
        and dtype != torch.float64
    ):
        return
    raise TypeError(
        f"{name} has dtype {x.dtype}, but the module's parameters are {dtype}: pass "
        f"{name}.to({dtype}) or convert the module with .to({x.dtype}) (under torch.autocast, "
        "float32, float16 and bfloat16 inputs are accepted; float64 never mixes)"
    )


def check_embedding_sizes(
    embedding_sizes: Sequence[int], name: str = "embedding_sizes"
) -> list[int]:
    """Return ``embedding_sizes`` as a list of positive ints, or raise."""
    if isinstance(embedding_sizes, int) or not isinstance(embedding_sizes, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {embedding_sizes!r}")
    sizes = list(embedding_sizes)
    if len(sizes) == 0 or not all(
        isinstance(s, numbers.Integral) and not isinstance(s, bool) and s > 0 for s in sizes
    ):
        raise ValueError(f"{name} must be a non-empty sequence of positive ints, got {sizes}")
    return sizes


def check_embeddings(
    embeddings: object,
    embedding_sizes: Sequence[int],
    name: str = "embeddings",
    check_values: bool = True,
) -> torch.Tensor:
    """Check a ``(B, sum(embedding_sizes))`` concatenated multi-head embedding.

    ``check_values`` also rejects NaN and infinite values (:func:`check_finite`,
    one read back to the host); shape and dtype checks never synchronise.
    """
    embeddings = check_tensor(embeddings, name)
    total = sum(embedding_sizes)
    if embeddings.dim() != 2 or embeddings.shape[1] != total:
        raise ValueError(
            f"{name} must have shape (B, {total}) = (B, sum(embedding_sizes="
            f"{list(embedding_sizes)})), got {tuple(embeddings.shape)}"
        )
    if check_values:
        check_finite(embeddings, name)
    return embeddings
