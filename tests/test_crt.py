"""CRT and MultiHeadCRT against a slow reference that materialises every residual.

The tests of the coded-residual math build heads without a global branch
(``global_pooling=None``); the branch is tested in ``test_crt_options.py``.
"""

import itertools
import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pml_crt.models import CRT, MultiHeadCRT
from pml_crt.models.input_projection import InputProjection, project_jointly

OPTIONS = list(
    itertools.product(
        ("prototypes", "positions"),  # assignment
        ("orthogonal", "prototype"),  # residual
        ("flatten", "sum"),  # fusion
        (None, 0),  # projection_dim: default Linear + LayerNorm, or none
    )
)


def _dot(u, v):
    return sum(u[i] * v[i] for i in range(len(u)))


def _norm(u):
    return math.sqrt(max(float(_dot(u, u)), 0.0)) if not torch.is_tensor(u) else _dot(u, u).sqrt()


def _reference_projection(module: CRT, token: torch.Tensor) -> torch.Tensor:
    """Linear + LayerNorm of one ``(C,)`` token, written out by hand."""
    if isinstance(module.projection, torch.nn.Identity):
        return token
    linear, layer_norm = module.projection
    d = linear.out_features
    y = torch.stack([_dot(linear.weight[j], token) + linear.bias[j] for j in range(d)])
    mean = sum(y[j] for j in range(d)) / d
    var = sum((y[j] - mean) ** 2 for j in range(d)) / d
    return torch.stack(
        [
            (y[j] - mean) / torch.sqrt(var + layer_norm.eps) * layer_norm.weight[j]
            + layer_norm.bias[j]
            for j in range(d)
        ]
    )


def reference_crt(module: CRT, x: torch.Tensor) -> torch.Tensor:
    """CRT forward with explicit loops; builds every residual ``r_nk``."""
    tokens = x.flatten(2).transpose(1, 2) if x.dim() == 4 else x
    batch, positions, _ = tokens.shape
    K = module.num_prototypes
    T = module.temperature
    outputs = []
    for b in range(batch):
        feats = [_reference_projection(module, tokens[b, n]) for n in range(positions)]
        protos = [module.prototypes[k] for k in range(K)]
        unit = [p / _norm(p) for p in protos]
        logits = [[_dot(f, unit[k]) / _norm(f) / T for k in range(K)] for f in feats]
        if module.assignment == "prototypes":
            a = [
                [torch.exp(logits[n][k]) / sum(torch.exp(v) for v in logits[n]) for k in range(K)]
                for n in range(positions)
            ]
        else:
            a = [
                [
                    torch.exp(logits[n][k]) / sum(torch.exp(logits[m][k]) for m in range(positions))
                    for k in range(K)
                ]
                for n in range(positions)
            ]
        coded = []
        for k in range(K):
            residuals = []
            for n in range(positions):
                if module.residual == "prototype":
                    residuals.append(feats[n] - protos[k])
                else:
                    residuals.append(feats[n] - _dot(feats[n], unit[k]) * unit[k])
            e_k = sum(a[n][k] * residuals[n] for n in range(positions))
            coded.append(e_k / _norm(e_k))
        W, bias = module.fuse.weight, module.fuse.bias
        if module.fusion == "flatten":
            flat = torch.cat(coded)
            out = torch.stack([_dot(W[j], flat) + bias[j] for j in range(W.shape[0])])
        else:
            out = sum(
                torch.stack([_dot(W[j], e_k) + bias[j] for j in range(W.shape[0])]) for e_k in coded
            )
        outputs.append(out)
    return torch.stack(outputs)


def _randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Move LayerNorm and bias parameters off their identity initialisation, and scale
    every prototype by its own factor in [0.5, 2], so that the prototypes are not unit
    vectors (the orthogonal initialisation makes them orthonormal, which would hide any
    mix-up of ``P`` and ``P̂``)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias") or "projection.1" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * 0.3 + 0.1)
            elif name.endswith("prototypes"):
                scale = torch.rand(p.shape[0], 1, generator=generator, dtype=p.dtype)
                p.mul_(0.5 + 1.5 * scale)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize("assignment,residual,fusion,projection_dim", OPTIONS)
def test_matches_loop_reference(assignment, residual, fusion, projection_dim, dtype, tol):
    torch.manual_seed(0)
    module = CRT(
        6,
        embedding_size=5,
        num_prototypes=3,
        projection_dim=projection_dim if projection_dim == 0 else 4,
        assignment=assignment,
        residual=residual,
        fusion=fusion,
        temperature=0.3,
        global_pooling=None,
    ).to(dtype)
    _randomise(module)
    assert (module.prototypes.norm(dim=1) - 1).abs().max() > 0.2
    x = torch.randn(2, 6, 3, 2, dtype=dtype)
    with torch.no_grad():
        expected = reference_crt(module, x)
        actual = module(x)
    assert actual.shape == (2, 5)
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol)


@pytest.mark.parametrize("assignment,residual,fusion,projection_dim", OPTIONS)
def test_gradcheck(assignment, residual, fusion, projection_dim):
    torch.manual_seed(1)
    module = CRT(
        4,
        embedding_size=3,
        num_prototypes=3,
        projection_dim=projection_dim if projection_dim == 0 else 3,
        assignment=assignment,
        residual=residual,
        fusion=fusion,
        temperature=0.5,
        global_pooling=None,
    ).double()
    _randomise(module)
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    params = [module.prototypes, module.raw_temperature]

    def run(inp, prototypes, raw_temperature):
        with torch.no_grad():
            module.prototypes.copy_(prototypes)
            module.raw_temperature.copy_(raw_temperature)
        # Route the parameters through the graph explicitly for gradcheck.
        saved = module.prototypes, module.raw_temperature
        del module.prototypes, module.raw_temperature
        module.prototypes, module.raw_temperature = prototypes, raw_temperature
        try:
            return module(inp)
        finally:
            del module.prototypes, module.raw_temperature
            module.prototypes, module.raw_temperature = saved

    inputs = (x,) + tuple(p.detach().clone().requires_grad_(True) for p in params)
    assert torch.autograd.gradcheck(run, inputs, eps=1e-6, atol=1e-5)


def test_gradcheck_layers_through_module_parameters():
    """Gradients of every parameter (projection, fusion) match finite differences."""
    torch.manual_seed(2)
    module = CRT(3, 2, 2, projection_dim=2, global_pooling=None).double()
    _randomise(module)
    x = torch.randn(2, 3, 2, 1, dtype=torch.float64)
    for name, param in module.named_parameters():
        original = param.detach().clone()

        def run(p, name=name):
            module.get_parameter(name).data.copy_(p)
            return module(x).pow(2).sum()

        analytic = torch.autograd.grad(
            module(x).pow(2).sum(), module.get_parameter(name), retain_graph=False
        )[0]
        numeric = torch.zeros_like(original)
        flat = numeric.view(-1)
        for i in range(original.numel()):
            for sign in (1, -1):
                shifted = original.clone()
                shifted.view(-1)[i] += sign * 1e-6
                with torch.no_grad():
                    flat[i] += sign * run(shifted) / 2e-6
        module.get_parameter(name).data.copy_(original)
        torch.testing.assert_close(analytic, numeric, rtol=1e-5, atol=1e-6, msg=name)


def test_spatial_permutation_invariance_and_token_layout():
    torch.manual_seed(3)
    module = CRT(8, 6, 4, global_pooling=None).eval()
    x = torch.randn(3, 8, 4, 5)
    tokens = x.flatten(2).transpose(1, 2)
    permuted = tokens[:, torch.randperm(20)]
    torch.testing.assert_close(module(x), module(tokens))
    torch.testing.assert_close(module(x), module(permuted), rtol=1e-5, atol=1e-6)


def test_batch_independence_in_eval():
    torch.manual_seed(4)
    module = CRT(8, 6, 4, global_pooling=None).eval()
    x = torch.randn(5, 8, 3, 3)
    together = module(x)
    alone = torch.cat([module(x[i : i + 1]) for i in range(5)])
    torch.testing.assert_close(together, alone, rtol=1e-5, atol=1e-6)


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator returns, forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("residual", ["orthogonal", "prototype"])
@pytest.mark.parametrize("assignment", ["prototypes", "positions"])
def test_never_materialises_the_residual_tensor(residual, assignment):
    """No operator, forward or backward, returns anything of size ``B*N*K*d``."""
    B, C, side, K, d, D = 2, 16, 8, 32, 64, 4
    N = side * side
    module = CRT(C, D, K, projection_dim=d, residual=residual, assignment=assignment)
    x = torch.randn(B, C, side, side, requires_grad=True)
    with _LargestTensor() as probe:
        module(x).sum().backward()
    bound = max(B * N * max(C, d, K), B * K * d, K * d * D)
    assert probe.largest <= bound, (probe.largest, bound)
    assert probe.largest * 16 <= B * N * K * d


def test_largest_intermediate_grows_linearly_in_prototypes():
    sizes = []
    for K in (16, 64):
        module = CRT(8, 4, K, projection_dim=32)
        x = torch.randn(2, 8, 12, 12, requires_grad=True)
        with _LargestTensor() as probe:
            module(x).sum().backward()
        sizes.append(probe.largest)
    assert sizes[1] <= 4 * sizes[0] + 1


def test_diversity_penalty_value():
    torch.manual_seed(5)
    module = CRT(4, 3, 3, projection_dim=0, prototype_init="normal")
    P = module.prototypes.detach()
    unit = [P[k] / P[k].norm() for k in range(3)]
    expected = sum(float(_dot(unit[a], unit[b])) ** 2 for a in range(3) for b in range(3) if a != b)
    expected /= 6
    assert module.diversity_penalty().item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    "build",
    [
        lambda **kw: CRT(4, 3, 3, projection_dim=0, prototype_init="normal", **kw),
        lambda **kw: MultiHeadCRT(
            4, [(3, 3), (2, 2)], eval_output="concat", prototype_init="normal", **kw
        ),
    ],
    ids=["CRT", "MultiHeadCRT"],
)
def test_diversity_weight_is_deprecated_and_adds_no_gradient(build):
    """``diversity_weight`` warns and changes nothing: the penalty is an explicit term."""
    torch.manual_seed(7)
    plain = build().double().train()
    with pytest.warns(FutureWarning, match=r"diversity_penalty\(\)"):
        weighted = build(diversity_weight=0.5).double().train()
    weighted.load_state_dict(plain.state_dict())
    heads = list(weighted.heads) if isinstance(weighted, MultiHeadCRT) else [weighted]
    assert all(head.diversity_weight == 0.5 for head in heads)
    x = torch.randn(2, 4, 2, 2, dtype=torch.float64)
    plain(x).sum().backward()
    weighted(x).sum().backward()
    for a, b in zip(plain.parameters(), weighted.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


def test_no_warning_without_diversity_weight(recwarn):
    CRT(4, 3, 3)
    MultiHeadCRT(4, [(3, 3), (2, 2)], diversity_weight=0.0)
    assert not [w for w in recwarn if issubclass(w.category, FutureWarning)]


def test_public_steps_compose_to_forward():
    torch.manual_seed(8)
    module = CRT(6, 5, 3, projection_dim=4, global_pooling=None).double()
    _randomise(module)
    x = torch.randn(2, 6, 3, 2, dtype=torch.float64)
    features = module.project(x)
    assert features.shape == (2, 6, 4)
    coded = module.encode_projected(features)
    assert coded.shape == (2, 3, 4)
    torch.testing.assert_close(coded.norm(dim=-1), torch.ones(2, 3, dtype=torch.float64))
    torch.testing.assert_close(module.encode(x), coded, rtol=0, atol=0)
    torch.testing.assert_close(module.coded_residuals(x), coded, rtol=0, atol=0)
    assert module.embed(coded).shape == (2, 5)
    torch.testing.assert_close(module(x), module.embed(coded), rtol=0, atol=0)
    assert module.projection.linear is module.projection[0]
    assert module.projection.norm is module.projection[1]


def test_state_dict_keys_are_unchanged():
    """Checkpoints saved with the ``Sequential(Linear, LayerNorm)`` projection still load."""
    module = CRT(6, 5, 3, projection_dim=4, global_pooling=None)
    shapes = {
        "prototypes": (3, 4),
        "raw_temperature": (),
        "projection.0.weight": (4, 6),
        "projection.0.bias": (4,),
        "projection.1.weight": (4,),
        "projection.1.bias": (4,),
        "fuse.weight": (5, 12),
        "fuse.bias": (5,),
    }
    old_style = {name: torch.randn(shape) for name, shape in shapes.items()}
    module.load_state_dict(old_style, strict=True)
    assert {k: tuple(v.shape) for k, v in module.state_dict().items()} == shapes
    torch.testing.assert_close(module.projection.linear.weight, old_style["projection.0.weight"])
    multi = MultiHeadCRT(6, [(3, 5), (2, 4)], projection_dim=4)
    assert "heads.1.projection.1.bias" in multi.state_dict()


def test_project_jointly_equals_each_projection():
    torch.manual_seed(9)
    projections = [
        InputProjection(6, 4),
        torch.nn.Identity(),
        InputProjection(6, 3),
        torch.nn.Linear(6, 2),
        InputProjection(6, 5),
    ]
    for projection in projections:
        _randomise(projection)
    tokens = torch.randn(2, 7, 6)
    joint = project_jointly(projections, tokens)
    assert [tuple(f.shape) for f in joint] == [(2, 7, d) for d in (4, 6, 3, 2, 5)]
    for got, projection in zip(joint, projections, strict=True):
        torch.testing.assert_close(got, projection(tokens), rtol=1e-5, atol=1e-6)


def test_orthogonal_prototypes_have_zero_penalty():
    module = CRT(64, 8, 16)
    assert module.diversity_penalty().item() < 1e-10


def test_temperature_stays_in_bounds():
    module = CRT(4, 3, 2, temperature=0.2, temperature_bounds=(0.05, 0.5))
    assert module.temperature_value == pytest.approx(0.2)
    with torch.no_grad():
        module.raw_temperature.fill_(1e4)
    assert module.temperature_value == pytest.approx(0.5)
    fixed = CRT(4, 3, 2, learn_temperature=False)
    assert "raw_temperature" not in dict(fixed.named_parameters())


@pytest.mark.parametrize(
    "x,match",
    [
        (torch.randn(2, 8), r"x must be a \(B, C, H, W\) feature map"),
        (torch.randn(2, 5, 3, 3), r"x has 5 channels.*in_channels=8"),
        (torch.randn(2, 9, 5), r"x has 5 channels.*in_channels=8"),
        (torch.randn(0, 8, 3, 3), r"x is empty"),
        (torch.full((2, 8, 3, 3), float("nan")), r"x contains NaN"),
        (torch.randint(0, 3, (2, 8, 3, 3)), r"x must be a floating-point tensor"),
        ([[1.0]], r"x must be a torch.Tensor"),
    ],
)
def test_bad_input_is_rejected(x, match):
    module = CRT(8, 4, 2)
    with pytest.raises((ValueError, TypeError), match=match):
        module(x)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"in_channels": 0}, "in_channels must be a positive int"),
        ({"num_prototypes": 2.5}, "num_prototypes must be a positive int"),
        ({"assignment": "rows"}, "assignment must be one of"),
        ({"residual": "vlad"}, "residual must be one of"),
        ({"fusion": "mean"}, "fusion must be one of"),
        ({"temperature": 2.0}, "temperature must lie strictly inside"),
        ({"diversity_weight": -1.0}, "diversity_weight must be a finite number >= 0"),
        ({"projection_dim": -3}, "projection_dim must be a positive int"),
        ({"projection_dim": False}, "projection_dim must be a positive int"),
        ({"projection_dim": 1}, r'residual="orthogonal" needs a feature width d >= 2'),
        ({"diversity_weight": float("nan")}, "diversity_weight must be a finite number"),
    ],
)
def test_bad_constructor_arguments(kwargs, match):
    args = {"in_channels": 8, "embedding_size": 4, "num_prototypes": 2, **kwargs}
    with pytest.raises(ValueError, match=match):
        CRT(**args)


def test_multi_head_train_concat_eval_primary():
    torch.manual_seed(6)
    module = MultiHeadCRT(8, heads=[(4, 6), {"num_prototypes": 2, "embedding_size": 3}])
    x = torch.randn(3, 8, 2, 2)
    assert module.embedding_sizes == [6, 3]
    concatenated = module(x)
    assert concatenated.shape == (3, 9)
    module.eval()
    torch.testing.assert_close(module(x), module.heads[0](x))
    torch.testing.assert_close(concatenated[:, :6], module.heads[0](x))
    torch.testing.assert_close(concatenated[:, 6:], module.heads[1](x))
    module.eval_output = "concat"
    assert module(x).shape == (3, 9)
    assert module.embedding_size == 9


def test_multi_head_shares_options_and_records_head_attributes():
    module = MultiHeadCRT(8, heads=[(4, 6), (2, 3)], residual="prototype", temperature=0.2)
    assert all(head.residual == "prototype" for head in module.heads)
    assert module.head1_num_prototypes == 2
    assert module.head0_temperature_value == pytest.approx(0.2)
    assert "head1_embedding_size" in module._record_these


def test_multi_head_missing_head_attribute_is_an_attribute_error():
    module = MultiHeadCRT(8, heads=[(4, 6), (2, 3)])
    with pytest.raises(AttributeError, match=r"head5_num_prototypes.*2 heads \(head0 to head1\)"):
        _ = module.head5_num_prototypes
    assert not hasattr(module, "head2_embedding_size")
    assert getattr(module, "head9_temperature_value", None) is None
    assert module.head1_embedding_size == 3


@pytest.mark.parametrize(
    "heads,match",
    [
        ([], "heads must be a non-empty sequence"),
        ([(4,)], r"heads\[0\] must be a \(num_prototypes, embedding_size\)"),
        ([(4, 6), {"num_prototypes": 2}], r"heads\[1\] is missing \['embedding_size'\]"),
    ],
)
def test_multi_head_bad_heads(heads, match):
    with pytest.raises(ValueError, match=match):
        MultiHeadCRT(8, heads=heads)


def test_numpy_integers_are_accepted():
    np = pytest.importorskip("numpy")
    module = CRT(np.int64(8), np.int64(4), np.int64(2))
    assert module(torch.randn(1, 8, 2, 2)).shape == (1, 4)
