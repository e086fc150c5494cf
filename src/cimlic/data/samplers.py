"""Training samplers for imbalanced multi-label data (METHODS §4): class-aware and group sampling.

Both samplers yield dataset indices, are seeded by (run seed, epoch) through ``set_epoch`` (never the
global RNG) and are DDP-aware: every rank generates the same global sequence and keeps the positions
``rank::world_size`` of it. Only known positives (``targets == 1``) count as members of a class; a
class without any positive image is skipped with a warning.

The global sequence of an epoch is prefix-stable: asking for more draws appends to it and never changes
the draws already made, which is what makes padding the epoch to a multiple of ``world_size`` harmless.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import Sampler

from cimlic.config import SamplerConfig
from cimlic.data.labels import GROUPS, class_groups
from cimlic.distributed import world
from cimlic.errors import ConfigError

logger = logging.getLogger(__name__)

_SEED_MASK = 2**64 - 1  # SeedSequence takes non-negative integers only


def _as_targets(targets: np.ndarray | torch.Tensor | Sequence[Sequence[int]]) -> np.ndarray:
    """(N, C) int8 target matrix, or a ValueError saying what is wrong with it."""
    if isinstance(targets, torch.Tensor):
        targets = targets.detach().cpu().numpy()
    arr = np.asarray(targets)
    if arr.ndim != 2:
        raise ConfigError(f"sampler targets must be a 2-D (N, C) matrix, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ConfigError(f"sampler targets are empty (shape {arr.shape}): nothing to sample from")
    if not (arr == 1).any():
        raise ConfigError("sampler targets contain no positive label (no entry == 1): no class to sample from")
    return arr.astype(np.int8, copy=False)


def _resolve_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    """(rank, world_size): explicit values, else torch.distributed's when initialised, else (0, 1)."""
    current_rank, current_size = world()
    world_size = current_size if world_size is None else world_size
    rank = current_rank if rank is None else rank
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    return int(rank), int(world_size)


def quantile_groups(counts: np.ndarray | Sequence[int], num_groups: int) -> np.ndarray:
    """Split classes into ``num_groups`` quantile groups of their counts (equal sizes by count rank).

    Args:
        counts: (K,) class counts.
        num_groups: number of groups G >= 1.

    Returns:
        (K,) int group ids; 0 holds the most frequent classes, G - 1 the rarest. Ties in count are broken
        by class index; when G > K the last groups are empty.
    """
    if num_groups < 1:
        raise ConfigError(f"num_groups must be >= 1, got {num_groups}")
    counts = np.asarray(counts)
    order = np.argsort(-counts, kind="stable")  # most frequent first
    out = np.empty(len(counts), dtype=np.int64)
    for g, members in enumerate(np.array_split(order, num_groups)):
        out[members] = g
    return out


class _DrawSampler(Sampler[int]):
    """Shared machinery: class members, epoch seeding, DDP sharding. Subclasses implement ``_draw``."""

    def __init__(
        self,
        targets,
        num_samples: int | None,
        default_len: Callable[[], int],
        seed: int,
        rank: int | None,
        world_size: int | None,
    ) -> None:
        super().__init__()
        self.targets = _as_targets(targets)
        self.counts = (self.targets == 1).sum(axis=0).astype(np.int64)  # (C,) known positives n_c
        empty = np.flatnonzero(self.counts == 0)
        if empty.size:
            logger.warning(
                "%s: %d class(es) without any positive image are never drawn: %s",
                type(self).__name__,
                empty.size,
                empty.tolist(),
            )
        self.classes = np.flatnonzero(self.counts > 0)  # (K,) classes that can be drawn
        self.members = [np.flatnonzero(self.targets[:, c] == 1) for c in range(self.targets.shape[1])]
        if num_samples is not None and num_samples < 0:
            raise ConfigError(f"num_samples must be >= 0 (0 or None = default length), got {num_samples}")
        self.num_samples = int(num_samples) if num_samples else max(1, int(default_len()))
        self.rank, self.world_size = _resolve_world(rank, world_size)
        self.total_size = math.ceil(self.num_samples / self.world_size) * self.world_size
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Use the sequence of ``epoch`` from now on (call it before each epoch, as with DistributedSampler)."""
        self.epoch = int(epoch)

    def _rngs(self, n: int) -> list[np.random.Generator]:
        """``n`` independent generators derived from (seed, epoch)."""
        root = np.random.SeedSequence([self.seed & _SEED_MASK, self.epoch & _SEED_MASK])
        return [np.random.default_rng(s) for s in root.spawn(n)]

    def _draw(self, total: int) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def draw(self) -> tuple[np.ndarray, np.ndarray]:
        """The global sequence of this epoch (all ranks, padded to a multiple of ``world_size``).

        Returns:
            ``(indices, classes)``: (total_size,) dataset indices and, for each, the class it was drawn for.
        """
        return self._draw(self.total_size)

    def __iter__(self) -> Iterator[int]:
        indices, _ = self.draw()
        return iter(indices[self.rank :: self.world_size].tolist())

    def __len__(self) -> int:
        """Number of indices this rank yields per epoch."""
        return self.total_size // self.world_size


class ClassAwareSampler(_DrawSampler):
    """Class-aware sampling (METHODS §4; DB loss, OLTR), seeded by the run seed and the epoch.

    Cycles through a shuffled list of the classes (reshuffled after each pass); for each visited class it
    takes ``per_class`` images from that class's own shuffled cyclic list (reshuffled when exhausted).

    Args:
        targets: (N, C) targets in {1, 0, -1}; only entries == 1 make an image a member of a class.
        per_class: images taken per visited class.
        num_samples: global draws per epoch; None or 0 = max_c n_c * C / 4.
        seed: run seed; the epoch's sequence is a function of (seed, epoch).
        rank: this process's rank (default: torch.distributed's, else 0).
        world_size: number of processes (default: torch.distributed's, else 1).
    """

    def __init__(
        self,
        targets: np.ndarray | torch.Tensor,
        per_class: int = 3,
        num_samples: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        if per_class < 1:
            raise ConfigError(f"per_class must be >= 1, got {per_class}")
        self.per_class = int(per_class)
        super().__init__(targets, num_samples, self._default_len, seed, rank, world_size)
        logger.info(
            "ClassAwareSampler: %d classes, %d images per visit, %d draws per epoch over %d rank(s)",
            len(self.classes),
            self.per_class,
            self.num_samples,
            self.world_size,
        )

    def _default_len(self) -> int:
        return int(self.counts.max()) * self.targets.shape[1] // 4  # max_c n_c * C / 4

    def _draw(self, total: int) -> tuple[np.ndarray, np.ndarray]:
        K = len(self.classes)
        rngs = self._rngs(K + 1)  # one for the class cycle, one per class for its image cycle
        visits = math.ceil(total / self.per_class)
        passes = np.concatenate([rngs[0].permutation(self.classes) for _ in range(math.ceil(visits / K))])
        drawn = np.repeat(passes[:visits], self.per_class)[:total]  # (total,) class of each draw
        indices = np.empty(total, dtype=np.int64)
        for k, c in enumerate(self.classes):
            where = np.flatnonzero(drawn == c)
            pool = self.members[c]
            cycle = [rngs[k + 1].permutation(pool) for _ in range(math.ceil(where.size / pool.size))]
            indices[where] = np.concatenate(cycle)[: where.size] if cycle else []
        return indices, drawn


class GroupSampler(_DrawSampler):
    """Group sampling (METHODS §4, GE/FD) **[our design]**: balance over groups of classes by frequency.

    Classes are partitioned into groups by training count: head / medium / tail (``class_groups`` with
    ``head``/``tail`` thresholds) by default, G quantile groups when ``num_groups`` = G > 0, or the given
    ``groups``. Each draw picks a non-empty group uniformly, then a class of it uniformly, then an image
    containing that class uniformly (with replacement).

    Args:
        targets: (N, C) targets in {1, 0, -1}; only entries == 1 make an image a member of a class.
        groups: optional (C,) group label of each class (overrides ``num_groups``).
        num_groups: 0 = head/medium/tail, G > 0 = G quantile groups of the class counts.
        num_samples: global draws per epoch; None or 0 = N (the number of images).
        seed: run seed; the epoch's sequence is a function of (seed, epoch).
        rank: this process's rank (default: torch.distributed's, else 0).
        world_size: number of processes (default: torch.distributed's, else 1).
        head: smallest count of a head class (default grouping only).
        tail: counts below this are tail classes (default grouping only).
    """

    def __init__(
        self,
        targets: np.ndarray | torch.Tensor,
        groups: Sequence | np.ndarray | None = None,
        num_groups: int = 0,
        num_samples: int | None = None,
        seed: int = 0,
        rank: int | None = None,
        world_size: int | None = None,
        head: int = 100,
        tail: int = 20,
    ) -> None:
        if num_groups < 0:
            raise ConfigError(f"num_groups must be >= 0 (0 = head/medium/tail), got {num_groups}")
        super().__init__(targets, num_samples, lambda: self.targets.shape[0], seed, rank, world_size)
        labels = self._group_labels(groups, num_groups, head, tail)
        kept = labels[self.classes]  # (K,) group of each drawable class
        names = np.unique(kept).tolist()  # non-empty groups only
        if set(names) <= set(GROUPS):
            names.sort(key=GROUPS.index)  # head, medium, tail
        self.group_names = [str(g) for g in names]
        self.group_classes = [self.classes[kept == g] for g in names]  # class indices of each group
        if groups is None and num_groups > len(names):
            logger.warning("GroupSampler: only %d of %d quantile groups hold a class", len(names), num_groups)
        logger.info(
            "GroupSampler: groups %s, %d draws per epoch over %d rank(s)",
            dict(zip(self.group_names, (len(m) for m in self.group_classes), strict=True)),
            self.num_samples,
            self.world_size,
        )

    def _group_labels(self, groups, num_groups: int, head: int, tail: int) -> np.ndarray:
        """(C,) group label of each class (only the entries of classes with positives are used)."""
        C = self.targets.shape[1]
        if groups is not None:
            labels = np.asarray(groups)
            if labels.shape != (C,):
                raise ValueError(f"groups must give one label per class ({C}), got shape {labels.shape}")
            return labels
        if num_groups > 0:
            labels = np.full(C, -1, dtype=np.int64)
            labels[self.classes] = quantile_groups(self.counts[self.classes], num_groups)
            return labels
        return class_groups(self.counts, head=head, tail=tail)

    def _draw(self, total: int) -> tuple[np.ndarray, np.ndarray]:
        # Uniform floats -> indices (floor(u * n)) keep every stream prefix-stable in ``total``.
        r_group, r_class, r_image = (r.random(total) for r in self._rngs(3))
        group = (r_group * len(self.group_classes)).astype(np.int64)  # (total,)
        drawn = np.empty(total, dtype=np.int64)
        for g, members in enumerate(self.group_classes):
            where = group == g
            drawn[where] = members[(r_class[where] * len(members)).astype(np.int64)]
        indices = np.empty(total, dtype=np.int64)
        for c in self.classes:
            where = drawn == c
            pool = self.members[c]
            indices[where] = pool[(r_image[where] * pool.size).astype(np.int64)]
        return indices, drawn


def _build_random(cfg: SamplerConfig, targets, seed: int, rank, world_size, head: int, tail: int) -> None:
    return None  # the DataLoader (or a DistributedSampler) shuffles


def _build_class_aware(cfg: SamplerConfig, targets, seed: int, rank, world_size, head: int, tail: int) -> Sampler:
    return ClassAwareSampler(targets, cfg.per_class, cfg.num_samples, seed, rank, world_size)


def _build_group(cfg: SamplerConfig, targets, seed: int, rank, world_size, head: int, tail: int) -> Sampler:
    return GroupSampler(targets, None, cfg.num_groups, cfg.num_samples, seed, rank, world_size, head, tail)


_SAMPLERS: dict[str, Callable[..., Sampler | None]] = {
    "random": _build_random,
    "class_aware": _build_class_aware,
    "group": _build_group,
}


def list_samplers() -> list[str]:
    """Names accepted by ``build_sampler`` (``SamplerConfig.name``)."""
    return list(_SAMPLERS)


def build_sampler(
    cfg: SamplerConfig,
    targets: np.ndarray | torch.Tensor,
    seed: int,
    *,
    rank: int | None = None,
    world_size: int | None = None,
    head: int = 100,
    tail: int = 20,
) -> Sampler | None:
    """The training sampler named by ``cfg.name``.

    Args:
        cfg: sampler configuration.
        targets: (N, C) training targets in {1, 0, -1}.
        seed: run seed (combined with the epoch set through ``set_epoch``).
        rank: this process's rank (default: torch.distributed's, else 0).
        world_size: number of processes (default: torch.distributed's, else 1).
        head: head threshold of the default head/medium/tail groups (``DataConfig.head_threshold``).
        tail: tail threshold of the default groups (``DataConfig.tail_threshold``).

    Returns:
        The sampler, or None for 'random' (let the DataLoader, or a DistributedSampler, shuffle).

    Raises:
        ValueError: unknown name (the message lists the valid ones) or unusable targets.
    """
    if cfg.name not in _SAMPLERS:
        raise ConfigError(f"unknown sampler {cfg.name!r}; valid samplers: {list_samplers()}")
    return _SAMPLERS[cfg.name](cfg, targets, seed, rank, world_size, head, tail)
