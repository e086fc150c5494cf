"""Process set-up: seeding, devices, torch.distributed (torchrun) and data sharding."""

from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import Dataset, Subset

logger = logging.getLogger(__name__)


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def init_distributed() -> tuple[int, int]:
    """Initialise torch.distributed from torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_*).

    NCCL when CUDA is available (and the process's GPU is selected), gloo otherwise. A no-op returning
    (0, 1) when not launched by torchrun; returns the current (rank, world size) when already initialised.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return 0, 1
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    logger.info("torch.distributed: rank %d of %d (%s)", dist.get_rank(), dist.get_world_size(), backend)
    return dist.get_rank(), dist.get_world_size()


def world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> this process's GPU if CUDA is available, else the CPU; ``cuda`` -> LOCAL_RANK's GPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cuda":
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device(spec)


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Contiguous block ``rank`` of ``world_size`` (no padding): the blocks in rank order are the dataset."""
    n = len(dataset)
    return Subset(dataset, range(rank * n // world_size, (rank + 1) * n // world_size))
