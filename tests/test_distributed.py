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

Float64 to 1e-10 (relative), float32 to 1e-5. Without a wrapper the loss only
sees the local half, and the check fails.
"""

from __future__ import annotations

import datetime
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from pytorch_metric_learning import losses, miners, samplers
from pytorch_metric_learning.utils import common_functions as pml_cf
from torch.nn.parallel import DistributedDataParallel

from pml_crt.losses import MultiHeadLoss, SimilarityConsistencyLoss
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
TOLERANCE = {"float64": 1e-10, "float32": 1e-5}
CASES = (
    "multi_head",  # MultiSimilarityLoss per head + consistency
    "head_miner",  # ... with a MultiSimilarityMiner per head
    "tuple_miner",  # ... with one external miner (DistributedMinerWrapper)
    "ref_emb",  # ContrastiveLoss per head + consistency, embeddings vs ref_emb
    "regularizer",  # ContrastiveLoss + SimilarityConsistencyRegularizer on the concatenation
    "consistency_kl",  # SimilarityConsistencyLoss alone, "kl" with stop_gradient="larger"
    "proxies",  # ProxyAnchorLoss per head: the loss has parameters
    "diversity",  # MultiHeadCRT(diversity_weight=...) adds a penalty gradient
)
WRAPPERS = ("ours", "pml", "none")


def _data(dtype: torch.dtype):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, 8, 3, 3, generator=generator, dtype=dtype)
    ref_x = torch.randn(BATCH, 8, 3, 3, generator=generator, dtype=dtype)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(BATCH // NUM_CLASSES)
    labels = labels[torch.randperm(BATCH, generator=generator)]
    ref_labels = labels[torch.randperm(BATCH, generator=generator)]
    return x, labels, ref_x, ref_labels


def _model(case: str, dtype: torch.dtype) -> MultiHeadCRT:
    torch.manual_seed(1)
    weight = 0.3 if case == "diversity" else 0.0
    return MultiHeadCRT(8, heads=HEADS, diversity_weight=weight).to(dtype)


def _miner():
    return miners.MultiSimilarityMiner(epsilon=0.02)


def _loss(case: str, sizes: list[int], dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(2)
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
    loss_fn = _loss(case, model.embedding_sizes, dtype)
    value, grads = _step(case, model, loss_fn, x, labels, ref_x, ref_labels)
    return value, grads, [p.grad.clone() for p in loss_fn.parameters()]


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group(
        "gloo", rank=rank, world_size=WORLD_SIZE, timeout=datetime.timedelta(seconds=60)
    )
    torch.set_num_threads(1)
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
                    loss = _loss(case, model.module.embedding_sizes, dtype)
                    loss_fn, miner_wrapper = loss, None
                    if wrapper != "none":
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


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    mp.spawn(_worker, args=(_free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


def _assert_close(actual, expected, dtype_name, scale=1.0):
    """Relative to the largest magnitude of ``expected`` (gradients have many near-0 entries)."""
    tol = TOLERANCE[dtype_name] * max(float(expected.abs().max()), 1e-12)
    torch.testing.assert_close(actual, scale * expected, rtol=TOLERANCE[dtype_name], atol=tol)


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
    value, grads, loss_grads = _reference(case, getattr(torch, dtype_name))
    for result in ranks:
        rank_value, rank_grads, rank_loss_grads = result[dtype_name, case, "ours"]
        _assert_close(rank_value, value, dtype_name)
        for rank_grad, grad in zip(rank_grads, grads, strict=True):
            _assert_close(rank_grad, grad, dtype_name)
        assert len(rank_loss_grads) == len(loss_grads) == (len(HEADS) if case == "proxies" else 0)
        for rank_grad, grad in zip(rank_loss_grads, loss_grads, strict=True):
            _assert_close(rank_grad, grad, dtype_name)


@pytest.mark.parametrize("dtype_name", DTYPES)
@pytest.mark.parametrize("case", CASES)
def test_pml_wrapper_matches_up_to_world_size(ranks, case, dtype_name):
    """PML's wrapper: exact model gradients; loss value and loss-parameter gradients x W."""
    value, grads, loss_grads = _reference(case, getattr(torch, dtype_name))
    for result in ranks:
        rank_value, rank_grads, rank_loss_grads = result[dtype_name, case, "pml"]
        _assert_close(rank_value, value, dtype_name, scale=WORLD_SIZE)
        for rank_grad, grad in zip(rank_grads, grads, strict=True):
            _assert_close(rank_grad, grad, dtype_name)
        for rank_grad, grad in zip(rank_loss_grads, loss_grads, strict=True):
            _assert_close(rank_grad, grad, dtype_name, scale=WORLD_SIZE)


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
