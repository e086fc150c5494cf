"""Process set-up and every torch.distributed helper: seeding, devices, ranks, collectives, data sharding.

Nothing else in the project asks torch.distributed whether it is running: :func:`is_distributed` and
:func:`world` answer it, and the collectives below are no-ops (or identities) in a single process.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.utils.data import Dataset, Subset

from cimlic.errors import ConfigError

logger = logging.getLogger(__name__)


def is_distributed() -> bool:
    """True when torch.distributed is initialised with more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 without torch.distributed)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


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
    """(rank, world size); (0, 1) without torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if is_distributed():
        dist.barrier()


def close_distributed() -> None:
    """Leave the process group cleanly (a barrier first: gloo can abort at exit while a peer still sends)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


@contextlib.contextmanager
def rank_zero_first() -> Iterator[None]:
    """Run the body on rank 0 first, then on the other ranks (e.g. rank 0 fills a cache the others then read)."""
    active = is_distributed()
    if active and dist.get_rank() != 0:
        dist.barrier()
    yield
    if active and dist.get_rank() == 0:
        dist.barrier()


def collective_device() -> torch.device:
    """Where tensors for a collective live: this process's GPU under NCCL, else the CPU."""
    if is_distributed() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(x: Tensor) -> Tensor:
    """Sum ``x`` over the ranks in place (identity in a single process); returns ``x``."""
    if is_distributed():
        dist.all_reduce(x)
    return x


def all_gather_cat(x: Tensor) -> Tensor:
    """Concatenate every rank's (n_r, ...) tensor along dim 0 in rank order; the n_r may differ (identity alone)."""
    if not is_distributed():
        return x
    size = torch.tensor([x.shape[0]], device=x.device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    padded = x.new_zeros((int(max(sizes)), *x.shape[1:]))  # all_gather needs equal shapes
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[: int(n)] for p, n in zip(parts, sizes, strict=True)])


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's picklable ``obj`` in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def resolve_device(spec: str) -> torch.device:
    """``auto`` -> this process's GPU if CUDA is available, else the CPU; ``cuda`` -> LOCAL_RANK's GPU."""
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if spec == "cuda" else torch.device(spec)
    except (RuntimeError, ValueError):
        raise ConfigError(f"train.device: {spec!r} is not a device (auto, cpu, cuda, cuda:N, mps)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"train.device={spec}: CUDA is not available on this machine (use auto or cpu)")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise ConfigError(f"train.device={spec}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"train.device={spec}: MPS is not available on this machine (use auto or cpu)")
    return device


def shard(dataset: Dataset, rank: int, world_size: int) -> Dataset:
    """Contiguous block ``rank`` of ``world_size`` (no padding): the blocks in rank order are the dataset."""
    n = len(dataset)
    return Subset(dataset, range(rank * n // world_size, (rank + 1) * n // world_size))
