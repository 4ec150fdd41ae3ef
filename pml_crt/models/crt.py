"""Coded Residual Transform (CRT), one head (Kan et al., NeurIPS 2022).

The paper learns diversified prototypes, projects the feature map onto each
prototype and encodes the features by their projection residuals weighted by
their correlation with each prototype. Where the paper is silent, every
choice is a keyword option here. The coded-residual defaults (soft
assignment over prototypes, orthogonal residual, ``"flatten"`` fusion, no
diversity penalty) come from an ablation on Omniglot validation classes with
Multi-Similarity: no alternative did better, and ``"sum"`` fusion did worse.
The GeM branch (``global_pooling="gem"``) is the default because a grid over
Adam learning rates chose it (see :class:`CRT`).

The prototype diversity penalty is an explicit loss term: add
``weight * model.diversity_penalty()`` to the loss, or use
:class:`pml_crt.regularizers.PrototypeDiversityRegularizer` (through
:class:`pml_crt.losses.PrototypeRegularizedLoss` with PML's trainers).
"""

from __future__ import annotations

import math
import warnings
from typing import Literal

import torch
import torch.nn.functional as F
from pytorch_metric_learning.utils.module_with_records import ModuleWithRecords

from ..utils.layout import feature_map_to_tokens
from ..utils.validation import (
    check_choice,
    check_finite,
    check_number,
    check_positive_int,
    check_tensor,
)
from .fusion import PrototypeWiseLinear
from .global_pool_embedder import GlobalPoolEmbedder
from .input_projection import input_projection

__all__ = ["CRT", "prototype_diversity_losses", "prototype_diversity_penalty"]

Assignment = Literal["prototypes", "positions"]
Residual = Literal["orthogonal", "prototype"]
Fusion = Literal["flatten", "sum", "prototype_wise"]
GlobalPooling = Literal["avg", "max", "gem"]
PrototypeInit = Literal["orthogonal", "normal"]

_EPS = 1e-12


def prototype_diversity_losses(prototypes: torch.Tensor) -> torch.Tensor:
    """Per-prototype diversity terms of ``prototypes`` ``(K, d)``; shape ``(K,)``.

    Entry ``k`` is ``sum_{j != k} cos(p_k, p_j)^2 / (K - 1)``: the mean squared
    cosine similarity of prototype ``k`` with the others. With ``K < 2`` there
    are no pairs and every entry is 0. Their mean is
    :func:`prototype_diversity_penalty`.
    """
    num_prototypes = prototypes.shape[0]
    if num_prototypes < 2:
        return prototypes.new_zeros(num_prototypes)
    unit = F.normalize(prototypes, dim=1, eps=_EPS)
    gram = unit @ unit.t()  # (K, K)
    off_diagonal = gram - torch.eye(num_prototypes, dtype=gram.dtype, device=gram.device)
    return off_diagonal.pow(2).sum(dim=1) / (num_prototypes - 1)


def prototype_diversity_penalty(prototypes: torch.Tensor) -> torch.Tensor:
    """Mean squared off-diagonal cosine similarity of ``prototypes`` ``(K, d)``; a scalar.

    ``sum_{k != j} cos(p_k, p_j)^2 / (K (K - 1))``, 0 for ``K < 2``: the mean
    of :func:`prototype_diversity_losses`.
    """
    if prototypes.shape[0] < 2:
        return prototypes.new_zeros(())
    return prototype_diversity_losses(prototypes).mean()


def _fusion(fusion: str, num_prototypes: int, width: int, embedding_size: int) -> torch.nn.Module:
    """The fusion module of ``(B, K, d)`` coded residuals (see ``CRT``'s ``fusion``)."""
    if fusion == "flatten":
        return torch.nn.Linear(num_prototypes * width, embedding_size)
    if fusion == "sum":
        return torch.nn.Linear(width, embedding_size)
    return PrototypeWiseLinear(num_prototypes, width, embedding_size)


class CRT(ModuleWithRecords):
    """One Coded Residual Transform head.

    Shapes: input ``(B, C, H, W)`` or ``(B, N, C)``; ``X`` ``(B, N, d)`` after
    the input projection; prototypes ``P`` ``(K, d)``; correlation
    coefficients ``A`` ``(B, N, K)``; coded residuals ``E`` ``(B, K, d)``;
    output ``(B, embedding_size)``.

    The residual tensor ``(B, N, K, d)`` is never built: ``E = A^T X - c * P``,
    where ``c`` ``(B, K)`` is ``sum_n a_nk`` (``residual="prototype"``, so
    ``r_nk = x_n - p_k``) or ``sum_n a_nk <x_n, p̂_k>`` with ``P̂`` in place of
    ``P`` (``residual="orthogonal"``, so ``r_nk = x_n - <x_n, p̂_k> p̂_k``).
    Memory is ``O(B*N*K + B*K*d)``.

    A GeM branch is added by default (``global_pooling="gem"``): the input
    GeM-pooled and mapped by ``Linear(C, D)``, added to the fused coded
    residuals, whose fusion starts at zero. Training so starts from a GeM
    pooling head. Chosen by a grid over Adam head learning rates 1e-5, 1e-4
    and 1e-3 on Omniglot (7x7 map, trunk from scratch), CUB-200 and Cars196
    (224 px, ImageNet MobileNetV2), validation classes, 3 seeds: it was never
    significantly below a linear head, while without the branch the head was
    below it at 1e-4 and 1e-3 on CUB. ``global_pooling=None`` gives the head
    of pml-crt 0.1.0 (coded residuals only), which needs a low rate (1e-5
    with a pretrained trunk). GeM clamps its input at a small positive value,
    as suits a CNN's post-ReLU feature map; for inputs that can be negative
    (a ViT's tokens) pass ``global_pooling="avg"``.

    ``forward(x)`` is ``embed(encode(x), tokens(x))``; ``encode(x)`` is
    ``encode_projected(project(x))`` and ``project(x)`` is
    ``projection(tokens(x))``. These public steps, the input projection
    :attr:`projection` and :meth:`diversity_penalty` are the API that
    :class:`~pml_crt.models.MultiHeadCRT` builds on.

    Attributes:
        projection: the input projection, an
            :class:`~pml_crt.models.input_projection.InputProjection`
            (``Linear(C, d)`` + ``LayerNorm(d)``), or ``Identity`` when
            ``projection_dim=0``; state-dict keys ``projection.0.*`` and
            ``projection.1.*``.
        prototypes: the ``(K, d)`` prototype matrix ``P``, a parameter.
        fuse: the fusion, ``Linear(K*d, D)`` (``"flatten"``), ``Linear(d, D)``
            (``"sum"``) or a :class:`~pml_crt.models.fusion.PrototypeWiseLinear`.
        fusion_lr_scale: the factor :func:`pml_crt.utils.param_groups` applies
            to the learning rate of :attr:`fuse`: ``1 / K`` with
            ``scale_fusion_step`` and the ``"flatten"`` fusion, else 1.
        global_branch: with ``global_pooling``, the
            :class:`~pml_crt.models.GlobalPoolEmbedder` added to the fused
            coded residuals; else ``None``.

    Args:
        in_channels: ``C``, the trunk's channel count.
        embedding_size: ``D``, the output width.
        num_prototypes: ``K``.
        projection_dim: ``d``; ``None`` means ``min(C, 512)``; ``0`` means no
            input projection (``d = C``). The projection is Linear + LayerNorm
            on each position.
        assignment: ``"prototypes"`` normalises the correlation coefficients
            with a softmax over prototypes (NetVLAD-like soft assignment);
            ``"positions"`` with a softmax over positions (prototype as query).
        residual: ``"orthogonal"`` or ``"prototype"`` (see above).
        temperature: initial temperature ``T`` of ``softmax(cos / T)``.
        learn_temperature: learn ``T`` within ``temperature_bounds``.
        temperature_bounds: ``(T_min, T_max)``; ``T = T_min + (T_max - T_min) * sigmoid(t)``.
        fusion: ``"flatten"`` maps the flattened ``K * d`` coded residuals to
            ``D`` with one Linear; ``"sum"`` applies one shared Linear ``d -> D``
            to every prototype's coded residual and sums over prototypes;
            ``"prototype_wise"`` projects each prototype's coded residual to
            ``D / K`` values with its own ``Linear(d, D/K)`` and concatenates
            (``d * D`` weights instead of ``K * d * D``; ``D`` a multiple of ``K``).
        scale_fusion_step: with ``fusion="flatten"``, ask for the fusion's
            learning rate to be ``1 / K`` of the rest of the model's
            (:attr:`fusion_lr_scale`), so that each Adam step moves it as far
            as a fan-in-``d`` layer's instead of ``K`` times as far (the
            ``K * d`` fan-in otherwise makes the head's useful learning rates
            about ``K`` times lower than the other fusions'). It takes effect
            through optimizer parameter groups, the PyTorch idiom for a
            per-layer learning rate: build the optimizer with
            ``torch.optim.Adam(pml_crt.utils.param_groups(model, lr=...), ...)``;
            with ``model.parameters()`` it has no effect. Weight decay is
            untouched (the group keeps the optimizer's ``weight_decay``). No
            effect with ``"sum"`` or ``"prototype_wise"``, whose fan-in is
            already ``d``. Off by default.
        global_pooling: ``"gem"`` (the default), ``"avg"`` or ``"max"``: add a
            global branch, the input pooled and mapped by ``Linear(C, D)`` (a
            :class:`~pml_crt.models.GlobalPoolEmbedder`), to the fused coded
            residuals. The fusion then starts at zero (weights and bias), so
            training starts from the pooling head and the coded residuals add
            only what the loss finds useful. ``None``: no branch, the coded
            residuals alone (pml-crt 0.1.0's head).
        prototype_init: ``"orthogonal"`` (diversified) or ``"normal"``.
        diversity_weight: deprecated and without effect on training. A value
            other than 0 emits a ``FutureWarning`` and is only stored as the
            ``diversity_weight`` attribute. (It used to add the penalty's
            gradient inside the backward, which a ``GradScaler`` scale or a
            ``loss / steps`` of gradient accumulation did not reach.) Add the
            term to the loss instead: ``loss + w * model.diversity_penalty()``,
            or ``PrototypeRegularizedLoss(loss, model, prototype_reg_weight=w)``.
        check_inputs: reject non-finite inputs (one reduction per forward).
    """

    def __init__(
        self,
        in_channels: int,
        embedding_size: int = 512,
        num_prototypes: int = 64,
        *,
        projection_dim: int | None = None,
        assignment: Assignment = "prototypes",
        residual: Residual = "orthogonal",
        temperature: float = 0.1,
        learn_temperature: bool = True,
        temperature_bounds: tuple[float, float] = (0.01, 1.0),
        fusion: Fusion = "flatten",
        scale_fusion_step: bool = False,
        global_pooling: GlobalPooling | None = "gem",
        prototype_init: PrototypeInit = "orthogonal",
        diversity_weight: float = 0.0,
        check_inputs: bool = True,
    ) -> None:
        super().__init__()
        check_positive_int(in_channels, "in_channels")
        check_positive_int(embedding_size, "embedding_size")
        check_positive_int(num_prototypes, "num_prototypes")
        check_choice(assignment, "assignment", ("prototypes", "positions"))
        check_choice(residual, "residual", ("orthogonal", "prototype"))
        check_choice(fusion, "fusion", ("flatten", "sum", "prototype_wise"))
        if not isinstance(scale_fusion_step, bool):
            raise TypeError(
                f"scale_fusion_step must be a bool, got {type(scale_fusion_step).__name__}"
            )
        if global_pooling is not None:
            check_choice(global_pooling, "global_pooling", ("avg", "max", "gem"))
        check_choice(prototype_init, "prototype_init", ("orthogonal", "normal"))
        t_min, t_max = (float(t) for t in temperature_bounds)
        if not 0 < t_min < temperature < t_max:
            raise ValueError(
                "temperature must lie strictly inside temperature_bounds with "
                f"0 < T_min < temperature < T_max; got temperature={temperature}, "
                f"temperature_bounds={temperature_bounds}"
            )
        check_number(diversity_weight, "diversity_weight", at_least=0.0)
        if diversity_weight != 0:
            warnings.warn(
                "CRT(diversity_weight=...) is deprecated and has no effect: the diversity "
                "penalty is no longer added to the gradient behind the loss's back. Add it "
                "to the loss explicitly, `loss = loss + w * model.diversity_penalty()`, or "
                "wrap the loss: `pml_crt.losses.PrototypeRegularizedLoss(loss, model, "
                "prototype_reg_weight=w)`",
                FutureWarning,
                stacklevel=2,
            )

        self.projection, projection_dim = input_projection(in_channels, projection_dim)
        if residual == "orthogonal" and projection_dim == 1:
            raise ValueError(
                'residual="orthogonal" needs a feature width d >= 2 (with d = 1 every residual '
                "x - <x, p>p is zero); got projection_dim (or in_channels without projection) = 1"
            )

        self.in_channels = in_channels
        self.embedding_size = embedding_size
        self.num_prototypes = num_prototypes
        self.projection_dim = projection_dim
        self.assignment = assignment
        self.residual = residual
        self.fusion = fusion
        self.scale_fusion_step = scale_fusion_step
        self.prototype_init = prototype_init
        self.diversity_weight = float(diversity_weight)
        self.check_inputs = check_inputs
        self.temperature_bounds = (t_min, t_max)

        self.prototypes = torch.nn.Parameter(torch.empty(num_prototypes, projection_dim))
        raw = math.log((temperature - t_min) / (t_max - temperature))  # inverse sigmoid
        raw_temperature = torch.tensor(raw)
        if learn_temperature:
            self.raw_temperature = torch.nn.Parameter(raw_temperature)
        else:
            self.register_buffer("raw_temperature", raw_temperature)
        self.global_pooling = global_pooling
        self.fuse = _fusion(fusion, num_prototypes, projection_dim, embedding_size)
        self.fusion_lr_scale = (
            1.0 / num_prototypes if scale_fusion_step and fusion == "flatten" else 1.0
        )
        self.global_branch = None
        if global_pooling is not None:
            # The input is checked once, by this module.
            self.global_branch = GlobalPoolEmbedder(
                in_channels, embedding_size, pooling=global_pooling, check_inputs=False
            )
            with torch.no_grad():
                for parameter in self.fuse.parameters():
                    parameter.zero_()
        self.reset_prototypes()
        self.add_to_recordable_attributes(
            list_of_names=[
                "num_prototypes",
                "embedding_size",
                "projection_dim",
                "temperature_value",
            ],
            is_stat=False,
        )

    def reset_prototypes(self) -> None:
        """Re-initialise the prototypes with ``prototype_init``."""
        with torch.no_grad():
            if self.prototype_init == "orthogonal":
                torch.nn.init.orthogonal_(self.prototypes)
            else:
                torch.nn.init.normal_(self.prototypes)

    @torch.no_grad()
    def set_prototypes(self, prototypes: torch.Tensor) -> None:
        """Set the prototypes, e.g. to k-means centres of :meth:`project`'s features.

        :func:`pml_crt.models.prototype_init.init_from_data` does this from a
        data loader before training.

        Args:
            prototypes: ``(K, d)``, in the projected feature space.
        """
        prototypes = check_tensor(prototypes, "prototypes")
        expected = (self.num_prototypes, self.projection_dim)
        if tuple(prototypes.shape) != expected:
            raise ValueError(
                f"prototypes must have shape (num_prototypes, projection_dim) = {expected}, "
                f"got {tuple(prototypes.shape)}"
            )
        check_finite(prototypes, "prototypes")
        self.prototypes.copy_(prototypes)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:  # noqa: ANN001
        # pml-crt 0.1.0 stored a scale_fusion_step fusion as ``fuse.scaled_weight`` and
        # ``fuse.scaled_bias`` (its Linear's weight and bias times K): load them as a Linear.
        for name in ("weight", "bias"):
            scaled = state_dict.pop(f"{prefix}fuse.scaled_{name}", None)
            if scaled is not None:
                state_dict[f"{prefix}fuse.{name}"] = scaled / self.num_prototypes
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def temperature(self) -> torch.Tensor:
        """The current temperature ``T``, a scalar tensor inside ``temperature_bounds``."""
        t_min, t_max = self.temperature_bounds
        return t_min + (t_max - t_min) * torch.sigmoid(self.raw_temperature)

    @property
    def temperature_value(self) -> float:
        """``temperature`` as a Python float (what record-keeper logs)."""
        return float(self.temperature.detach())

    def diversity_penalty(self) -> torch.Tensor:
        """Mean squared off-diagonal cosine similarity of the prototypes; a scalar.

        Differentiable with respect to :attr:`prototypes`: add
        ``weight * diversity_penalty()`` to the loss to diversify them. Equals
        ``PrototypeDiversityRegularizer()(self.prototypes)``.
        """
        return prototype_diversity_penalty(self.prototypes)

    def tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x`` and flatten it to tokens.

        Args:
            x: ``(B, C, H, W)`` feature map or ``(B, N, C)`` token sequence
                (``N = H * W``, row-major).

        Returns:
            ``(B, N, C)``.
        """
        return feature_map_to_tokens(
            x, self.in_channels, "x", self.check_inputs, self.prototypes.dtype
        )

    def project(self, x: torch.Tensor) -> torch.Tensor:
        """Check ``x``, flatten it to tokens and apply the input projection.

        Args:
            x: ``(B, C, H, W)`` feature map or ``(B, N, C)`` token sequence.

        Returns:
            ``(B, N, d)`` projected features ``X``.
        """
        return self.projection(self.tokens(x))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Per-prototype L2-normalised coded residuals of a feature map.

        Args:
            x: ``(B, C, H, W)`` feature map or ``(B, N, C)`` token sequence.

        Returns:
            ``(B, K, d)`` coded residuals ``E``, each row of unit norm.
        """
        return self.encode_projected(self.project(x))

    def coded_residuals(self, x: torch.Tensor) -> torch.Tensor:
        """The same as :meth:`encode`: ``(B, C, H, W)`` or ``(B, N, C)`` to ``(B, K, d)``."""
        return self.encode(x)

    def encode_projected(self, features: torch.Tensor) -> torch.Tensor:
        """Coded residuals of already projected features (:meth:`project`'s output).

        Args:
            features: ``(B, N, d)``.

        Returns:
            ``(B, K, d)`` coded residuals ``E``, each row of unit norm.
        """
        unit_prototypes = F.normalize(self.prototypes, dim=1, eps=_EPS)  # (K, d)
        projections = features @ unit_prototypes.t()  # (B, N, K): <x_n, p̂_k>
        norms = features.norm(dim=-1, keepdim=True).clamp_min(_EPS)  # (B, N, 1)
        logits = projections / (norms * self.temperature)
        softmax_dim = 2 if self.assignment == "prototypes" else 1
        weights = torch.softmax(logits, dim=softmax_dim)  # (B, N, K): a_nk
        weighted_sum = weights.transpose(1, 2) @ features  # (B, K, d): sum_n a_nk x_n
        if self.residual == "prototype":
            coefficients = weights.sum(dim=1)  # (B, K)
            coded = weighted_sum - coefficients.unsqueeze(-1) * self.prototypes
        else:
            coefficients = (weights * projections).sum(dim=1)  # (B, K)
            coded = weighted_sum - coefficients.unsqueeze(-1) * unit_prototypes
        return F.normalize(coded, dim=-1, eps=_EPS)

    def embed(self, coded: torch.Tensor, tokens: torch.Tensor | None = None) -> torch.Tensor:
        """Fuse coded residuals into embeddings with :attr:`fuse` (+ the global branch).

        Args:
            coded: ``(B, K, d)``, e.g. :meth:`encode`'s output.
            tokens: ``(B, N, C)``, :meth:`tokens`' output; needed (only) with
                ``global_pooling``, whose branch pools them.

        Returns:
            ``(B, embedding_size)`` embeddings (not normalised).
        """
        if self.fusion == "flatten":
            embeddings = self.fuse(coded.flatten(1))
        elif self.fusion == "sum":
            embeddings = self.fuse(coded).sum(dim=1)
        else:
            embeddings = self.fuse(coded)
        if self.global_branch is None:
            return embeddings
        if tokens is None:
            raise ValueError(
                "embed(coded, tokens): tokens (B, N, C), the input as tokens, is required "
                f"with global_pooling={self.global_pooling!r}"
            )
        return embeddings + self.global_branch(tokens)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Embed a feature map: ``embed(encode(x), tokens(x))``.

        Args:
            x: ``(B, C, H, W)`` feature map or ``(B, N, C)`` token sequence,
                in the dtype of the module's parameters; under ``torch.autocast``
                float32, float16 and bfloat16 mix. Any other dtype raises
                ``TypeError`` naming both dtypes: the input is never cast.

        Returns:
            ``(B, embedding_size)`` embeddings (not normalised; PML's distances
            and testers normalise).
        """
        tokens = self.tokens(x)
        return self.embed(self.encode_projected(self.projection(tokens)), tokens)

    def extra_repr(self) -> str:
        return (
            f"in_channels={self.in_channels}, embedding_size={self.embedding_size}, "
            f"num_prototypes={self.num_prototypes}, projection_dim={self.projection_dim}, "
            f"assignment={self.assignment!r}, residual={self.residual!r}, fusion={self.fusion!r}"
            + ("" if self.global_pooling is None else f", global_pooling={self.global_pooling!r}")
        )
