"""Same seed, same result: a short stock-PML training run is bit-for-bit reproducible on CPU.

Trunk ``SmallConvNet`` + ``MultiHeadCRT`` + ``MultiHeadLoss(MultiSimilarityLoss)``
trained by PML's ``MetricLossOnly`` trainer with an ``MPerClassSampler`` on a
random tensor dataset (8 classes x 8 images), ``dataloader_num_workers=0``, 5
iterations. What must be seeded: ``torch.manual_seed`` (weights) and
``numpy.random.seed`` (``MPerClassSampler`` draws from ``numpy.random``). What
must be fixed: the number of torch threads (a parallel reduction sums in an
order that depends on it), one here, set by each run and restored after it.
"""

import contextlib
import logging

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses, samplers, trainers

from pml_crt.losses import MultiHeadLoss
from pml_crt.models import MultiHeadCRT
from pml_crt.trunks import SmallConvNet

NUM_CLASSES = 8
PER_CLASS = 8
ITERATIONS = 5
BATCH_SIZE = 16

# PML's progress bar formats the loss tensor, which still requires grad.
pytestmark = pytest.mark.filterwarnings(
    "ignore:Converting a tensor with requires_grad=True to a scalar:UserWarning"
)


def _dataset():
    """The same data for every run: only the seed given to ``_train`` varies."""
    generator = torch.Generator().manual_seed(1234)
    images = torch.randn(NUM_CLASSES * PER_CLASS, 1, 16, 16, generator=generator)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(PER_CLASS)
    return torch.utils.data.TensorDataset(images, labels), labels


@contextlib.contextmanager
def _isolated_globals():
    """One torch thread inside; the thread count and global generators restored after."""
    threads = torch.get_num_threads()
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        torch.set_rng_state(torch_state)
        np.random.set_state(numpy_state)


def _train(seed):
    """Train for ``ITERATIONS`` steps; return the final state and every step's losses."""
    with _isolated_globals():
        return _train_seeded(seed)


def _train_seeded(seed):
    torch.manual_seed(seed)
    np.random.seed(seed)
    logging.getLogger("PML").setLevel(logging.WARNING)
    dataset, labels = _dataset()
    trunk = SmallConvNet(1, channels=(16, 32), pool_last=False)
    embedder = MultiHeadCRT(trunk.out_channels, heads=[(8, 16), (4, 8)])
    models = {"trunk": trunk, "embedder": embedder}
    optimizers = {
        f"{name}_optimizer": torch.optim.Adam(model.parameters(), lr=1e-2)
        for name, model in models.items()
    }
    loss = MultiHeadLoss(losses.MultiSimilarityLoss(), embedder.embedding_sizes)
    history = []

    def end_of_iteration_hook(trainer):
        history.append({name: value.detach().clone() for name, value in trainer.losses.items()})

    trainer = trainers.MetricLossOnly(
        models=models,
        optimizers=optimizers,
        batch_size=BATCH_SIZE,
        loss_funcs={"metric_loss": loss},
        dataset=dataset,
        sampler=samplers.MPerClassSampler(labels, m=4, batch_size=BATCH_SIZE),
        iterations_per_epoch=ITERATIONS,
        dataloader_num_workers=0,
        end_of_iteration_hook=end_of_iteration_hook,
    )
    trainer.train(num_epochs=1)
    state = {
        f"{name}.{key}": value.detach().clone()
        for name, model in models.items()
        for key, value in model.state_dict().items()
    }
    return state, history


def _assert_identical(first, second):
    state_a, history_a = first
    state_b, history_b = second
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert len(history_a) == len(history_b) == ITERATIONS
    for step, (losses_a, losses_b) in enumerate(zip(history_a, history_b, strict=True)):
        assert losses_a.keys() == losses_b.keys()
        for name in losses_a:
            assert torch.equal(losses_a[name], losses_b[name]), (step, name)


@pytest.fixture(scope="module")
def seed_zero_run():
    return _train(0)


def test_same_seed_gives_bitwise_identical_training(seed_zero_run):
    _assert_identical(seed_zero_run, _train(0))


def test_training_changed_the_parameters(seed_zero_run):
    state, history = seed_zero_run
    with _isolated_globals():
        torch.manual_seed(0)
        initial = SmallConvNet(1, channels=(16, 32), pool_last=False).state_dict()
    assert not torch.equal(state["trunk.blocks.0.0.weight"], initial["blocks.0.0.weight"])
    assert all(torch.isfinite(step["total_loss"]) for step in history)


def test_different_seed_gives_different_parameters(seed_zero_run):
    state_a, history_a = seed_zero_run
    state_b, history_b = _train(1)
    differing = [key for key in state_a if not torch.equal(state_a[key], state_b[key])]
    assert "embedder.heads.0.prototypes" in differing
    assert "trunk.blocks.0.0.weight" in differing
    assert any(
        not torch.equal(a["total_loss"], b["total_loss"])
        for a, b in zip(history_a, history_b, strict=True)
    )
