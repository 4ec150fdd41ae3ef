"""The prototype diversity penalty as an explicit loss term: value, gradient, scaling."""

import itertools
import math
from pathlib import Path

import pytest
import torch
from pytorch_metric_learning import losses, reducers, trainers
from pytorch_metric_learning.utils.distributed import DistributedLossWrapper

from benchmarks.protocol.build import build_embedder, build_loss
from benchmarks.protocol.config import ConfigError, load_config, method_config
from pml_crt.losses import MultiHeadLoss, PrototypeRegularizedLoss
from pml_crt.models import CRT, GlobalPoolEmbedder, MultiHeadCRT
from pml_crt.models.crt import prototype_diversity_losses, prototype_diversity_penalty
from pml_crt.regularizers import PrototypeDiversityRegularizer

ABLATION = Path(__file__).resolve().parents[1] / "benchmarks" / "configs" / "omniglot_ablation.yaml"


def reference_penalty(prototypes: torch.Tensor) -> float:
    """``sum_{k != j} cos(p_k, p_j)^2 / (K (K - 1))`` with Python loops, in float64."""
    rows = prototypes.detach().double().tolist()
    K = len(rows)
    if K < 2:
        return 0.0

    def cos(u, v):
        dot = sum(a * b for a, b in zip(u, v, strict=True))
        return dot / math.sqrt(sum(a * a for a in u) * sum(b * b for b in v))

    pairs = [cos(rows[k], rows[j]) ** 2 for k, j in itertools.permutations(range(K), 2)]
    return sum(pairs) / (K * (K - 1))


@pytest.mark.parametrize("dtype,rel", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("K,d", [(1, 3), (2, 3), (5, 3), (7, 16)])
def test_value_matches_loop_reference(K, d, dtype, rel):
    torch.manual_seed(K * 100 + d)
    prototypes = torch.randn(K, d, dtype=dtype) * torch.rand(K, 1, dtype=dtype).add(0.5)
    expected = reference_penalty(prototypes)
    for value in (
        prototype_diversity_penalty(prototypes),
        prototype_diversity_losses(prototypes).mean(),
        PrototypeDiversityRegularizer()(prototypes),
    ):
        assert value.dtype == dtype and value.shape == ()
        assert value.item() == pytest.approx(expected, rel=rel, abs=1e-12)


def test_model_penalties_are_the_regularizer():
    torch.manual_seed(0)
    crt = CRT(6, 4, 5, projection_dim=3, prototype_init="normal")
    regularizer = PrototypeDiversityRegularizer()
    assert crt.diversity_penalty().item() == pytest.approx(reference_penalty(crt.prototypes))
    torch.testing.assert_close(crt.diversity_penalty(), regularizer(crt.prototypes))
    multi = MultiHeadCRT(6, [(5, 4), (3, 2)], prototype_init="normal")
    expected = sum(reference_penalty(head.prototypes) for head in multi.heads)
    assert multi.diversity_penalty().item() == pytest.approx(expected, rel=1e-6)


def test_reducer_acts_on_per_prototype_terms():
    torch.manual_seed(1)
    prototypes = torch.randn(4, 3, dtype=torch.float64)
    summed = PrototypeDiversityRegularizer(reducer=reducers.SumReducer())(prototypes)
    assert summed.item() == pytest.approx(4 * reference_penalty(prototypes), rel=1e-12)
    with pytest.raises(ValueError, match="does not use a distance"):
        PrototypeDiversityRegularizer(distance=None)
    with pytest.raises(ValueError, match=r"\(K, d\) matrix"):
        PrototypeDiversityRegularizer()(torch.randn(2, 3, 4))


@pytest.mark.parametrize("K", [2, 4])
def test_gradcheck(K):
    torch.manual_seed(K)
    prototypes = torch.randn(K, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(prototype_diversity_penalty, (prototypes,))
    assert torch.autograd.gradcheck(PrototypeDiversityRegularizer(), (prototypes,))


# ----------------------------------------------------------------- the term scales with the loss


def _setup(seed: int = 0):
    torch.manual_seed(seed)
    model = MultiHeadCRT(6, [(4, 5), (3, 4)], prototype_init="normal").double()
    x = torch.randn(8, 6, 2, 2, dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 2, 3, 2, 3])  # two classes in every chunk
    loss_fn = PrototypeRegularizedLoss(
        MultiHeadLoss(losses.ContrastiveLoss(), model.embedding_sizes),
        model,
        prototype_reg_weight=0.7,
    )
    return model, x, labels, loss_fn


def _grads(model):
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return grads


def _penalty_part(model, x, labels, loss_fn, run):
    """Gradients with the term minus gradients without it, after ``run(loss_fn)``."""
    run(loss_fn)
    with_term = _grads(model)
    weight, loss_fn.prototype_reg_weight = loss_fn.prototype_reg_weight, 0.0
    run(loss_fn)
    loss_fn.prototype_reg_weight = weight
    return [a - b for a, b in zip(with_term, _grads(model), strict=True)]


def _reference_penalty_grads(model, weight):
    grads = torch.autograd.grad(
        weight * model.diversity_penalty(), list(model.parameters()), allow_unused=True
    )
    return [
        torch.zeros_like(p) if g is None else g
        for p, g in zip(model.parameters(), grads, strict=True)
    ]


def test_value_is_loss_plus_weighted_penalty():
    model, x, labels, loss_fn = _setup()
    embeddings = model(x)
    total = loss_fn(embeddings, labels)
    inner = loss_fn.loss(embeddings, labels)
    torch.testing.assert_close(total, inner + 0.7 * model.diversity_penalty())
    assert loss_fn.sub_loss_names() == ["loss", "prototype_reg_loss"]


def test_gradient_scales_with_grad_scaler():
    """Under ``GradScaler`` the penalty's gradient is multiplied by the scale like the
    loss's, and ``unscale_`` gives back ``weight * grad(penalty)``."""
    model, x, labels, loss_fn = _setup()
    scale = 1024.0
    reference = _reference_penalty_grads(model, 0.7)
    names = [name for name, _ in model.named_parameters()]
    assert all(
        torch.count_nonzero(g) == g.numel()
        for name, g in zip(names, reference, strict=True)
        if name.endswith("prototypes")
    )

    def scaled(fn):
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        scaler.scale(fn(model(x), labels)).backward()

    for got, want in zip(_penalty_part(model, x, labels, loss_fn, scaled), reference, strict=True):
        torch.testing.assert_close(got, scale * want, rtol=1e-9, atol=1e-9)

    def unscaled_by_scaler(fn):
        scaler = torch.amp.GradScaler("cpu", init_scale=scale)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
        scaler.scale(fn(model(x), labels)).backward()
        scaler.unscale_(optimizer)

    part = _penalty_part(model, x, labels, loss_fn, unscaled_by_scaler)
    for got, want in zip(part, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("steps", [2, 4])
def test_gradient_accumulation_divides_the_term(steps):
    """``(loss / steps).backward()`` over ``steps`` micro-batches adds ``weight * grad(penalty)``
    once in total, and the accumulated gradient is the mean of the micro-batch gradients."""
    model, x, labels, loss_fn = _setup()
    chunks = list(zip(x.chunk(steps), labels.chunk(steps), strict=True))

    def accumulate(fn):
        for xs, ys in chunks:
            (fn(model(xs), ys) / steps).backward()

    reference = _reference_penalty_grads(model, 0.7)
    for got, want in zip(
        _penalty_part(model, x, labels, loss_fn, accumulate), reference, strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12)

    accumulate(loss_fn)
    accumulated = _grads(model)
    per_step = []
    for xs, ys in chunks:
        loss_fn(model(xs), ys).backward()
        per_step.append(_grads(model))
    for i, got in enumerate(accumulated):
        torch.testing.assert_close(got, sum(g[i] for g in per_step) / steps)


# ----------------------------------------------------------------- the loss wrapper


def test_wrapper_does_not_own_the_model():
    model, x, labels, loss_fn = _setup()
    assert loss_fn.model is model
    assert list(loss_fn.parameters()) == []  # the model's parameters stay the model's
    assert not any(key.startswith("model") for key in loss_fn.state_dict())
    assert isinstance(DistributedLossWrapper(loss_fn).loss, PrototypeRegularizedLoss)
    proxies = PrototypeRegularizedLoss(losses.ProxyAnchorLoss(4, 9), model)
    assert [p.shape for p in proxies.parameters()] == [(4, 9)]


def test_a_per_head_prototype_term_is_refused_with_the_composition_that_works():
    # As a per-head loss, each head's deep copy would copy the model (the term's gradient
    # on the live prototypes was 0); shared, it would be added once per head.
    model, _, _, _ = _setup()
    wrapped = PrototypeRegularizedLoss(losses.ContrastiveLoss(), model)
    fix = r"PrototypeRegularizedLoss\(MultiHeadLoss\(loss, embedding_sizes\), embedder\)"
    with pytest.raises(ValueError, match=r"loss is \(or wraps\) a Proto.*" + fix):
        MultiHeadLoss(wrapped, model.embedding_sizes)
    with pytest.raises(ValueError, match=r"loss\[1\] is \(or wraps\)"):
        MultiHeadLoss([losses.ContrastiveLoss(), wrapped], model.embedding_sizes)
    with pytest.raises(ValueError, match="the loss factory's loss for head 0"):
        MultiHeadLoss(
            lambda size: PrototypeRegularizedLoss(losses.ContrastiveLoss(), model),
            model.embedding_sizes,
        )


def test_the_term_wrapping_multihead_loss_reaches_the_live_prototypes_once():
    model, x, labels, loss_fn = _setup()
    got = _penalty_part(model, x, labels, loss_fn, lambda f: f(model(x), labels).backward())
    expected = _reference_penalty_grads(model, 0.7)
    assert any(float(g.abs().max()) > 0 for g in expected)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_wrapper_passes_the_arguments_unchanged():
    calls = []

    class Recorder(losses.BaseMetricLossFunction):
        def forward(self, *args):
            calls.append(args)
            return args[0].sum() * 0

    model = CRT(4, 3, 2)
    embeddings, labels = torch.randn(4, 3), torch.tensor([0, 0, 1, 1])
    PrototypeRegularizedLoss(Recorder(), model)(embeddings, labels)
    assert calls[0][0] is embeddings and calls[0][1] is labels
    assert calls[0][2:] == (None, None, None)


def test_wrapper_rejects_bad_arguments():
    model = CRT(4, 3, 2)
    with pytest.raises(ValueError, match="contains no pml_crt.models.CRT"):
        PrototypeRegularizedLoss(losses.ContrastiveLoss(), GlobalPoolEmbedder(4, 3))
    with pytest.raises(TypeError, match="loss instance"):
        PrototypeRegularizedLoss(losses.ContrastiveLoss, model)
    with pytest.raises(ValueError, match="prototype_reg_weight must be a finite number >= 0"):
        PrototypeRegularizedLoss(losses.ContrastiveLoss(), model, prototype_reg_weight=-1)


def test_ablation_config_adds_the_explicit_term():
    config = load_config(ABLATION)
    method = method_config(config, "diversity_0.1")
    embedder = build_embedder(method["embedder"], 8)
    loss = build_loss(method, embedder, num_classes=5)[0]["metric_loss"]
    assert isinstance(loss, PrototypeRegularizedLoss) and isinstance(loss.loss, MultiHeadLoss)
    assert loss.model is embedder and loss.prototype_reg_weight == 0.1
    assert isinstance(loss.prototype_regularizer, PrototypeDiversityRegularizer)
    base = method_config(config, "base")
    assert isinstance(build_loss(base, embedder, num_classes=5)[0]["metric_loss"], MultiHeadLoss)
    pooled = build_embedder({"type": "GlobalPoolEmbedder", "kwargs": {"embedding_size": 4}}, 8)
    with pytest.raises(ConfigError, match="need a CRT or MultiHeadCRT embedder"):
        build_loss(
            {
                **method,
                "loss": {"name": "ContrastiveLoss", "kwargs": {"prototype_reg_weight": 1.0}},
            },
            pooled,
            5,
        )


def test_stock_trainer_trains_with_the_term():
    """``MetricLossOnly`` with the wrapped loss under ``loss_funcs["metric_loss"]``: no custom
    trainer; the term is in the loss the trainer records and back-propagates."""
    torch.manual_seed(0)
    data = torch.randn(32, 4, 2, 2)
    labels = torch.arange(4).repeat_interleave(8)
    embedder = CRT(4, 3, 3, projection_dim=0, prototype_init="normal")
    loss = PrototypeRegularizedLoss(losses.ContrastiveLoss(), embedder, prototype_reg_weight=10.0)
    before = embedder.diversity_penalty().item()
    trainer = trainers.MetricLossOnly(
        {"trunk": torch.nn.Identity(), "embedder": embedder},
        {"embedder_optimizer": torch.optim.SGD(embedder.parameters(), lr=0.05)},
        batch_size=16,
        loss_funcs={"metric_loss": loss},
        dataset=torch.utils.data.TensorDataset(data, labels),
        dataloader_num_workers=0,
    )
    trainer.train(num_epochs=3)
    assert embedder.diversity_penalty().item() < 0.5 * before
