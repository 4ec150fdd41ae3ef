"""NetVLAD (Arandjelovic et al., CVPR 2016), a residual-encoder baseline beside CRT.

It takes the same input as :class:`~pml_crt.models.CRT` and has the same
optional input projection, so NetVLAD and CRT can be compared at equal numbers
of clusters/prototypes ``K`` and descriptor width ``d``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.module_with_records import ModuleWithRecords

from ..utils.layout import feature_map_to_tokens
from ..utils.validation import check_number, check_positive_int, check_tensor
from .input_projection import input_projection

_EPS = 1e-12


class NetVLAD(ModuleWithRecords):
    """NetVLAD pooling followed by an optional ``Linear(K * d, D)``.

    Shapes: input ``(B, C, H, W)`` or ``(B, N, C)``; descriptors ``X``
    ``(B, N, d)`` after the input projection (and L2 normalisation when
    ``normalize_input``); soft assignment ``A`` ``(B, N, K)``; VLAD ``V``
    ``(B, K, d)``; output ``(B, D)``.

    - soft assignment ``a_nk = softmax_k(w_k^T x_n + b_k)`` (one Linear
      ``d -> K`` applied to every position, i.e. a 1x1 convolution);
    - residual aggregation ``v_k = sum_n a_nk (x_n - c_k)`` with learnable
      centroids ``c_k``, computed as ``V = A^T X - (sum_n a_nk) c_k`` without
      building the ``(B, N, K, d)`` residual tensor, so memory is
      ``O(B*N*K + B*K*d)``;
    - intra-normalisation (L2 of each ``v_k``), then L2 normalisation of the
      flattened ``K * d`` vector;
    - ``Linear(K * d, D)`` (the paper's PCA-whitening layer, learned here).

    As in the paper, the assignment weights ``(w_k, b_k)`` and the centroids
    ``c_k`` are decoupled parameters. With ``alpha`` set they are initialised
    from the centroids as ``w_k = 2 alpha c_k``, ``b_k = -alpha ||c_k||^2``,
    so that the initial assignment is ``softmax_k(-alpha ||x_n - c_k||^2)``.
    With unit descriptors and unit centroids (the default initialisation) the
    logits are ``2 alpha cos(x_n, c_k)`` up to a constant, so ``alpha = 1 /
    (2 T)`` matches the sharpness of CRT's ``softmax(cos / T)``: the default
    ``alpha=5.0`` matches CRT's default ``temperature=0.1``.

    Args:
        in_channels: ``C``, the trunk's channel count.
        embedding_size: ``D``; ``None`` means no final Linear (the output is the
            normalised ``K * d`` VLAD vector).
        num_clusters: ``K``.
        projection_dim: ``d``; ``None`` means ``min(C, 512)``; ``0`` means no
            input projection (``d = C``). The projection is Linear + LayerNorm
            on each position, as in CRT.
        alpha: ``> 0``: initialise the assignment from the centroids with this
            sharpness (see above, and :meth:`set_centroids`); ``None``: PyTorch's
            default Linear initialisation for the assignment, independent of
            the centroids.
        normalize_input: L2-normalise each descriptor ``x_n`` before the
            assignment and the residuals (as in the paper).
        check_inputs: reject non-finite inputs (one reduction per forward).
    """

    def __init__(
        self,
        in_channels: int,
        embedding_size: int | None = 512,
        num_clusters: int = 64,
        *,
        projection_dim: int | None = None,
        alpha: float | None = 5.0,
        normalize_input: bool = True,
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        if embedding_size is not None:
            check_positive_int(embedding_size, "embedding_size")
        check_positive_int(num_clusters, "num_clusters")
        if alpha is not None:
            check_number(alpha, "alpha", greater_than=0.0)

        self.projection, projection_dim = input_projection(in_channels, projection_dim)

        self.in_channels = in_channels
        self.num_clusters = num_clusters
        self.projection_dim = projection_dim
        self.embedding_size = (
            num_clusters * projection_dim if embedding_size is None else embedding_size
        )
        self.alpha = None if alpha is None else float(alpha)
        self.normalize_input = normalize_input
        self.check_inputs = check_inputs

        self.centroids = torch.nn.Parameter(torch.empty(num_clusters, projection_dim))
        self.assign = torch.nn.Linear(projection_dim, num_clusters)
        self.fuse: torch.nn.Linear | None = (
            None
            if embedding_size is None
            else torch.nn.Linear(num_clusters * projection_dim, embedding_size)
        )
        self.reset_clusters()
        self.add_to_recordable_attributes(
            list_of_names=["num_clusters", "embedding_size", "projection_dim"], is_stat=False
        )

    def reset_clusters(self) -> None:
        """Re-initialise the centroids (random unit vectors) and the assignment.

        The assignment follows ``alpha`` (see the class docstring).
        """
        with torch.no_grad():
            torch.nn.init.normal_(self.centroids)
            self.centroids.copy_(F.normalize(self.centroids, dim=1, eps=_EPS))
            if self.alpha is None:
                self.assign.reset_parameters()
            else:
                self._assignment_from_centroids(self.alpha)

    @torch.no_grad()
    def set_centroids(self, centroids: torch.Tensor, alpha: float | None = None) -> None:
        """Set the centroids, e.g. from k-means on sampled descriptors.

        Args:
            centroids: ``(K, d)``, in the descriptor space (after the input
                projection and, with ``normalize_input``, on the unit sphere).
            alpha: re-derive the assignment as ``w_k = 2 alpha c_k``,
                ``b_k = -alpha ||c_k||^2`` with this value; ``None`` uses the
                module's ``alpha``; if both are ``None`` the assignment is kept.
        """
        centroids = check_tensor(centroids, "centroids")
        expected = (self.num_clusters, self.projection_dim)
        if tuple(centroids.shape) != expected:
            raise ValueError(
                f"centroids must have shape (num_clusters, projection_dim) = {expected}, "
                f"got {tuple(centroids.shape)}"
            )
        if not bool(torch.isfinite(centroids).all()):
            raise ValueError("centroids contains NaN or infinite values")
        if alpha is not None:
            check_number(alpha, "alpha", greater_than=0.0)
        self.centroids.copy_(centroids)
        alpha = self.alpha if alpha is None else float(alpha)
        if alpha is not None:
            self._assignment_from_centroids(alpha)

    def _assignment_from_centroids(self, alpha: float) -> None:
        self.assign.weight.copy_(2.0 * alpha * self.centroids)
        self.assign.bias.copy_(-alpha * self.centroids.pow(2).sum(dim=1))

    def descriptors(self, x: torch.Tensor) -> torch.Tensor:
        """Local descriptors ``X``: ``(B, N, d)`` (projected, optionally L2-normalised)."""
        tokens = feature_map_to_tokens(
            x, self.in_channels, "x", self.check_inputs, self.centroids.dtype
        )
        features = self.projection(tokens)
        if self.normalize_input:
            features = F.normalize(features, dim=-1, eps=_EPS)
        return features

    def soft_assignment(self, features: torch.Tensor) -> torch.Tensor:
        """``A``: ``(B, N, K)``, ``a_nk = softmax_k(w_k^T x_n + b_k)`` from ``(B, N, d)``."""
        return torch.softmax(self.assign(features), dim=-1)

    def vlad(self, x: torch.Tensor) -> torch.Tensor:
        """Intra-normalised VLAD descriptors.

        Args:
            x: ``(B, C, H, W)`` or ``(B, N, C)``.

        Returns:
            ``(B, K, d)``, each ``v_k`` L2-normalised (before the global
            normalisation).
        """
        features = self.descriptors(x)  # (B, N, d)
        weights = self.soft_assignment(features)  # (B, N, K)
        weighted_sum = weights.transpose(1, 2) @ features  # (B, K, d): sum_n a_nk x_n
        mass = weights.sum(dim=1).unsqueeze(-1)  # (B, K, 1): sum_n a_nk
        residuals = weighted_sum - mass * self.centroids  # (B, K, d): v_k
        return F.normalize(residuals, dim=-1, eps=_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a feature map.

        Args:
            x: ``(B, C, H, W)`` feature map or ``(B, N, C)`` token sequence,
                in the dtype of the module's parameters; under ``torch.autocast``
                float32, float16 and bfloat16 mix. Any other dtype raises
                ``TypeError`` naming both dtypes: the input is never cast.

        Returns:
            ``(B, embedding_size)`` embeddings; with ``embedding_size=None`` the
            L2-normalised ``(B, K * d)`` VLAD vector, otherwise the Linear's
            output (not normalised; PML's distances and testers normalise).
        """
        flat = F.normalize(self.vlad(x).flatten(1), dim=-1, eps=_EPS)  # (B, K * d)
        if self.fuse is None:
            return flat
        return self.fuse(flat)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, embedding_size={self.embedding_size}, "
            f"num_clusters={self.num_clusters}, projection_dim={self.projection_dim}, "
            f"alpha={self.alpha}, normalize_input={self.normalize_input}"
        )
