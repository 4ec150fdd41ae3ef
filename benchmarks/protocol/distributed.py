"""The benchmark runner under ``torchrun``: DDP training with PML's stock trainer.

    torchrun --nproc_per_node=2 -m benchmarks.run --config benchmarks/configs/omniglot_quick.yaml

Every rank runs the same units in the same order. ``training.batch_size`` is
the *global* batch: each epoch's batches are drawn identically on every rank
(:class:`~pml_crt.utils.distributed.RankShardSampler`) and each rank trains on
its contiguous share. Trunk and embedder are wrapped in
``DistributedDataParallel``, the loss in
:class:`~pml_crt.utils.distributed.AllGatherLossWrapper` (every head's loss, its
miner and the consistency term see the whole global batch) and a trainer
``tuple_miner`` in PML's ``DistributedMinerWrapper``. The loss and the
gradients then equal one process's on the global batch; with a model whose
outputs do not depend on the other samples of the batch (frozen or no
BatchNorm), ``torchrun --nproc_per_node=2`` reproduces ``--nproc_per_node=1``
up to float rounding (``tests/test_benchmark_distributed.py``). Trained
BatchNorm normalises with each rank's local batch, and rank 0's running
statistics are the ones evaluated and saved.

Rank 0 owns the run folder: it validates at the end of every epoch (the stock
``HookContainer`` hook), decides early stopping and tells the other ranks,
writes the record-keeper logs, checkpoints and resume points, tests the best
model and writes the tables. The run folder must be on a file system that
every rank sees (one machine, or a shared mount): after a restart every rank
loads the resume point that rank 0 wrote. Backend: NCCL with one GPU per
process when the config's device is CUDA, gloo on CPU.
"""

from __future__ import annotations

import datetime
import inspect
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from pml_crt.utils.distributed import AllGatherLossWrapper, DistributedMinerWrapper

# Rank 0 may test, write tables or build caches for a while before the others
# hear from it; gloo's default of 30 minutes is short for a large test set.
TIMEOUT = datetime.timedelta(hours=4)


@dataclass(frozen=True)
class Launch:
    """This process's place in the run: ``torchrun`` or a plain single process."""

    rank: int = 0
    world_size: int = 1
    distributed: bool = False  # started by torchrun: train through DDP and the wrappers

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def broadcast(self, value: Any) -> Any:
        """Rank 0's ``value`` (any picklable object) on every rank."""
        if not self.distributed:
            return value
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


SINGLE_PROCESS = Launch()


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def start(device: torch.device) -> tuple[Launch, torch.device]:
    """Join torchrun's process group (if launched by it) and pick this rank's device.

    ``device`` is the config's device: on CUDA each rank takes ``cuda:LOCAL_RANK``
    and NCCL, otherwise gloo.
    """
    if not launched_by_torchrun():
        return SINGLE_PROCESS, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=TIMEOUT)
    return Launch(dist.get_rank(), dist.get_world_size(), True), device


def stop(launch: Launch) -> None:
    if launch.distributed and dist.is_initialized():
        dist.destroy_process_group()


def wrap_models(
    models: Mapping[str, torch.nn.Module], launch: Launch, device: torch.device
) -> dict[str, torch.nn.Module]:
    """DDP around every model with trainable parameters (the others stay as they are).

    Buffers are synced once, when DDP starts, and never in ``forward``: rank 0
    evaluates on its own between epochs, and a buffer broadcast inside that
    forward would wait for ranks that are not there.
    """
    if not launch.distributed:
        return dict(models)
    device_ids = [device.index] if device.type == "cuda" else None
    options = inspect.signature(DistributedDataParallel.__init__).parameters
    # newer torch calls it forward_sync_buffers (and deprecates broadcast_buffers)
    no_forward_sync = (
        {"forward_sync_buffers": False}
        if "forward_sync_buffers" in options
        else {"broadcast_buffers": False}
    )
    return {
        name: DistributedDataParallel(model, device_ids=device_ids, **no_forward_sync)
        if any(p.requires_grad for p in model.parameters())
        else model
        for name, model in models.items()
    }


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, DistributedDataParallel) else model


def wrap_losses(
    loss_funcs: Mapping[str, torch.nn.Module],
    mining_funcs: Mapping[str, torch.nn.Module],
    launch: Launch,
) -> tuple[dict[str, torch.nn.Module], dict[str, torch.nn.Module]]:
    """Losses and miners that see the embeddings of all ranks (gathered order)."""
    if not launch.distributed:
        return dict(loss_funcs), dict(mining_funcs)
    return (
        {name: AllGatherLossWrapper(loss) for name, loss in loss_funcs.items()},
        {
            name: DistributedMinerWrapper(miner, efficient=False)
            for name, miner in mining_funcs.items()
        },
    )
