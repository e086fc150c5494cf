"""``cimlic bench cache``: one training epoch with the frozen image tower recomputed vs read from the cache."""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from cimlic.apps.runner import build_model_for, image_dataset, load_splits, model_transform
from cimlic.cache import CachedFeatureDataset, load_or_compute
from cimlic.config import Config, ConfigError
from cimlic.losses import build_loss

logger = logging.getLogger(__name__)


def _epoch(model: torch.nn.Module, loss_fn: torch.nn.Module, dataset: Dataset, batch_size: int) -> tuple[float, int]:
    """Seconds and steps of one training epoch (forward, loss, backward, AdamW step) over ``dataset``."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4) if params else None
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
    steps, tic = 0, time.perf_counter()
    for batch in loader:
        out = model(batch)
        loss = loss_fn(out["logits"].float(), batch["target"], **out.get("loss_inputs", {}))
        if opt is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
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
    model.train()
    uncached_s, steps = _epoch(model, loss_fn, images, cfg.train.batch_size)
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        feats = load_or_compute(model.image_features, model.feature_tower, images, Path(tmp),
                                required=model.feature_keys, batch_size=cfg.train.batch_size)  # fmt: skip
        build_s = time.perf_counter() - tic
    cached_s, _ = _epoch(model, loss_fn, CachedFeatureDataset(feats, images.targets), cfg.train.batch_size)
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
    model.train()
    seconds, steps = _epoch(model, loss_fn, images, cfg.train.batch_size)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {
        "model": cfg.model.name, "clip_arch": cfg.model.clip_arch, "images": len(images), "steps": steps,
        "batch_size": cfg.train.batch_size, "threads": torch.get_num_threads(), "trainable_params": trainable,
        "epoch_s": round(seconds, 3), "s_per_step": round(seconds / max(1, steps), 4),
    }  # fmt: skip
