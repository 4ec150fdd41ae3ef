"""Drop-in proof: stock PML trainer, tester, sampler, miner, AccuracyCalculator and
logging presets train and evaluate trunk + MultiHeadCRT + MultiHeadLoss on real
Omniglot characters, with no glue code."""

import csv
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from pytorch_metric_learning import losses, miners, samplers, testers, trainers
from pytorch_metric_learning.utils import logging_presets
from torchvision import transforms

from pml_crt.datasets import OmniglotCharacters, cache_dataset
from pml_crt.losses import MultiHeadLoss, SimilarityConsistencyLoss
from pml_crt.models import MultiHeadCRT
from pml_crt.trunks import SmallConvNet
from pml_crt.utils import make_accuracy_calculator

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

pytestmark = pytest.mark.skipif(
    not (DATA / "omniglot-py").is_dir(),
    reason=f"Omniglot not found under {DATA} (the real-data fixture); nothing to train on",
)


def _omniglot(classes):
    transform = transforms.Compose([transforms.Resize(28), transforms.ToTensor()])
    return cache_dataset(
        OmniglotCharacters(DATA, transform=transform, class_subset=classes), progress=False
    )


@pytest.fixture(scope="module")
def splits():
    return {"train": _omniglot(range(0, 32)), "val": _omniglot(range(900, 916))}


def _read_csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


@pytest.fixture
def seeded_global_rngs():
    """Seed torch's and numpy's global generators (MPerClassSampler draws from numpy's,
    through PML's ``NUMPY_RANDOM``), so the batches do not depend on the tests run before;
    restore them afterwards."""
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    torch.manual_seed(0)
    np.random.seed(0)
    yield
    torch.set_rng_state(torch_state)
    np.random.set_state(numpy_state)


def test_stock_pml_pipeline_trains_and_logs_crt(splits, tmp_path, seeded_global_rngs):
    logging.getLogger("PML").setLevel(logging.WARNING)
    trunk = SmallConvNet(1, channels=(32, 32, 64), pool_last=False)
    embedder = MultiHeadCRT(trunk.out_channels, heads=[(8, 32), (4, 16)])
    loss = MultiHeadLoss(losses.MultiSimilarityLoss(), embedder.embedding_sizes, collect_stats=True)
    last_call = {}

    def keep_embeddings(module, args):  # what the trainer last handed the loss
        last_call["embeddings"] = args[0].detach().clone()

    loss.register_forward_pre_hook(keep_embeddings)
    models = {"trunk": trunk, "embedder": embedder}
    optimizers = {
        f"{k}_optimizer": torch.optim.Adam(m.parameters(), 1e-3) for k, m in models.items()
    }

    record_keeper, _, _ = logging_presets.get_record_keeper(
        str(tmp_path / "logs"), str(tmp_path / "tensorboard")
    )
    hooks = logging_presets.get_hook_container(record_keeper, log_freq=1)
    tester = testers.GlobalEmbeddingSpaceTester(
        accuracy_calculator=make_accuracy_calculator(),
        end_of_testing_hook=hooks.end_of_testing_hook,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
    )
    end_of_epoch_hook = hooks.end_of_epoch_hook(
        tester, {"val": splits["val"]}, str(tmp_path / "models"), test_interval=1
    )
    trainer = trainers.MetricLossOnly(
        models=models,
        optimizers=optimizers,
        batch_size=32,
        loss_funcs={"metric_loss": loss},
        mining_funcs={"tuple_miner": miners.MultiSimilarityMiner()},
        dataset=splits["train"],
        sampler=samplers.MPerClassSampler(splits["train"].labels, m=4, batch_size=32),
        iterations_per_epoch=20,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
        end_of_iteration_hook=hooks.end_of_iteration_hook,
        end_of_epoch_hook=end_of_epoch_hook,
    )
    trainer.train(num_epochs=2)

    # The loss falls: the last 10 iterations average below the first 10.
    history = [float(r["total_loss"]) for r in _read_csv(tmp_path / "logs" / "loss_histories.csv")]
    assert len(history) == 40
    assert sum(history[-10:]) < sum(history[:10])

    # MAP@R was computed by the stock tester and logged each epoch.
    accuracy_rows = _read_csv(
        tmp_path
        / "logs"
        / "accuracies_normalized_GlobalEmbeddingSpaceTester_level_0_VAL_vs_self.csv"
    )
    assert [int(r["epoch"]) for r in accuracy_rows] == [1, 2]
    map_at_r = [float(r["mean_average_precision_at_r_level0"]) for r in accuracy_rows]
    assert all(0.0 < v <= 1.0 for v in map_at_r)
    embeddings, _ = tester.get_all_embeddings(splits["val"], trunk, embedder)
    assert embeddings.shape == (16 * 20, 32)  # eval mode: the primary head

    # CRT hyperparameters and the loss's sub-losses land in record-keeper's logs.
    embedder_log = _read_csv(tmp_path / "logs" / "embedder_MultiHeadCRT.csv")
    assert int(float(embedder_log[0]["head0_num_prototypes"])) == 8
    assert int(float(embedder_log[0]["head1_embedding_size"])) == 16
    # The last row was logged after the last optimizer step: the trained temperatures.
    for i, head in enumerate(embedder.heads):
        assert float(embedder_log[-1][f"head{i}_temperature_value"]) == head.temperature_value
        assert head.temperature_value != 0.1  # training moved it from its initial value
    loss_log = _read_csv(tmp_path / "logs" / "metric_loss_MultiHeadLoss.csv")
    assert {"head0_loss", "head1_loss", "consistency_loss"} <= set(loss_log[0])
    # The logged term is the consistency of the last training batch's embeddings.
    expected = SimilarityConsistencyLoss(embedder.embedding_sizes)(last_call["embeddings"])
    assert float(loss_log[-1]["consistency_loss"]) == pytest.approx(expected.item(), rel=1e-5)
