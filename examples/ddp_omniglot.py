"""Multi-process (DDP) training of SmallConvNet + MultiHeadCRT on Omniglot with PML's trainer.

    torchrun --nproc_per_node=2 examples/ddp_omniglot.py --data ../shared/data --iterations 20

(``python examples/ddp_omniglot.py ...`` runs the same training in one process.)
Backend: NCCL with one GPU per process when CUDA is available, gloo on CPU.

How the pieces fit:

* every rank draws the same global ``MPerClassSampler`` batch (``--batch-size``,
  seeded identically on all ranks) and loads only its share of it
  (:class:`RankShardSampler`), so the stock ``trainers.MetricLossOnly`` works
  unchanged, with local batches of ``batch_size / world_size``;
* trunk and embedder are wrapped in ``DistributedDataParallel``;
* the loss is ``AllGatherLossWrapper(MultiHeadLoss(...))``: every head's loss,
  its miner and the consistency term see the whole global batch, so the loss
  and, after DDP's averaging, the gradients equal those of one process on the
  global batch (``tests/test_distributed.py``). Keep the single-process
  learning rate for the same global batch size.

The one difference from a single process is BatchNorm: on CPU each rank
normalises with its local batch statistics (``SyncBatchNorm`` needs a GPU;
``--sync-bn`` converts the trunk's BatchNorm on CUDA).
"""

# ruff: noqa: E402
from __future__ import annotations

import os

# Only rank 0 draws the trainer's progress bar (tqdm reads this when it is imported).
if os.environ.get("RANK", "0") != "0":
    os.environ.setdefault("TQDM_DISABLE", "1")

import argparse
import logging
import random
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from pytorch_metric_learning import losses, miners, samplers, testers, trainers
from torch.nn.parallel import DistributedDataParallel
from torchvision import transforms

from pml_crt.datasets import OmniglotCharacters
from pml_crt.losses import MultiHeadLoss
from pml_crt.models import MultiHeadCRT
from pml_crt.trunks import SmallConvNet
from pml_crt.utils import make_accuracy_calculator
from pml_crt.utils.distributed import AllGatherLossWrapper, RankShardSampler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", default="../shared/data", help="folder holding omniglot-py/")
    parser.add_argument("--iterations", type=int, default=100, help="training iterations")
    parser.add_argument("--batch-size", type=int, default=64, help="global batch (all ranks)")
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads per rank")
    parser.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm (CUDA only)")
    parser.add_argument("--test", action="store_true", help="rank 0 tests on unseen characters")
    return parser.parse_args(argv)


def setup() -> tuple[int, int, torch.device]:
    """Join the process group started by torchrun (none without torchrun)."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return dist.get_rank(), dist.get_world_size(), torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), torch.device("cpu")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if not (Path(args.data) / "omniglot-py").is_dir():
        sys.exit(f"No omniglot-py/ under {args.data!r}; see examples/omniglot_quickstart.py")
    rank, world_size, device = setup()
    if device.type == "cpu":
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        torch.set_num_threads(args.threads or max(1, (os.cpu_count() or 1) // local_world))
    logging.getLogger("PML").setLevel(logging.WARNING)

    transform = transforms.Compose(
        [
            transforms.Resize(args.image_size),
            transforms.ToTensor(),
            transforms.Lambda(lambda x: 1 - x),
        ]
    )
    num_classes = OmniglotCharacters(args.data).num_classes
    train = OmniglotCharacters(
        args.data, transform=transform, class_subset=slice(0, num_classes // 2)
    )

    # Same seed on every rank: identical initial weights (DDP also broadcasts rank 0's).
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    trunk = SmallConvNet(1, pool_last=False)
    embedder = MultiHeadCRT(trunk.out_channels, heads=[(16, 128), (8, 64)])
    loss = MultiHeadLoss(
        losses.MultiSimilarityLoss(), embedder.embedding_sizes, miner=miners.MultiSimilarityMiner()
    )
    if args.sync_bn and device.type == "cuda":
        trunk = torch.nn.SyncBatchNorm.convert_sync_batchnorm(trunk)
    trunk, embedder = trunk.to(device), embedder.to(device)
    optimizers = {
        "trunk_optimizer": torch.optim.Adam(trunk.parameters(), lr=args.lr),
        "embedder_optimizer": torch.optim.Adam(embedder.parameters(), lr=args.lr),
    }
    sampler = samplers.MPerClassSampler(
        train.labels,
        m=4,
        batch_size=args.batch_size,
        length_before_new_iter=args.batch_size * args.iterations,
    )
    if world_size > 1:
        device_ids = [device.index] if device.type == "cuda" else None
        trunk = DistributedDataParallel(trunk, device_ids=device_ids)
        embedder = DistributedDataParallel(embedder, device_ids=device_ids)
        loss = AllGatherLossWrapper(loss)
    # With one process too, so that both draw the same global batches.
    sampler = RankShardSampler(sampler, args.batch_size, rank, world_size, seed=args.seed)

    def log_loss(trainer: trainers.MetricLossOnly) -> None:
        i = trainer.iteration + 1
        if rank == 0 and (i % 10 == 0 or i == args.iterations):
            print(f"iteration {i}: loss {float(trainer.losses['metric_loss']):.4f}", flush=True)

    trainer = trainers.MetricLossOnly(
        models={"trunk": trunk, "embedder": embedder},
        optimizers=optimizers,
        batch_size=args.batch_size // world_size,
        loss_funcs={"metric_loss": loss},
        mining_funcs={},
        dataset=train,
        sampler=sampler,
        iterations_per_epoch=args.iterations,
        dataloader_num_workers=0,
        data_device=device,
        end_of_iteration_hook=log_loss,
    )
    start = time.time()
    trainer.train(num_epochs=1)
    if rank == 0:
        print(
            f"{world_size} process(es) x {torch.get_num_threads()} thread(s) on {device.type}: "
            f"{args.iterations} iterations of global batch {args.batch_size} in "
            f"{time.time() - start:.1f} s",
            flush=True,
        )
        if args.test:
            test = OmniglotCharacters(
                args.data, transform=transform, class_subset=slice(num_classes // 2, num_classes)
            )
            tester = testers.GlobalEmbeddingSpaceTester(
                accuracy_calculator=make_accuracy_calculator(),
                batch_size=256,
                dataloader_num_workers=0,
                data_device=device,
            )
            plain = [
                m.module if isinstance(m, DistributedDataParallel) else m for m in (trunk, embedder)
            ]
            accuracies = tester.test({"test": test}, 1, *plain)["test"]
            print(f"unseen characters: P@1 {accuracies['precision_at_1_level0']:.4f}", flush=True)
    if world_size > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
