"""On-disk cache of frozen image-tower features, keyed by content.

Models whose image tower is frozen (zero-shot, linear probe, the CoOp family, HP-DVAL stage 2, TRM-ML)
see the same image features every epoch, so they are computed once and read back. The key hashes
(1) the frozen tower's weights themselves (whatever file or seed they came from), (2) the dataset (image
paths with their sizes and modification times, in order), (3) the transform's description and (4) the
view name. Any change to one of them gives a new cache entry; nothing is ever overwritten in place.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from cimlic.data.dataset import MultiLabelDataset
from cimlic.io import clean_stale_temps, ensure_dir, save_safetensors, write_json

logger = logging.getLogger(__name__)

FeatureFn = Callable[[torch.Tensor], dict[str, torch.Tensor]]


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a state dict's tensors (in name order)."""
    h = hashlib.sha256()
    for name, t in sorted(state.items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def weights_digest(module: nn.Module) -> str:
    """sha256 over the names, shapes, dtypes and bytes of a module's parameters and buffers."""
    return state_digest(module.state_dict())


def parts_digest(parts: Mapping[str, nn.Module]) -> str:
    """One digest of several modules: ``clip``'s own names, the others' under ``<name>.`` (as if held by CLIP)."""
    state: dict[str, torch.Tensor] = {}
    for name, module in parts.items():
        prefix = "" if name == "clip" else f"{name}."
        state.update({prefix + k: v for k, v in module.state_dict().items()})
    return state_digest(state)


def dataset_digest(dataset: MultiLabelDataset) -> str:
    """sha256 over the dataset's image paths, sizes and modification times, in order."""
    h = hashlib.sha256()
    for i in range(len(dataset)):
        path = dataset.image_path(i)
        try:
            st = path.stat()
            h.update(f"{path}|{st.st_size}|{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{path}|missing\n".encode())
    return h.hexdigest()


def cache_key(tower_digest: str, dataset: MultiLabelDataset, view: str = "eval") -> tuple[str, dict]:
    """(hex key, the parts it was made from) for one (tower, dataset, transform, view)."""
    parts = {
        "tower": tower_digest,
        "dataset": dataset_digest(dataset),
        "num_images": len(dataset),
        "transform": repr(dataset.transform),
        "view": view,
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]
    return key, parts


@torch.no_grad()
def compute_features(
    fn: FeatureFn, dataset: Dataset, batch_size: int = 64, num_workers: int = 0, device: str = "cpu"
) -> dict[str, torch.Tensor]:
    """Run ``fn`` (images (B, 3, H, W) → {"global": (B, D), "local": (B, N, D)}) over a dataset, in order.

    The features keep the tower's dtype (float16 for a float16 tower: half the bytes, and what the tower gives)."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
    chunks: dict[str, list[torch.Tensor]] = {}
    for batch in tqdm(loader, desc="image features", unit="batch", leave=False):
        for name, value in fn(batch["image"].to(device)).items():
            chunks.setdefault(name, []).append(value.detach().cpu())
    return {name: torch.cat(values) for name, values in chunks.items()}


def load_or_compute(
    fn: FeatureFn,
    tower: nn.Module,
    dataset: MultiLabelDataset,
    cache_dir: str | os.PathLike,
    view: str = "eval",
    batch_size: int = 64,
    num_workers: int = 0,
    device: str = "cpu",
    required: tuple[str, ...] = ("global",),
) -> dict[str, torch.Tensor]:
    """Features of every image of ``dataset``: read from the cache, or computed once and stored.

    Args:
        fn: the frozen feature function (e.g. ``model.image_features``).
        tower: the frozen module ``fn`` depends on (its weights are part of the key).
        dataset: images in a fixed order (the cache rows follow it).
        cache_dir: cache folder (created if missing).
        view: name of the augmentation view ("eval" = the deterministic transform).
        required: feature names the caller needs; an entry without one of them is recomputed.

    Returns:
        {"global": (N, D), "local": (N, T, D) if ``fn`` returns it} on the CPU, in the tower's dtype. A cache hit
        is memory-mapped (safetensors): rows are read from the file as batches touch them, not loaded up front.
    """
    cache_dir = Path(cache_dir)
    ensure_dir(cache_dir)
    clean_stale_temps(cache_dir)  # of interrupted writes (a live process's temporary files are left alone)
    key, parts = cache_key(weights_digest(tower), dataset, view)
    path = cache_dir / f"{key}.safetensors"
    if path.is_file():
        try:
            feats = load_file(str(path))
            if set(required) - set(feats):
                logger.info("%s lacks %s features; recomputing", path.name, sorted(set(required) - set(feats)))
            elif all(v.shape[0] == len(dataset) for v in feats.values()):
                logger.info("feature cache hit %s (%d images)", path.name, len(dataset))
                return feats
            logger.warning("%s: cached row count does not match the dataset; recomputing", path)
        except (SafetensorError, OSError, RuntimeError) as err:
            logger.warning("%s: unreadable cache entry (%s); recomputing", path, err)
    logger.info("computing image features for %d images (cache %s)", len(dataset), path.name)
    feats = compute_features(fn, dataset, batch_size, num_workers, device)
    save_safetensors(path, feats)
    shapes = {k: list(v.shape) for k, v in feats.items()}
    write_json(cache_dir / f"{key}.json", parts | {"shapes": shapes})
    return feats


class CachedFeatureDataset(Dataset):
    """Items ``{"feat_global": (D,), ["feat_local": (T, D)], "target": (C,), "index": int}`` from cached features."""

    def __init__(self, features: dict[str, torch.Tensor], targets: torch.Tensor) -> None:
        n = targets.shape[0]
        for name, value in features.items():
            if value.shape[0] != n:
                raise ValueError(f"cached {name!r} has {value.shape[0]} rows for {n} images")
        self.features = {f"feat_{k}": v for k, v in features.items()}
        self.targets = targets

    def __len__(self) -> int:
        return self.targets.shape[0]

    def __getitem__(self, index: int) -> dict:
        item = {name: value[index] for name, value in self.features.items()}
        return item | {"target": self.targets[index], "index": index}
