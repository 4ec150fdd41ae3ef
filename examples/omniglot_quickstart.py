"""Quick start: a small convnet + CRT on Omniglot, trained and tested with stock PML parts.

Trains the same trunk with two embedders under one protocol, seeds and budget:

* ``GlobalPoolEmbedder`` (average pooling + Linear, the MLRC embedder), and
* ``MultiHeadCRT`` with the similarity-consistency term (``MultiHeadLoss``),

both with the Multi-Similarity loss and miner, ``MPerClassSampler``,
``trainers.MetricLossOnly`` and ``testers.GlobalEmbeddingSpaceTester``. Classes
are split MLRC-style: the first half of the characters train, the second half
(never seen in training) test. Prints P@1, R-Precision and MAP@R as mean ±
95% CI over seeds.

    python examples/omniglot_quickstart.py --data ../shared/data

``--data`` is the folder holding ``omniglot-py/`` (what
``torchvision.datasets.Omniglot(root, download=True)`` or
``pml_crt.datasets.download_omniglot(root)`` creates).
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import time
from pathlib import Path

import torch
from pytorch_metric_learning import losses, miners, samplers, testers, trainers
from torchvision import transforms

import pml_crt
from pml_crt.datasets import CachedDataset, OmniglotCharacters, cache_dataset
from pml_crt.losses import MultiHeadLoss
from pml_crt.models import GlobalPoolEmbedder, MultiHeadCRT
from pml_crt.trunks import SmallConvNet
from pml_crt.utils import make_accuracy_calculator
from pml_crt.utils.stats import format_mean_ci

METRICS = {
    "precision_at_1": "P@1",
    "r_precision": "R-Precision",
    "mean_average_precision_at_r": "MAP@R",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data", help="folder holding omniglot-py/")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--iterations", type=int, default=300, help="training iterations")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--classes", type=int, default=None, help="use only the first N characters (default all)"
    )
    return parser.parse_args(argv)


def make_datasets(
    root: str, image_size: int, classes: int | None = None
) -> tuple[CachedDataset, CachedDataset]:
    """First half of the characters for training, the second half for testing.

    The images are decoded and resized once and kept in memory (no random
    augmentation here), so training spends its time on the model.
    """
    transform = transforms.Compose(
        [
            transforms.Resize(image_size),
            transforms.ToTensor(),
            transforms.Lambda(lambda x: 1.0 - x),  # strokes 1, background 0
        ]
    )
    num_classes = classes or OmniglotCharacters(root).num_classes
    half = num_classes // 2
    splits = {"train": slice(0, half), "test": slice(half, num_classes)}
    return tuple(
        cache_dataset(
            OmniglotCharacters(root, transform=transform, class_subset=classes),
            desc=f"decoding {name} images",
        )
        for name, classes in splits.items()
    )


def make_embedder_and_loss(kind: str, in_channels: int) -> tuple[torch.nn.Module, dict, dict]:
    """The embedder, the trainer's ``loss_funcs`` and its ``mining_funcs``."""
    if kind == "GlobalPoolEmbedder":
        embedder = GlobalPoolEmbedder(in_channels, 128, pooling="avg")
        return (
            embedder,
            {"metric_loss": losses.MultiSimilarityLoss()},
            {"tuple_miner": miners.MultiSimilarityMiner()},
        )
    embedder = MultiHeadCRT(in_channels, heads=[(16, 128), (8, 64)])
    loss = MultiHeadLoss(
        losses.MultiSimilarityLoss(),
        embedder.embedding_sizes,
        miner=miners.MultiSimilarityMiner(),
    )
    return embedder, {"metric_loss": loss}, {}


def train_and_test(kind: str, seed: int, args, train, test) -> dict[str, float]:
    """One training run; returns the test metrics."""
    random.seed(seed)
    torch.manual_seed(seed)
    trunk = SmallConvNet(1, pool_last=False)
    embedder, loss_funcs, mining_funcs = make_embedder_and_loss(kind, trunk.out_channels)
    models = {"trunk": trunk, "embedder": embedder}
    optimizers = {
        f"{name}_optimizer": torch.optim.Adam(model.parameters(), lr=args.lr)
        for name, model in models.items()
    }
    sampler = samplers.MPerClassSampler(
        train.labels, m=4, batch_size=args.batch_size, length_before_new_iter=len(train)
    )
    trainer = trainers.MetricLossOnly(
        models=models,
        optimizers=optimizers,
        batch_size=args.batch_size,
        loss_funcs=loss_funcs,
        mining_funcs=mining_funcs,
        dataset=train,
        sampler=sampler,
        iterations_per_epoch=args.iterations,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
    )
    trainer.train(num_epochs=1)
    tester = testers.GlobalEmbeddingSpaceTester(
        accuracy_calculator=make_accuracy_calculator(),
        batch_size=256,
        dataloader_num_workers=0,
        data_device=torch.device("cpu"),
    )
    accuracies = tester.test({"test": test}, 1, trunk, embedder)["test"]
    return {metric: accuracies[f"{metric}_level0"] for metric in METRICS}


def results_table(results: dict[str, list[dict[str, float]]], seeds: list[int]) -> str:
    """Markdown table, one row per embedder, mean ± 95% CI over seeds in percent."""
    header = "| embedder | " + " | ".join(METRICS.values()) + " |"
    rows = [header, "|" + "---|" * (len(METRICS) + 1)]
    for kind, runs in results.items():
        cells = [format_mean_ci([run[m] for run in runs]) for m in METRICS]
        rows.append(f"| {kind} | " + " | ".join(cells) + " |")
    rows.append(f"\n(percent; mean ± 95% CI over seeds {seeds})")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.getLogger("PML").setLevel(logging.WARNING)
    if not (Path(args.data) / "omniglot-py").is_dir():
        sys.exit(
            f"No omniglot-py/ under {args.data!r}. Pass --data, or download it first: "
            f"python -c \"import pml_crt; pml_crt.datasets.download_omniglot('{args.data}')\""
        )
    train, test = make_datasets(args.data, args.image_size, args.classes)
    print(
        f"pml-crt {pml_crt.__version__}: Omniglot, {len(set(train.labels))} training characters, "
        f"{len(set(test.labels))} unseen test characters; {args.iterations} iterations x "
        f"batch {args.batch_size}; seeds {args.seeds}"
    )
    results: dict[str, list[dict[str, float]]] = {"GlobalPoolEmbedder": [], "MultiHeadCRT": []}
    start = time.time()
    for seed in args.seeds:
        for kind, runs in results.items():
            print(f"seed {seed}: {kind}")
            runs.append(train_and_test(kind, seed, args, train, test))
    print()
    print(results_table(results, args.seeds))
    print(f"({time.time() - start:.0f} s on {torch.get_num_threads()} CPU threads)")


if __name__ == "__main__":
    main()
