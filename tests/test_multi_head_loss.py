"""MultiHeadLoss: per-head PML losses plus the similarity-consistency term."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners, reducers, samplers, trainers
from pytorch_metric_learning.distances import LpDistance
from pytorch_metric_learning.losses import BaseMetricLossFunction
from pytorch_metric_learning.utils import common_functions as pml_cf
from record_keeper import RecordKeeper

from pml_crt.losses import MultiHeadLoss, SimilarityConsistencyLoss
from pml_crt.models import MultiHeadCRT
from pml_crt.regularizers import SimilarityConsistencyRegularizer
from pml_crt.utils.validation import NonFiniteError

SIZES = [8, 4, 6]
NUM_CLASSES = 4


def _batch(batch: int = 16, sizes=SIZES, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, sum(sizes), generator=generator)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(batch // NUM_CLASSES)
    return embeddings, labels


def _slices(x: torch.Tensor, sizes=SIZES) -> list[torch.Tensor]:
    starts = [sum(sizes[:h]) for h in range(len(sizes))]
    return [x[:, s : s + d] for s, d in zip(starts, sizes, strict=True)]


def _hand_consistency(x: torch.Tensor, sizes=SIZES, temperature=0.1) -> torch.Tensor:
    """Default term by hand: mean over head pairs a < b and rows i of
    KL(P_a[i] || P_b[i]), P_h[i] = softmax over j != i of cos_h(i, j) / T."""
    n = len(x)
    matrices = [F.normalize(z, dim=1) @ F.normalize(z, dim=1).t() for z in _slices(x, sizes)]
    rows = []
    for m in matrices:
        rows.append(
            [torch.softmax(m[i][torch.arange(n) != i] / temperature, dim=0) for i in range(n)]
        )
    terms = []
    for a in range(len(sizes)):
        for b in range(a + 1, len(sizes)):
            kl = [(rows[a][i] * (rows[a][i].log() - rows[b][i].log())).sum() for i in range(n)]
            terms.append(sum(kl) / n)
    return sum(terms) / len(terms)


# --------------------------------------------------------------------------- values


def test_equals_weighted_sum_of_head_losses_plus_consistency():
    x, y = _batch()
    loss = MultiHeadLoss(
        losses.ContrastiveLoss(),
        SIZES,
        consistency_weight=0.7,
        head_weights=[1.0, 0.5, 2.0],
        collect_stats=True,
    )
    heads = [losses.ContrastiveLoss()(z, y) for z in _slices(x)]
    expected = heads[0] + 0.5 * heads[1] + 2.0 * heads[2] + 0.7 * _hand_consistency(x)
    torch.testing.assert_close(loss(x, y), expected)
    # The recorded statistics are the unweighted values.
    for i, value in enumerate(heads):
        assert getattr(loss, f"head{i}_loss") == pytest.approx(value.item(), rel=1e-6)
    assert loss.consistency_loss == pytest.approx(_hand_consistency(x).item(), rel=1e-5)
    assert loss.head1_weight == 0.5 and loss.consistency_weight == 0.7


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_gradient_equals_the_reference_gradient(dtype):
    """Every term, the consistency term included, sends its gradient to the embeddings.

    The reference is the loop-written consistency (and stock per-head losses) under
    autograd. Head weights 0 isolate the consistency term's own gradient.
    """
    x, y = _batch()
    x = x.to(dtype)
    # Rounding: ~16-term sums of values scaled by 1/T = 10, so errors of about
    # 16 * 10 * eps relative to the largest gradient; 1000 * eps leaves margin.
    tolerance = 1000 * torch.finfo(dtype).eps
    for head_weights in ([1.0, 0.5, 2.0], [0.0, 0.0, 0.0]):
        loss = MultiHeadLoss(
            losses.ContrastiveLoss(), SIZES, consistency_weight=0.7, head_weights=head_weights
        )
        actual = x.clone().requires_grad_()
        loss(actual, y).backward()
        reference = x.clone().requires_grad_()
        heads = [losses.ContrastiveLoss()(z, y) for z in _slices(reference)]
        expected = sum(w * h for w, h in zip(head_weights, heads, strict=True))
        (expected + 0.7 * _hand_consistency(reference)).backward()
        assert torch.count_nonzero(reference.grad) == reference.numel()
        torch.testing.assert_close(actual.grad, reference.grad, rtol=tolerance, atol=tolerance)


def test_loss_dict_and_sub_loss_names():
    x, y = _batch()
    loss = MultiHeadLoss(
        losses.MultiSimilarityLoss(), SIZES, consistency_weight=2.0, collect_stats=True
    )
    names = ["head0_loss", "head1_loss", "head2_loss", "consistency_loss"]
    assert loss.sub_loss_names() == names
    loss_dict = loss.compute_loss(x, y, None, x, y)
    assert list(loss_dict) == names
    for info in loss_dict.values():
        assert info["reduction_type"] == "already_reduced" and info["indices"] is None
        assert info["losses"].dim() == 0
    torch.testing.assert_close(loss_dict["consistency_loss"]["losses"], 2.0 * _hand_consistency(x))
    for name in ["num_heads", "consistency_weight", "head0_weight"]:
        assert name in loss._record_these
    # The sub-loss values are statistics (PML's collect_stats), kept as detached
    # 0-dim tensors: reading them back to the host is left to whoever logs them.
    assert loss._record_these_stats == names
    loss(x, y)
    for name in names:
        value = getattr(loss, name)
        assert torch.is_tensor(value) and value.dim() == 0 and not value.requires_grad
    # Without collect_stats (PML's default) nothing is recorded per step.
    quiet = MultiHeadLoss(losses.MultiSimilarityLoss(), SIZES, consistency_weight=2.0)
    quiet(x, y)
    assert getattr(quiet, "_record_these_stats", []) == []
    assert not any(hasattr(quiet, name) for name in names)


def test_consistency_weight_zero_and_single_head_drop_the_term():
    x, y = _batch()
    loss = MultiHeadLoss(losses.ContrastiveLoss(), SIZES, consistency_weight=0)
    assert loss.sub_loss_names() == ["head0_loss", "head1_loss", "head2_loss"]
    assert loss.consistency is None
    expected = sum(losses.ContrastiveLoss()(z, y) for z in _slices(x))
    torch.testing.assert_close(loss(x, y), expected)

    single = MultiHeadLoss(losses.ContrastiveLoss(), [18])
    assert single.sub_loss_names() == ["head0_loss"]
    torch.testing.assert_close(single(x, y), losses.ContrastiveLoss()(x, y))
    with pytest.raises(ValueError, match="single head"):
        MultiHeadLoss(losses.ContrastiveLoss(), [18], consistency={"mode": "kl"})


@pytest.mark.parametrize("mode", ["mse", "l1", "kl"])
def test_consistency_options_as_dict_or_instance(mode):
    x, y = _batch()
    options = dict(mode=mode, stop_gradient="first", temperature=0.3)
    term = SimilarityConsistencyLoss(SIZES, **options)(x)
    heads = sum(losses.TripletMarginLoss()(z, y) for z in _slices(x))
    from_dict = MultiHeadLoss(losses.TripletMarginLoss(), SIZES, consistency=options)
    from_instance = MultiHeadLoss(
        losses.TripletMarginLoss(),
        SIZES,
        consistency=SimilarityConsistencyLoss(SIZES, **options),
        consistency_weight=3.0,
    )
    torch.testing.assert_close(from_dict(x, y), heads + term)
    torch.testing.assert_close(from_instance(x, y), heads + 3.0 * term)


def test_labels_optional_and_ref_emb_is_sliced():
    x, y = _batch(batch=8)
    ref, ref_y = _batch(batch=12, seed=1)
    loss = MultiHeadLoss(losses.ContrastiveLoss(), SIZES)
    heads = sum(
        losses.ContrastiveLoss()(z, y, ref_emb=r, ref_labels=ref_y)
        for z, r in zip(_slices(x), _slices(ref), strict=True)
    )
    term = SimilarityConsistencyLoss(SIZES)(x, ref_emb=ref)
    torch.testing.assert_close(loss(x, y, ref_emb=ref, ref_labels=ref_y), heads + term)

    unsupervised = MultiHeadLoss(losses.VICRegLoss(), SIZES)
    heads = sum(
        losses.VICRegLoss()(z, ref_emb=r) for z, r in zip(_slices(x), _slices(ref[:8]), strict=True)
    )
    term = SimilarityConsistencyLoss(SIZES)(x, ref_emb=ref[:8])
    torch.testing.assert_close(unsupervised(x, ref_emb=ref[:8]), heads + term)


def test_reducer_and_embedding_regularizer_kwargs():
    x, y = _batch()
    loss = MultiHeadLoss(
        losses.ContrastiveLoss(),
        SIZES,
        reducer=reducers.MeanReducer(),
        embedding_regularizer=SimilarityConsistencyRegularizer(SIZES, mode="l1"),
        embedding_reg_weight=0.1,
    )
    assert loss.sub_loss_names()[-1] == "embedding_reg_loss"
    expected = (
        sum(losses.ContrastiveLoss()(z, y) for z in _slices(x))
        + _hand_consistency(x)
        + 0.1 * SimilarityConsistencyLoss(SIZES, mode="l1")(x)
    )
    torch.testing.assert_close(loss(x, y), expected)


# --------------------------------------------------------------------------- miners


def test_passed_indices_tuple_is_used_for_every_head():
    x, y = _batch()
    indices = miners.TripletMarginMiner(margin=0.5)(x, y)
    loss = MultiHeadLoss(losses.TripletMarginLoss(), SIZES)
    heads = sum(losses.TripletMarginLoss()(z, y, indices) for z in _slices(x))
    torch.testing.assert_close(loss(x, y, indices), heads + _hand_consistency(x))


def test_own_miner_mines_each_head_separately():
    x, y = _batch()
    miner = miners.TripletMarginMiner(margin=0.3, type_of_triplets="hard")
    loss = MultiHeadLoss(losses.TripletMarginLoss(), SIZES, miner=miner)
    assert loss.miners["head0"] is not loss.miners["head1"] and loss.miners["head0"] is not miner
    heads = sum(losses.TripletMarginLoss()(z, y, miner(z, y)) for z in _slices(x))
    torch.testing.assert_close(loss(x, y), heads + _hand_consistency(x))
    # Mining each slice is not the same as mining the concatenation once.
    concatenation_mined = MultiHeadLoss(losses.TripletMarginLoss(), SIZES)(x, y, miner(x, y))
    assert not torch.allclose(loss(x, y), concatenation_mined)


class _RecordingMiner(miners.TripletMarginMiner):
    """A TripletMarginMiner that keeps the arguments of every call."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.calls = []

    def forward(self, embeddings, labels, ref_emb=None, ref_labels=None):
        self.calls.append((embeddings, labels, ref_emb, ref_labels))
        return super().forward(embeddings, labels, ref_emb, ref_labels)


def test_own_miner_mines_each_head_against_its_ref_slice():
    x, y = _batch(batch=8)
    ref, _ = _batch(batch=12, seed=1)
    ref_y = torch.arange(12) % 3  # not the batch's labels
    loss = MultiHeadLoss(
        losses.TripletMarginLoss(), SIZES, miner=_RecordingMiner(margin=0.3, type_of_triplets="all")
    )
    value = loss(x, y, ref_emb=ref, ref_labels=ref_y)
    for i, (z, r) in enumerate(zip(_slices(x), _slices(ref), strict=True)):
        ((embeddings, labels, ref_emb, ref_labels),) = loss.miners[f"head{i}"].calls
        assert torch.equal(embeddings, z) and torch.equal(labels, y)
        assert torch.equal(ref_emb, r) and torch.equal(ref_labels, ref_y)
    # Loop reference: mine each head's slice against its ref slice, then the stock loss.
    miner = miners.TripletMarginMiner(margin=0.3, type_of_triplets="all")
    heads = sum(
        losses.TripletMarginLoss()(z, y, miner(z, y, r, ref_y), ref_emb=r, ref_labels=ref_y)
        for z, r in zip(_slices(x), _slices(ref), strict=True)
    )
    term = SimilarityConsistencyLoss(SIZES)(x, ref_emb=ref)
    torch.testing.assert_close(value, heads + term)


def test_per_head_miner_list_with_none():
    x, y = _batch()
    miner = miners.MultiSimilarityMiner()
    loss = MultiHeadLoss(losses.MultiSimilarityLoss(), SIZES, miner=[miner, None, miner])
    assert set(loss.miners.keys()) == {"head0", "head2"}
    assert loss.miners["head0"] is miner and loss.miners["head2"] is not miner
    z = _slices(x)
    heads = (
        losses.MultiSimilarityLoss()(z[0], y, miner(z[0], y))
        + losses.MultiSimilarityLoss()(z[1], y)
        + losses.MultiSimilarityLoss()(z[2], y, miner(z[2], y))
    )
    torch.testing.assert_close(loss(x, y), heads + _hand_consistency(x))


def test_miner_and_indices_tuple_together_is_an_error():
    x, y = _batch()
    loss = MultiHeadLoss(losses.TripletMarginLoss(), SIZES, miner=miners.TripletMarginMiner())
    with pytest.raises(ValueError, match="own miner"):
        loss(x, y, miners.TripletMarginMiner()(x, y))


# --------------------------------------------------------------------------- per-head losses


def test_single_instance_is_deep_copied():
    template = losses.MultiSimilarityLoss(alpha=3)
    loss = MultiHeadLoss(template, SIZES)
    assert len(loss.losses) == 3
    assert len({id(m) for m in loss.losses.values()} | {id(template)}) == 4
    assert all(m.alpha == 3 for m in loss.losses.values())


@pytest.mark.parametrize(
    "factory",
    [
        lambda d: losses.ProxyAnchorLoss(NUM_CLASSES, d),
        lambda d: losses.ArcFaceLoss(NUM_CLASSES, d),
        lambda d: losses.SoftTripleLoss(NUM_CLASSES, d, centers_per_class=2),
        lambda d: losses.NormalizedSoftmaxLoss(NUM_CLASSES, d),
    ],
)
def test_parametric_losses_via_factory_get_their_own_parameters(factory):
    x, y = _batch()
    x.requires_grad_()
    loss = MultiHeadLoss(factory, SIZES)
    params = [list(m.parameters()) for m in loss.losses.values()]
    assert all(len(p) == 1 for p in params)
    for p, size in zip(params, SIZES, strict=True):
        assert size in p[0].shape
    owned = {id(p) for p in loss.parameters()}
    assert all(id(p[0]) in owned for p in params)
    assert len({id(p[0]) for p in params}) == 3

    expected = sum(m(z, y) for m, z in zip(loss.losses.values(), _slices(x), strict=True))
    torch.testing.assert_close(loss(x, y), expected + _hand_consistency(x))

    before = [p[0].detach().clone() for p in params]
    optimizer = torch.optim.SGD(loss.parameters(), lr=0.1)
    loss(x, y).backward()
    optimizer.step()
    for p, old in zip(params, before, strict=True):
        assert p[0].grad is not None and not torch.equal(p[0].detach(), old)


def test_list_of_losses_one_per_head():
    x, y = _batch()
    per_head = [
        losses.ProxyAnchorLoss(NUM_CLASSES, 8),
        losses.ContrastiveLoss(),
        losses.ProxyNCALoss(NUM_CLASSES, 6),
    ]
    loss = MultiHeadLoss(per_head, SIZES)
    assert all(a is b for a, b in zip(loss.losses.values(), per_head, strict=True))
    expected = sum(m(z, y) for m, z in zip(per_head, _slices(x), strict=True))
    torch.testing.assert_close(loss(x, y), expected + _hand_consistency(x))


def test_repeated_parameterless_instance_in_list_is_copied():
    shared = losses.ContrastiveLoss()
    loss = MultiHeadLoss([shared, shared, shared], SIZES)
    assert loss.losses["head0"] is shared and loss.losses["head1"] is not shared


@pytest.mark.parametrize(
    "bad_loss",
    [
        losses.ProxyAnchorLoss(NUM_CLASSES, 8),
        losses.ArcFaceLoss(NUM_CLASSES, 8),
        losses.MarginLoss(learn_beta=True, num_classes=NUM_CLASSES),
        losses.CrossBatchMemory(losses.ContrastiveLoss(), 8, memory_size=32),
        losses.MultipleLosses(
            [losses.ContrastiveLoss(), losses.CrossBatchMemory(losses.ContrastiveLoss(), 8)]
        ),
    ],
)
def test_single_parametric_instance_is_an_error(bad_loss):
    with pytest.raises(ValueError, match="pass a factory"):
        MultiHeadLoss(bad_loss, SIZES)


def test_bad_loss_specs():
    proxy = losses.ProxyAnchorLoss(NUM_CLASSES, 8)
    with pytest.raises(ValueError, match="same ProxyAnchorLoss instance"):
        MultiHeadLoss([proxy, proxy, losses.ContrastiveLoss()], SIZES)
    with pytest.raises(ValueError, match="list of 2 losses, but embedding_sizes"):
        MultiHeadLoss([losses.ContrastiveLoss()] * 2, SIZES)
    with pytest.raises(TypeError, match=r"loss\[1\] must be a torch.nn.Module"):
        MultiHeadLoss([losses.ContrastiveLoss(), "triplet", losses.ContrastiveLoss()], SIZES)
    with pytest.raises(ValueError, match="same instance for two heads"):
        MultiHeadLoss(lambda d: proxy, SIZES)
    with pytest.raises(TypeError, match="must return a torch.nn.Module"):
        MultiHeadLoss(lambda d: d, SIZES)
    with pytest.raises(TypeError, match="loss must be a PML loss instance"):
        MultiHeadLoss(3, SIZES)


@pytest.mark.parametrize(
    "arguments, match",
    [
        pytest.param(
            dict(loss=losses.MultiSimilarityLoss),
            r"loss is the class MultiSimilarityLoss, not an instance: pass an instance "
            r"\(MultiSimilarityLoss\(\.\.\.\)\) or a factory `lambda embedding_size: ",
            id="loss",
        ),
        pytest.param(
            dict(
                loss=[losses.ContrastiveLoss(), losses.TripletMarginLoss, losses.ContrastiveLoss()]
            ),
            r"loss\[1\] is the class TripletMarginLoss, not an instance",
            id="loss-list",
        ),
        pytest.param(
            dict(loss=losses.ContrastiveLoss(), miner=miners.MultiSimilarityMiner),
            r"miner is the class MultiSimilarityMiner, not an instance: pass an instance "
            r"\(MultiSimilarityMiner\(\.\.\.\)\)",
            id="miner",
        ),
        pytest.param(
            dict(loss=losses.ContrastiveLoss(), miner=[None, miners.MultiSimilarityMiner, None]),
            r"miner\[1\] is the class MultiSimilarityMiner, not an instance",
            id="miner-list",
        ),
        pytest.param(
            dict(loss=losses.ContrastiveLoss(), consistency=SimilarityConsistencyLoss),
            r"consistency is the class SimilarityConsistencyLoss, not an instance",
            id="consistency",
        ),
    ],
)
def test_a_class_instead_of_an_instance_is_an_error(arguments, match):
    """A class is callable, so it could pass for a factory: MultiSimilarityLoss(128) would
    silently set alpha=128."""
    with pytest.raises(TypeError, match=match):
        MultiHeadLoss(embedding_sizes=[128, 64, 32], **arguments)


def test_bad_arguments():
    contrastive = losses.ContrastiveLoss()
    with pytest.raises(ValueError, match="embedding_sizes"):
        MultiHeadLoss(contrastive, [])
    with pytest.raises(ValueError, match="head_weights must hold 3"):
        MultiHeadLoss(contrastive, SIZES, head_weights=[1.0, 1.0])
    with pytest.raises(ValueError, match="consistency_weight"):
        MultiHeadLoss(contrastive, SIZES, consistency_weight=-1)
    with pytest.raises(ValueError, match="consistency_weight"):
        MultiHeadLoss(contrastive, SIZES, consistency_weight=float("nan"))
    with pytest.raises(ValueError, match="does not use a distance"):
        MultiHeadLoss(contrastive, SIZES, distance=LpDistance())
    with pytest.raises(ValueError, match=r"built for embedding_sizes=\[8, 4\]"):
        MultiHeadLoss(contrastive, SIZES, consistency=SimilarityConsistencyLoss([8, 4]))
    with pytest.raises(TypeError, match="consistency must be None"):
        MultiHeadLoss(contrastive, SIZES, consistency="mse")
    with pytest.raises(ValueError, match="miner is a list of 1"):
        MultiHeadLoss(contrastive, SIZES, miner=[miners.MultiSimilarityMiner()])


def test_wrong_embedding_width_is_an_error():
    x, y = _batch(sizes=[8, 4, 5])
    loss = MultiHeadLoss(losses.ContrastiveLoss(), SIZES)
    with pytest.raises(ValueError, match=r"embeddings must have shape \(B, 18\)"):
        loss(x, y)
    with pytest.raises(ValueError, match=r"ref_emb must have shape \(B, 18\)"):
        loss(_batch()[0], y, ref_emb=x, ref_labels=y)


# --------------------------------------------------------------------------- trainer


def test_trains_under_a_pml_trainer_and_is_recorded():
    """One MetricLossOnly epoch: sub-losses reach record-keeper, loss params get optimized."""
    torch.manual_seed(0)
    images = torch.randn(32, 16, 4, 4)
    labels = torch.arange(NUM_CLASSES).repeat(8)
    dataset = torch.utils.data.TensorDataset(images, labels)
    embedder = MultiHeadCRT(in_channels=16, heads=[(8, 12), (4, 6)])
    metric_loss = MultiHeadLoss(
        lambda d: losses.ProxyAnchorLoss(NUM_CLASSES, d),
        embedder.embedding_sizes,
        collect_stats=True,
    )
    proxies_before = [p.detach().clone() for p in metric_loss.parameters()]

    class FakeWriter:
        def __init__(self):
            self.rows = []

        def append(self, group, series, value, iteration):
            self.rows.append((group, series, value))

    writer = FakeWriter()
    record_keeper = RecordKeeper(
        record_writer=writer,
        attributes_to_search_for=pml_cf.list_of_recordable_attributes_list_names(),
    )

    def hook(trainer):
        record_keeper.update_records(
            trainer.loss_funcs,
            trainer.get_global_iteration(),
            recursive_types=[torch.nn.Module, dict],
        )

    trainer = trainers.MetricLossOnly(
        models={"trunk": torch.nn.Identity(), "embedder": embedder},
        optimizers={
            "embedder_optimizer": torch.optim.SGD(embedder.parameters(), lr=0.01),
            "metric_loss_optimizer": torch.optim.SGD(metric_loss.parameters(), lr=0.01),
        },
        batch_size=16,
        loss_funcs={"metric_loss": metric_loss},
        mining_funcs={"tuple_miner": miners.MultiSimilarityMiner()},
        dataset=dataset,
        sampler=samplers.MPerClassSampler(labels, m=4, length_before_new_iter=32),
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        end_of_iteration_hook=hook,
    )
    trainer.train(num_epochs=1)

    assert torch.isfinite(torch.tensor(float(trainer.losses["total_loss"])))
    for before, after in zip(proxies_before, metric_loss.parameters(), strict=True):
        assert not torch.equal(before, after.detach())
    series = {(group, name) for group, name, _ in writer.rows}
    group = "metric_loss_MultiHeadLoss"
    for name in ("head0_loss", "head1_loss", "consistency_loss", "consistency_weight"):
        assert (group, name) in series, sorted(series)
    # Sub-loss modules are reached through _modules recursion.
    assert any(g.endswith("ProxyAnchorLoss") and n == "num_classes" for g, n in series)
    assert any(g.endswith("SimilarityConsistencyLoss") and n == "temperature" for g, n in series)


@pytest.mark.parametrize(
    "pair_loss",
    [losses.ContrastiveLoss(), losses.TripletMarginLoss(), losses.MultiSimilarityLoss()],
    ids=lambda loss: type(loss).__name__,
)
def test_single_class_batch_is_rejected_for_pair_losses(pair_loss):
    x, _ = _batch()
    one_class = torch.zeros(len(x), dtype=torch.long)
    name = type(pair_loss).__name__
    with pytest.raises(ValueError, match=f"labels holds a single class .* {name} has no negative"):
        MultiHeadLoss(pair_loss, SIZES)(x, one_class)
    # One pair loss among the heads is enough to be rejected.
    mixed = [losses.ProxyAnchorLoss(NUM_CLASSES, 8), pair_loss, losses.ProxyNCALoss(NUM_CLASSES, 6)]
    with pytest.raises(ValueError, match=f"{name} has no negative"):
        MultiHeadLoss(mixed, SIZES)(x, one_class)


def test_single_class_batch_is_fine_for_proxy_losses():
    x, _ = _batch()
    one_class = torch.zeros(len(x), dtype=torch.long)
    proxy = MultiHeadLoss(lambda d: losses.ProxyAnchorLoss(NUM_CLASSES, d), SIZES)
    expected = sum(m(z, one_class) for m, z in zip(proxy.losses.values(), _slices(x), strict=True))
    torch.testing.assert_close(proxy(x, one_class), expected + _hand_consistency(x))


def test_single_class_batch_is_fine_for_cross_batch_memory():
    """The memory holds the negatives of earlier batches: stock CrossBatchMemory on each
    head's slice is the reference, batch after batch."""
    sizes = [8, 4]
    loss = MultiHeadLoss(
        lambda d: losses.CrossBatchMemory(losses.ContrastiveLoss(), d, memory_size=64), sizes
    )
    stock = [losses.CrossBatchMemory(losses.ContrastiveLoss(), d, memory_size=64) for d in sizes]
    one_class = torch.zeros(16, dtype=torch.long)
    batches = [
        (_batch(sizes=sizes, seed=1)[0], one_class),  # memory: this batch only
        _batch(sizes=sizes, seed=2),  # classes 0 to 3
        (_batch(sizes=sizes, seed=3)[0], one_class),  # memory: negatives of the batch before
    ]
    for x, y in batches:
        expected = sum(m(z, y) for m, z in zip(stock, _slices(x, sizes), strict=True))
        torch.testing.assert_close(loss(x, y), expected + _hand_consistency(x, sizes))
    # The memory's negatives did count: the last loss is not the positive pairs' alone.
    x, y = batches[-1]
    positives_only = sum(losses.ContrastiveLoss()(z, y) for z in _slices(x, sizes))
    assert not torch.allclose(loss(x, y) - _hand_consistency(x, sizes), positives_only)


class _ReferenceSetLoss(BaseMetricLossFunction):
    """Contrastive loss of the batch against a fixed reference set held in buffers."""

    def __init__(self, references: torch.Tensor, reference_labels: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("references", references)
        self.register_buffer("reference_labels", reference_labels)
        self.contrastive = losses.ContrastiveLoss()

    def forward(self, embeddings, labels, indices_tuple=None):
        return self.contrastive(embeddings, labels, None, self.references, self.reference_labels)


def test_single_class_batch_is_fine_for_a_loss_with_its_own_references():
    x, _ = _batch()
    one_class = torch.zeros(len(x), dtype=torch.long)
    references, reference_labels = _batch(batch=8, seed=4)
    widths = dict(zip(SIZES, _slices(references), strict=True))
    wrapped = MultiHeadLoss(lambda d: _ReferenceSetLoss(widths[d], reference_labels), SIZES)
    expected = sum(
        losses.ContrastiveLoss()(z, one_class, None, r, reference_labels)
        for z, r in zip(_slices(x), _slices(references), strict=True)
    )
    torch.testing.assert_close(wrapped(x, one_class), expected + _hand_consistency(x))
    # A wrapper holding a memory inside another wrapper is recognised too.
    nested = MultiHeadLoss(
        lambda d: losses.MultipleLosses(
            [losses.CrossBatchMemory(losses.ContrastiveLoss(), d, memory_size=32)]
        ),
        SIZES,
    )
    expected = sum(
        losses.CrossBatchMemory(losses.ContrastiveLoss(), z.shape[1], memory_size=32)(z, one_class)
        for z in _slices(x)
    )
    torch.testing.assert_close(nested(x, one_class), expected + _hand_consistency(x))


def test_non_finite_embeddings_are_rejected_only_with_check_inputs():
    # The finite check reads a value back to the host (a device synchronisation
    # per step), so it is opt-in, like the embedders' check_inputs.
    x, y = _batch()
    x = x.clone()
    x[1, 2] = float("nan")
    checked = MultiHeadLoss(losses.ContrastiveLoss(), SIZES, check_inputs=True)
    with pytest.raises(NonFiniteError, match="embeddings contains NaN"):
        checked(x, y)
    with pytest.raises(NonFiniteError, match="ref_emb contains NaN"):
        checked(_batch()[0], y, ref_emb=x, ref_labels=y)
    assert torch.isnan(MultiHeadLoss(losses.ContrastiveLoss(), SIZES)(x, y))
