"""Host reads (device synchronisations on an accelerator) of one training step.

A stock PML step (linear embedder, ``MultiSimilarityLoss`` + miner) is the
baseline. ``MultiHeadCRT`` + ``MultiHeadLoss`` (consistency on, per-head miner)
runs that stock loss and miner once per head, so it may make ``H`` times the
baseline's reads inside PML, plus at most ``PML_CRT_READS`` of its own.

The reads pml-crt itself still makes in a default step (``PML_CRT_READS = 2``):

- ``pml_crt/models/multi_head_crt.py`` (``forward``, the call of
  ``feature_map_to_tokens`` with ``check``) -> ``pml_crt/utils/layout.py``
  (``feature_map_to_tokens``) -> ``pml_crt/utils/validation.py``
  (``check_finite``: ``bool(isfinite(min) & isfinite(max))``): the embedders'
  ``check_inputs``, on by default, rejects non-finite trunk outputs;
- ``pml_crt/losses/multi_head_loss.py`` (``_check_pairs_possible``, called
  from ``forward``): the single-class check on ``labels``. It runs here
  because the labels are on the CPU, where reading them costs no
  synchronisation; labels on an accelerator are checked only with
  ``check_inputs=True``, so on a GPU this read is not made.

(With ``MultiHeadCRT(..., diversity_weight > 0)`` each head also records
``last_diversity_penalty`` with ``float()`` in ``pml_crt/models/crt.py``
``_embed``; not in a default step.)
"""

from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses, miners

from benchmarks.perf.step_time import HostSyncCounter
from pml_crt.losses import MultiHeadLoss, SimilarityConsistencyLoss
from pml_crt.models import MultiHeadCRT
from pml_crt.regularizers import SimilarityConsistencyRegularizer

CHANNELS, SIDE, CLASSES, PER_CLASS = 16, 4, 4, 4
PML_CRT_READS = 2  # see the module docstring


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(CLASSES * PER_CLASS, CHANNELS, SIDE, SIDE, generator=generator)
    return x, torch.arange(CLASSES).repeat_interleave(PER_CLASS)


def _count(step) -> HostSyncCounter:
    step()  # warm-up: lazy initialisation (optimizer state, ...) is not per step
    with HostSyncCounter() as counter:
        step()
    return counter


def _baseline_step():
    x, labels = _batch()
    torch.manual_seed(0)
    embedder = torch.nn.Linear(CHANNELS * SIDE * SIDE, 64)
    loss, miner = losses.MultiSimilarityLoss(), miners.MultiSimilarityMiner()
    optimizer = torch.optim.SGD(embedder.parameters(), lr=0.01)

    def step():
        embeddings = embedder(x.flatten(1))
        value = loss(embeddings, labels, miner(embeddings, labels))
        optimizer.zero_grad()
        value.backward()
        optimizer.step()

    return step


def _multi_head_step(model_kwargs=None, **loss_kwargs):
    x, labels = _batch()
    torch.manual_seed(0)
    model = MultiHeadCRT(CHANNELS, **(model_kwargs or {}))
    loss = MultiHeadLoss(
        losses.MultiSimilarityLoss(),
        model.embedding_sizes,
        miner=miners.MultiSimilarityMiner(),
        **loss_kwargs,
    )
    assert loss.consistency is not None  # the consistency term is on by default
    optimizer = torch.optim.SGD([*model.parameters(), *loss.parameters()], lr=0.01)

    def step():
        value = loss(model(x), labels)
        optimizer.zero_grad()
        value.backward()
        optimizer.step()

    return step, model.num_heads


def test_counter_sees_value_reads_and_data_dependent_shapes():
    x = torch.tensor([1.0, -2.0, 3.0])
    with HostSyncCounter() as counter:
        x.sum().item()
        bool(x[0] > 0)
        float(x[1])
        x.tolist()
        torch.nonzero(x > 0)
        torch.where(x > 0)
        x[x > 0]
        torch.where(x > 0, x, 0.0)  # three arguments: no read
        x[1:] * 2  # no read
    assert counter.total == 7, counter.report()
    assert counter.total_in("tests") == 7


def test_multi_head_step_reads_at_most_heads_times_the_stock_step_plus_a_few():
    baseline = _count(_baseline_step())
    assert baseline.total >= 1, baseline.report()
    assert baseline.total_in("pml_crt") == 0

    step, heads = _multi_head_step()
    ours = _count(step)
    report = {"baseline": baseline.report(), "ours": ours.report()}
    # Each head runs the stock loss and miner on its slice.
    assert ours.total_in("pytorch_metric_learning") <= heads * baseline.total, report
    # pml-crt's own reads: the two listed in the module docstring, all in
    # models/ or in the CPU-label check; the losses' value checks are opt-in
    # (check_inputs) and recorded values stay tensors.
    assert ours.total_in("pml_crt") <= PML_CRT_READS, report
    assert ours.total_in("pml_crt/losses") <= 1, report
    assert ours.total <= heads * baseline.total + PML_CRT_READS, report


def test_collect_stats_records_without_reading_and_check_inputs_adds_the_checks():
    step, _ = _multi_head_step()
    default = _count(step).total_in("pml_crt")
    step, _ = _multi_head_step(collect_stats=True)
    assert _count(step).total_in("pml_crt") == default
    # Opting in to the loss's finite checks reads the embeddings once more.
    step, _ = _multi_head_step(check_inputs=True)
    assert _count(step).total_in("pml_crt") == default + 1
    # Without the embedders' check_inputs only the CPU-label check is left.
    step, _ = _multi_head_step(model_kwargs={"check_inputs": False})
    assert _count(step).total_in("pml_crt") == default - 1 == 1


@pytest.mark.parametrize("include_diagonal", [False, True])
def test_consistency_term_reads_nothing(include_diagonal):
    x = torch.randn(8, 12, requires_grad=True)
    loss = SimilarityConsistencyLoss([5, 3, 4], include_diagonal=include_diagonal)
    regularizer = SimilarityConsistencyRegularizer([5, 3, 4], include_diagonal=include_diagonal)
    with HostSyncCounter() as counter:
        (loss(x) + loss(x, ref_emb=x[:3].detach()) + regularizer(x)).backward()
    assert counter.total == 0, counter.report()
