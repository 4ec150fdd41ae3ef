"""Matrix-product FLOPs of the embedding heads: hand formulas and an exact count.

The heads' cost is dominated by matrix products; element-wise work (norms,
softmax, LayerNorm, pooling) is memory traffic and is not counted. Notation:
``B`` batch, ``N = H*W`` positions, ``C`` input channels, ``d`` projection
width (``min(C, 512)`` by default), ``K`` prototypes/clusters, ``D``
embedding width; one multiply-add is 2 FLOPs.

Forward matrix products per head:

- ``avg`` / ``gem`` (:class:`~pml_crt.models.GlobalPoolEmbedder`): the Linear
  on the pooled features, ``2*B*C*D``.
- ``netvlad`` (:class:`~pml_crt.models.NetVLAD`): input projection
  ``2*B*N*C*d``, assignment logits ``2*B*N*d*K``, ``A^T X``
  ``2*B*K*N*d``, final Linear ``2*B*K*d*D``.
- ``crt`` (:class:`~pml_crt.models.CRT`, its defaults: ``fusion="flatten"``
  and a GeM branch): input projection ``2*B*N*C*d``, projections ``X P̂^T``
  ``2*B*N*d*K``, ``A^T X`` ``2*B*K*N*d``, fusion Linear ``2*B*K*d*D``
  (``fusion="sum"``: ``2*B*K*d*D`` as well, one ``d -> D`` Linear per
  prototype), and the GeM branch's Linear ``2*B*C*D``.
- ``multihead`` (:class:`~pml_crt.models.MultiHeadCRT`, its defaults): the sum
  over heads of ``crt``.

Backward: every one of these products has both operands requiring a gradient
when the input feature map does (as it does when the trunk is trained), so
backward costs two products of the same size, and forward + backward is
``3 x`` forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch.utils.flop_counter import FlopCounterMode

__all__ = ["count_flops", "head_matmul_flops"]


def head_matmul_flops(
    head: str,
    *,
    B: int,
    N: int,
    C: int,
    K: int,
    D: int,
    d: int | None = None,
    heads: tuple[tuple[int, int], ...] | None = None,
    backward: bool = False,
) -> int:
    """Hand-formula matrix-product FLOPs of one head (see the module docstring).

    Args:
        head: ``"avg"``, ``"gem"``, ``"netvlad"``, ``"crt"``, ``"crt_sum"`` (CRT with
            ``fusion="sum"``) or ``"multihead"``.
        B, N, C, K, D: batch, positions, channels, prototypes, embedding width.
        d: projection width; ``None`` means ``min(C, 512)``.
        heads: ``(K_h, D_h)`` of every head for ``"multihead"``.
        backward: include the backward pass (``3 x`` forward).
    """
    d = min(C, 512) if d is None else d
    if head in ("avg", "gem"):
        forward = 2 * B * C * D
    elif head == "netvlad":
        forward = 2 * B * N * C * d + 2 * B * N * d * K + 2 * B * K * N * d + 2 * B * K * d * D
    elif head in ("crt", "crt_sum"):
        coded = 2 * B * N * C * d + 2 * B * N * d * K + 2 * B * K * N * d + 2 * B * K * d * D
        forward = coded + head_matmul_flops("gem", B=B, N=N, C=C, K=K, D=D)
    elif head == "multihead":
        if not heads:
            raise ValueError("heads=((K_h, D_h), ...) is required for 'multihead'")
        forward = sum(head_matmul_flops("crt", B=B, N=N, C=C, K=k, D=e, d=d) for k, e in heads)
    else:
        raise ValueError(f"unknown head {head!r}")
    return 3 * forward if backward else forward


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs that ``torch.utils.flop_counter.FlopCounterMode`` counts while ``fn`` runs.

    The counter covers matrix products and convolutions (exact for them) and
    nothing element-wise, which is what :func:`head_matmul_flops` counts too.
    """
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())
