"""Two CPU processes (gloo, DDP) reproduce a single process on the concatenated batch.

Each rank builds the same seeded ``MultiHeadCRT``, wraps it in DDP, embeds its
half of a fixed batch and back-propagates a wrapped loss. "Match" means:

- the loss of every rank equals the single-process loss on the full batch
  (``AllGatherLossWrapper``) or ``world_size`` times it (PML's
  ``DistributedLossWrapper``);
- the gradient of every model parameter after DDP's averaging equals the
  single-process gradient;
- the gradient of every parameter of the loss (not under DDP) equals the
  single-process gradient on every rank (``AllGatherLossWrapper``), or
  ``world_size`` times it (PML's wrapper).

"Equals" is up to rounding: every rank's result, float64 or float32, is within
the rounding bound of its dtype (``_tolerance``, derived from the computation)
of the single-process float64 result on the same values, the exact reference
(about 3e-11 relative in float64). Without a wrapper the loss only sees the
local half, and the check fails. The float32 checks also need every discrete
choice (mined pairs, ContrastiveLoss's hinge) to be farther from its threshold
than float32 rounding reaches; ``test_float32_runs_make_the_float64_discrete_choices``
checks that on the data.

Every worker runs one thread (``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` and
``torch.set_num_threads``) and meets the others through a file, not a TCP port
picked in advance that another process could take.
"""

from __future__ import annotations

import datetime
import os
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from pytorch_metric_learning import losses, miners, samplers
from pytorch_metric_learning.utils import common_functions as pml_cf
from torch.nn.parallel import DistributedDataParallel

from pml_crt.losses import MultiHeadLoss, PrototypeRegularizedLoss, SimilarityConsistencyLoss
from pml_crt.models import MultiHeadCRT
from pml_crt.regularizers import SimilarityConsistencyRegularizer
from pml_crt.utils.distributed import (
    AllGatherLossWrapper,
    DistributedLossWrapper,
    DistributedMinerWrapper,
    RankShardSampler,
    all_gather_with_grad,
    get_world_size,
)

WORLD_SIZE = 2
BATCH = 16
NUM_CLASSES = 4
HEADS = [(4, 8), (2, 4)]
DTYPES = ("float64", "float32")
CASES = (
    "multi_head",  # MultiSimilarityLoss per head + consistency
    "head_miner",  # ... with a MultiSimilarityMiner per head
    "tuple_miner",  # ... with one external miner (DistributedMinerWrapper)
    "ref_emb",  # ContrastiveLoss per head + consistency, embeddings vs ref_emb
    "regularizer",  # ContrastiveLoss + SimilarityConsistencyRegularizer on the concatenation
    "consistency_kl",  # SimilarityConsistencyLoss alone, "kl" with stop_gradient="larger"
    "proxies",  # ProxyAnchorLoss per head: the loss has parameters
    "diversity",  # PrototypeRegularizedLoss: + weight * the prototypes' diversity penalty
)
WRAPPERS = ("ours", "pml", "none")
# How sharply each case's loss turns a change of a similarity into a change of its
# gradient: the largest factor in an exponent (MultiSimilarityLoss's beta = 50,
# ProxyAnchorLoss's alpha = 32, the consistency term's 1 / temperature = 10);
# ContrastiveLoss is linear in the distance.
SHARPNESS = {
    "multi_head": 50,
    "head_miner": 50,
    "tuple_miner": 50,
    "ref_emb": 10,
    "regularizer": 10,
    "consistency_kl": 10,
    "proxies": 32,
    "diversity": 50,
}


def _data(dtype: torch.dtype):
    """The same values in both dtypes (drawn in float32): float64 runs are the exact reference."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 8, 3, 3, generator=generator).to(dtype)
    ref_x = torch.randn(BATCH, 8, 3, 3, generator=generator).to(dtype)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(BATCH // NUM_CLASSES)
    labels = labels[torch.randperm(BATCH, generator=generator)]
    ref_labels = labels[torch.randperm(BATCH, generator=generator)]
    return x, labels, ref_x, ref_labels


def _model(case: str, dtype: torch.dtype) -> MultiHeadCRT:
    torch.manual_seed(1)
    # The coded-residual heads alone (no GeM branch): ``_embedding_length`` counts their sums,
    # and the wrappers under test do not depend on which embedder they wrap.
    return MultiHeadCRT(8, heads=HEADS, global_pooling=None).to(dtype)


def _miner():
    return miners.MultiSimilarityMiner(epsilon=0.02)


def _loss(case: str, model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(2)
    sizes = getattr(model, "module", model).embedding_sizes
    if case == "head_miner":
        loss = MultiHeadLoss(losses.MultiSimilarityLoss(), sizes, miner=_miner())
    elif case == "ref_emb":
        loss = MultiHeadLoss(losses.ContrastiveLoss(), sizes, consistency_weight=0.5)
    elif case == "regularizer":
        loss = losses.ContrastiveLoss(
            embedding_regularizer=SimilarityConsistencyRegularizer(sizes),
            embedding_reg_weight=0.7,
        )
    elif case == "consistency_kl":
        loss = SimilarityConsistencyLoss(sizes, mode="kl", stop_gradient="larger")
    elif case == "proxies":
        loss = MultiHeadLoss(lambda size: losses.ProxyAnchorLoss(NUM_CLASSES, size), sizes)
    elif case == "diversity":
        head_loss = MultiHeadLoss(losses.MultiSimilarityLoss(), sizes)
        loss = PrototypeRegularizedLoss(head_loss, model, prototype_reg_weight=0.3)
    else:
        loss = MultiHeadLoss(losses.MultiSimilarityLoss(), sizes)
    return loss.to(dtype)


def _step(case, model, loss_fn, x, labels, ref_x, ref_labels, miner_wrapper=None):
    """Forward and backward; returns the loss value and the gradients."""
    embeddings = model(x)
    indices_tuple = None
    if case == "tuple_miner":
        miner = _miner() if miner_wrapper is None else miner_wrapper(_miner())
        indices_tuple = miner(embeddings, labels)
    if case == "ref_emb":
        value = loss_fn(embeddings, labels, None, model(ref_x), ref_labels)
    else:
        value = loss_fn(embeddings, labels, indices_tuple)
    value.backward()
    return value.detach(), [p.grad.clone() for p in model.parameters()]


def _reference(case: str, dtype: torch.dtype):
    """Single process, full batch."""
    x, labels, ref_x, ref_labels = _data(dtype)
    model = _model(case, dtype)
    loss_fn = _loss(case, model, dtype)
    value, grads = _step(case, model, loss_fn, x, labels, ref_x, ref_labels)
    return value, grads, [p.grad.clone() for p in loss_fn.parameters()]


def _worker(rank: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{os.path.join(out_dir, 'rendezvous')}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=60),
    )
    warnings.simplefilter("ignore")
    results = {}
    try:
        # The gather itself: rank r weights the gathered rows by (r + 1) * row index.
        x = torch.full((2, 3), float(rank), dtype=torch.float64, requires_grad=True)
        gathered = all_gather_with_grad(x)
        weights = (rank + 1) * torch.arange(4, dtype=torch.float64).view(4, 1)
        (gathered * weights).sum().backward()
        results["gather"] = (gathered.detach(), x.grad)

        local = slice(rank * BATCH // WORLD_SIZE, (rank + 1) * BATCH // WORLD_SIZE)
        for dtype_name in DTYPES:
            dtype = getattr(torch, dtype_name)
            x, labels, ref_x, ref_labels = (t[local] for t in _data(dtype))
            for case in CASES:
                for wrapper in WRAPPERS:
                    model = DistributedDataParallel(_model(case, dtype))
                    loss = _loss(case, model, dtype)
                    loss_fn, miner_wrapper = loss, None
                    if wrapper == "pml" and case == "diversity":
                        # PML's wrapper multiplies its loss by W: the model term goes outside.
                        loss_fn = PrototypeRegularizedLoss(
                            DistributedLossWrapper(loss.loss), model, prototype_reg_weight=0.3
                        )
                        miner_wrapper = DistributedMinerWrapper
                    elif wrapper != "none":
                        loss_fn = (
                            AllGatherLossWrapper if wrapper == "ours" else DistributedLossWrapper
                        )(loss)
                        miner_wrapper = DistributedMinerWrapper
                    value, grads = _step(
                        case, model, loss_fn, x, labels, ref_x, ref_labels, miner_wrapper
                    )
                    loss_grads = [p.grad.clone() for p in loss.parameters()]
                    results[dtype_name, case, wrapper] = (value, grads, loss_grads)
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    with pytest.MonkeyPatch.context() as env:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):  # read by the workers' torch
            env.setenv(name, "1")
        mp.spawn(_worker, args=(str(out_dir),), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def _embedding_length() -> float:
    """Terms summed on the way to an embedding, amplified by the softmax: (C + 3d + N + K d) / T.

    A CRT head sums C (input projection), 2 d (LayerNorm), d (<x, p>), N (over
    positions) and K d (fusion) terms; its softmax over cos / T multiplies the
    error before it by up to 1 / T. The longest head counts.
    """
    model = _model("multi_head", torch.float64)
    positions = _data(torch.float64)[0][0, 0].numel()
    return max(
        (head.in_channels + 3 * head.projection_dim + positions)
        + head.num_prototypes * head.projection_dim
        for head in model.heads
    ) / min(head.temperature_value for head in model.heads)


def _tolerance(case: str, dtype_name: str) -> float:
    """Bound on one run's |result - exact|, relative to max|exact| of the tensor compared.

    A sum of n terms is off by at most n eps relative to its sum of |terms|, and
    the stages' errors add. An embedding is within ``_embedding_length()`` eps
    (relative), and back-propagation through the head sums as many terms again.
    A similarity is off by up to twice its embeddings' relative error, and the
    loss turns that into a gradient error up to ``SHARPNESS`` times larger; the
    loss itself sums over the B^2 pairs. So k = 2 L (1 + 2 sharpness) + B^2. A
    worst case: float32 runs measure 10 to 400 eps.
    """
    k = 2 * _embedding_length() * (1 + 2 * SHARPNESS[case]) + BATCH**2
    return k * torch.finfo(getattr(torch, dtype_name)).eps


def _assert_close(actual, expected, tolerance, scale=1.0):
    """Relative to the largest magnitude of ``expected`` (gradients have many near-0 entries)."""
    expected = scale * expected
    error = float((actual.double() - expected.double()).abs().max())
    bound = tolerance * float(expected.abs().max())
    assert error <= bound, f"{error:.3g} > {bound:.3g} ({tolerance:.3g} x max|expected|)"


def _max_relative_error(actual, expected) -> float:
    return max(
        float((a - e).abs().max() / e.abs().max().clamp_min(1e-12))
        for a, e in zip(actual, expected, strict=True)
    )


def test_all_gather_with_grad_orders_local_first_and_sums_gradients(ranks):
    for rank, result in enumerate(ranks):
        gathered, grad = result["gather"]
        other = 1 - rank
        expected = torch.tensor([rank] * 2 + [other] * 2, dtype=torch.float64)
        torch.testing.assert_close(gathered, expected.view(4, 1).expand(4, 3))
        # Row i of rank r's gathered tensor is weighted (r + 1) * i. The local rows
        # are rows 0-1 on this rank and rows 2-3 on the other.
        rows = torch.arange(2, dtype=torch.float64)
        expected_grad = (rank + 1) * rows + (other + 1) * (rows + 2)
        torch.testing.assert_close(grad, expected_grad.view(2, 1).expand(2, 3))


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_all_gather_loss_wrapper_matches_single_process(ranks, case, dtype_name):
    value, grads, loss_grads = _reference(case, torch.float64)
    tolerance = _tolerance(case, dtype_name)
    for result in ranks:
        rank_value, rank_grads, rank_loss_grads = result[dtype_name, case, "ours"]
        _assert_close(rank_value, value, tolerance)
        for rank_grad, grad in zip(rank_grads, grads, strict=True):
            _assert_close(rank_grad, grad, tolerance)
        assert len(rank_loss_grads) == len(loss_grads) == (len(HEADS) if case == "proxies" else 0)
        for rank_grad, grad in zip(rank_loss_grads, loss_grads, strict=True):
            _assert_close(rank_grad, grad, tolerance)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_pml_wrapper_matches_up_to_world_size(ranks, case, dtype_name):
    """PML's wrapper: exact model gradients; loss value and loss-parameter gradients x W.

    (With the prototype term outside PML's wrapper, only the wrapped part of the
    value is multiplied by W, so the "diversity" case checks gradients only.)
    """
    value, grads, loss_grads = _reference(case, torch.float64)
    tolerance = _tolerance(case, dtype_name)
    for result in ranks:
        rank_value, rank_grads, rank_loss_grads = result[dtype_name, case, "pml"]
        if case != "diversity":
            _assert_close(rank_value, value, tolerance, scale=WORLD_SIZE)
        for rank_grad, grad in zip(rank_grads, grads, strict=True):
            _assert_close(rank_grad, grad, tolerance)
        for rank_grad, grad in zip(rank_loss_grads, loss_grads, strict=True):
            _assert_close(rank_grad, grad, tolerance, scale=WORLD_SIZE)


def _miner_margin(embeddings, labels, epsilon=0.02):
    """How far every similarity is from a MultiSimilarityMiner threshold.

    The miner keeps a positive pair whose similarity minus epsilon is below the
    anchor's largest negative similarity, and a negative pair whose similarity
    plus epsilon is above the anchor's smallest positive one. Self-pairs count
    as positives (as when the miner sees the gathered batch).
    """
    unit = F.normalize(embeddings, dim=1)
    sims = unit @ unit.T
    same = labels[:, None] == labels[None, :]
    margins = []
    for row, positive in zip(sims, same, strict=True):
        pos, neg = row[positive], row[~positive]
        margins.append((pos - epsilon - neg.max()).abs().min())
        margins.append((neg + epsilon - pos.min()).abs().min())
    return float(min(margins))


def _hinge_margin(embeddings, labels, ref, ref_labels):
    """How far every negative pair's distance is from ContrastiveLoss's neg_margin of 1."""
    distances = torch.cdist(F.normalize(embeddings, dim=1), F.normalize(ref, dim=1))
    negative = labels[:, None] != ref_labels[None, :]
    return float((distances[negative] - 1).abs().min())


def test_float32_runs_make_the_float64_discrete_choices():
    """No similarity or distance is within float32's reach of a threshold.

    Which pairs the miners keep, and which negative pairs ContrastiveLoss's hinge
    (and its average over non-zero terms) counts, are step functions of the
    embeddings. A float32 embedding is within ``_embedding_length()`` eps of the
    exact one (relative), a similarity or distance of unit vectors within twice
    that: every float64 margin must exceed it, or the float32 checks above
    could flip a choice on another machine.
    """
    reach = 2 * _embedding_length() * torch.finfo(torch.float32).eps
    x, labels, ref_x, ref_labels = _data(torch.float64)
    model = _model("multi_head", torch.float64)
    with torch.no_grad():
        embeddings, ref = model(x), model(ref_x)
    sizes = model.embedding_sizes
    heads, ref_heads = embeddings.split(sizes, dim=1), ref.split(sizes, dim=1)
    margins = {
        "head_miner": min(_miner_margin(h, labels) for h in heads),
        "tuple_miner": _miner_margin(embeddings, labels),
        "ref_emb": min(
            _hinge_margin(h, labels, r, ref_labels) for h, r in zip(heads, ref_heads, strict=True)
        ),
        "regularizer": _hinge_margin(embeddings, labels, embeddings, labels),
    }
    assert all(margin > reach for margin in margins.values()), (margins, reach)


@pytest.mark.parametrize("case", CASES)
def test_without_wrapper_the_gradients_differ(ranks, case):
    """The check above can fail: each rank's loss on its own half is not the full-batch loss."""
    value, grads, _ = _reference(case, torch.float64)
    for result in ranks:
        rank_value, rank_grads, _ = result["float64", case, "none"]
        assert abs(float(rank_value - value)) > 1e-3 * abs(float(value))
        assert _max_relative_error(rank_grads, grads) > 1e-3


def test_head_miner_and_tuple_miner_select_pairs():
    """The miner cases are not all-pairs in disguise: mining changes the loss."""
    plain, _, _ = _reference("multi_head", torch.float64)
    for case in ("head_miner", "tuple_miner"):
        mined, _, _ = _reference(case, torch.float64)
        assert abs(float(mined - plain)) > 1e-6


def test_outside_torch_distributed_the_wrappers_are_the_loss():
    assert get_world_size() == 1
    x = torch.randn(6, 3, requires_grad=True)
    assert all_gather_with_grad(x) is x
    embeddings, labels = torch.randn(8, 12), torch.arange(4).repeat(2)
    loss = MultiHeadLoss(losses.MultiSimilarityLoss(), [8, 4])
    with pytest.warns(UserWarning, match="non-distributed"):
        value = AllGatherLossWrapper(loss)(embeddings, labels)
    torch.testing.assert_close(value, loss(embeddings, labels))


def _shards(world_size: int, epoch: int, labels: list[int]) -> list[list[int]]:
    shards = []
    for rank in range(world_size):
        sampler = samplers.MPerClassSampler(labels, m=2, batch_size=8, length_before_new_iter=32)
        shard = RankShardSampler(sampler, 8, rank, world_size, seed=3)
        shard.set_epoch(epoch)
        shards.append(list(shard))
    return shards


def test_rank_shards_partition_the_global_batches():
    """Every rank draws the same global batches and takes its own contiguous slice of each."""
    labels = [c for c in range(6) for _ in range(4)]
    (whole,) = _shards(1, 0, labels)
    assert len(whole) == 32
    pml_cf.NUMPY_RANDOM.rand()  # other users of PML's generator do not change the batches
    halves = _shards(2, 0, labels)
    quarters = _shards(4, 0, labels)
    for batch in range(4):
        expected = whole[8 * batch : 8 * (batch + 1)]
        assert halves[0][4 * batch : 4 * (batch + 1)] + halves[1][4 * batch : 4 * (batch + 1)] == (
            expected
        )
        assert sum((q[2 * batch : 2 * (batch + 1)] for q in quarters), []) == expected
        # MPerClassSampler's m=2 per class: each half-batch holds whole classes
        for half in halves:
            classes = [labels[i] for i in half[4 * batch : 4 * (batch + 1)]]
            assert sorted(classes.count(c) for c in set(classes)) == [2, 2]
    assert _shards(1, 1, labels)[0] != whole  # the epoch changes the draw ...
    assert _shards(1, 0, labels)[0] == whole  # ... and set_epoch replays it


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"global_batch_size": 6, "rank": 0, "world_size": 4}, "multiple of the world size 4"),
        (
            {"global_batch_size": 8, "rank": 2, "world_size": 2},
            r"rank must be in \[0, world_size=2",
        ),
    ],
)
def test_rank_shard_sampler_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RankShardSampler(range(8), **kwargs)
