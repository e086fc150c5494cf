"""``cimlic bench cache|train``: one training epoch of the Trainer's own step, with the frozen image tower recomputed
vs read from the cache, or on images (a trainable image tower)."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import Dataset

from cimlic.apps.runner import build_model_for, image_dataset, load_splits, model_transform
from cimlic.cache import CachedFeatureDataset, load_or_compute
from cimlic.config import Config, ConfigError
from cimlic.engine import Trainer
from cimlic.losses import build_loss
from cimlic.models import Method

logger = logging.getLogger(__name__)


def _epoch(cfg: Config, model: Method, loss_fn: torch.nn.Module, dataset: Dataset) -> tuple[float, int]:
    """Seconds and steps of one training epoch of the Trainer's own step (``Trainer.train_step``) over ``dataset``."""
    with tempfile.TemporaryDirectory() as run_dir:  # the Trainer writes nothing before fit(); a folder it may own
        trainer = Trainer(cfg, model, loss_fn, dataset, dataset, dataset, [str(i) for i in range(model.num_classes)],
                          None, run_dir)  # fmt: skip
        if trainer.optimizer is None:
            raise ConfigError(f"model {cfg.model.name!r} has nothing to train: no training step to time")
        trainer.start_epoch(0)
        steps, tic = 0, time.perf_counter()
        for batch in trainer.train_loader:
            trainer.train_step(batch)
            steps += 1
        return time.perf_counter() - tic, steps


def bench_cache(cfg: Config, max_images: int = 0) -> dict:
    """Time one epoch uncached (images through the frozen tower), the cache build, and one cached epoch.

    Args:
        cfg: an experiment config whose model has a frozen image tower.
        max_images: use only the first N training images (0 = all).

    Returns:
        {"images", "steps", "uncached_s", "cache_build_s", "cached_s", "ratio", "uncached_s_per_step", ...}.
    """
    torch.set_num_threads(max(1, torch.get_num_threads()))
    splits = load_splits(cfg)
    train = splits.train.subset(range(min(max_images, len(splits.train)))) if max_images else splits.train
    model = build_model_for(cfg, splits.classnames)
    if model.feature_tower is None:
        raise ConfigError(f"model {cfg.model.name!r} has no frozen image tower: nothing to cache")
    images = image_dataset(cfg, train, "train", model_transform(model, train=False))
    loss_fn = build_loss(cfg.loss, torch.as_tensor(train.class_counts()), len(train))
    uncached_s, steps = _epoch(cfg, model, loss_fn, images)
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        feats = load_or_compute(model.image_features, model.feature_tower, images, Path(tmp),
                                required=model.feature_keys, batch_size=cfg.train.batch_size)  # fmt: skip
        build_s = time.perf_counter() - tic
    cached_s, _ = _epoch(cfg, model, loss_fn, CachedFeatureDataset(feats, images.targets))
    result = {
        "model": cfg.model.name, "clip_arch": cfg.model.clip_arch, "images": len(images), "steps": steps,
        "batch_size": cfg.train.batch_size, "threads": torch.get_num_threads(),
        "uncached_s": round(uncached_s, 3), "cache_build_s": round(build_s, 3), "cached_s": round(cached_s, 3),
        "uncached_s_per_step": round(uncached_s / max(1, steps), 4),
        "cached_s_per_step": round(cached_s / max(1, steps), 4),
        "ratio": round(uncached_s / max(cached_s, 1e-9), 1),
    }  # fmt: skip
    return result


def bench_train(cfg: Config, max_images: int = 0) -> dict:
    """Time one training epoch on images (the trainable image tower included, e.g. HP-DVAL stage 1)."""
    splits = load_splits(cfg)
    train = splits.train.subset(range(min(max_images, len(splits.train)))) if max_images else splits.train
    model = build_model_for(cfg, splits.classnames)
    images = image_dataset(cfg, train, "train", model_transform(model, train=False))
    loss_fn = build_loss(cfg.loss, torch.as_tensor(train.class_counts()), len(train))
    seconds, steps = _epoch(cfg, model, loss_fn, images)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "model": cfg.model.name, "clip_arch": cfg.model.clip_arch, "images": len(images), "steps": steps,
        "batch_size": cfg.train.batch_size, "threads": torch.get_num_threads(), "trainable_params": trainable,
        "epoch_s": round(seconds, 3), "s_per_step": round(seconds / max(1, steps), 4),
    }  # fmt: skip
