"""``cimlic bench cache|train``: one training epoch of the Trainer's own step, with the frozen image tower (or a
trainable image side's frozen teacher) recomputed vs read from the cache, or on images (a trainable image tower)."""

from __future__ import annotations

import gc
import logging
import tempfile
import threading
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from cimlic.apps.runner import build_model_for, image_dataset, load_splits, model_transform
from cimlic.cache import CachedFeatureDataset, load_or_compute
from cimlic.config import Config, ConfigError
from cimlic.data.dataset import ExtraInputsDataset
from cimlic.engine import Trainer
from cimlic.losses import build_loss
from cimlic.models import Method

logger = logging.getLogger(__name__)


def _epoch(cfg: Config, model: Method, loss_fn: torch.nn.Module, dataset: Dataset) -> tuple[float, int]:
    """Seconds and steps of one training epoch of the Trainer's own step (``Trainer.train_step``) over ``dataset``,
    after one untimed warm-up step."""
    with tempfile.TemporaryDirectory() as run_dir:  # the Trainer writes nothing before fit(); a folder it may own
        trainer = Trainer(cfg, model, loss_fn, dataset, dataset, dataset, [str(i) for i in range(model.num_classes)],
                          None, run_dir)  # fmt: skip
        if trainer.optimizer is None:
            raise ConfigError(f"model {cfg.model.name!r} has nothing to train: no training step to time")
        trainer.start_epoch(0)
        trainer.train_step(next(iter(trainer.train_loader)))  # warm-up (allocations, first-call costs): not timed
        steps, tic = 0, time.perf_counter()
        for batch in trainer.train_loader:
            trainer.train_step(batch)
            steps += 1
        return time.perf_counter() - tic, steps


def _cached_part(cfg: Config, model: Method) -> tuple:
    """(feature function, the frozen module keying it, view, feature names) of what the cache holds for ``model``:
    its frozen image tower's features, or (a trainable image side) its teacher's."""
    if model.feature_tower is not None:
        return model.image_features, model.feature_tower, "eval", model.feature_keys
    if model.teacher_tower is not None:
        return model.teacher_features, model.teacher_tower, "teacher", ("teacher",)
    raise ConfigError(f"model {cfg.model.name!r} has no frozen image tower or teacher: nothing to cache")


def bench_cache(cfg: Config, max_images: int = 0) -> dict:
    """Time one epoch uncached (images through the frozen tower), the cache build, and one cached epoch.

    For a method whose image side trains but which has a frozen teacher (HP-DVAL stage 1's L_kd), the uncached
    epoch runs the teacher at every step and the cached one reads its features (``feat_teacher``) beside the images.

    Args:
        cfg: an experiment config whose model has a frozen image tower or a teacher.
        max_images: use only the first N training images (0 = all).

    Returns:
        {"images", "steps", "cached", "uncached_s", "cache_build_s", "cached_s", "ratio", "uncached_s_per_step", ...}.
    """
    torch.set_num_threads(max(1, torch.get_num_threads()))
    splits = load_splits(cfg)
    train = splits.train.subset(range(min(max_images, len(splits.train)))) if max_images else splits.train
    model = build_model_for(cfg, splits.classnames)
    fn, tower, view, keys = _cached_part(cfg, model)
    images = image_dataset(cfg, train, "train", model_transform(model, train=False))
    loss_fn = build_loss(cfg.loss, torch.as_tensor(train.class_counts()), len(train))
    uncached_s, steps = _epoch(cfg, model, loss_fn, images)
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        feats = load_or_compute(fn, tower, images, Path(tmp), view, required=keys, batch_size=cfg.train.batch_size)
        build_s = time.perf_counter() - tic
    cached = (
        ExtraInputsDataset(images, {"feat_teacher": feats["teacher"]})
        if view == "teacher"
        else CachedFeatureDataset(feats, images.targets)
    )
    cached_s, _ = _epoch(cfg, model, loss_fn, cached)
    result = {
        "model": cfg.model.name, "clip_arch": cfg.model.clip_arch, "images": len(images), "steps": steps,
        "batch_size": cfg.train.batch_size, "threads": torch.get_num_threads(), "cached": view,
        "uncached_s": round(uncached_s, 3), "cache_build_s": round(build_s, 3), "cached_s": round(cached_s, 3),
        "uncached_s_per_step": round(uncached_s / max(1, steps), 4),
        "cached_s_per_step": round(cached_s / max(1, steps), 4),
        "ratio": round(uncached_s / max(cached_s, 1e-9), 2),
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


def bench_text(arch: str, classnames: list[str], n_ctx: int = 16, learners: int = 1, repeats: int = 5) -> dict:
    """Forward + backward of ``learners`` class-shared prompt learners through a random-weight text tower, the
    plain pass vs the shared-prefix pass (``model.text_pass``), interleaved; median seconds of ``repeats`` each.

    Returns:
        {"arch", "classes", "n_ctx", "learners", "plain_s", "shared_prefix_s", "ratio", "max_rel_diff_features",
        "max_rel_diff_grad", "fits"}.
    """
    import statistics

    from cimlic.models.clip import load_clip
    from cimlic.models.prompts import PromptLearner, encode_prompts

    torch.manual_seed(0)
    clip = load_clip(arch, random_init=True)
    prompts = [PromptLearner(clip, classnames, n_ctx) for _ in range(learners)]
    weights = [torch.randn(len(classnames), clip.embed_dim) for _ in prompts]  # a fixed linear loss on the features
    times: dict[str, list[float]] = {"plain": [], "shared_prefix": []}
    outputs: dict[str, list[torch.Tensor]] = {}
    modes = list(times) if clip.shared_prefix_fits else ["plain"]
    for _ in range(1 + repeats):  # the first round warms up and is not timed
        for mode in modes:
            clip.text_pass = mode
            for p in prompts:
                p.ctx.grad = None
            tic = time.perf_counter()
            feats = encode_prompts(clip, *prompts)
            sum((f * w).sum() for f, w in zip(feats, weights, strict=True)).backward()
            times[mode].append(time.perf_counter() - tic)
            outputs[mode] = [f.detach() for f in feats] + [p.ctx.grad.clone() for p in prompts]
    median = {mode: statistics.median(t[1:]) for mode, t in times.items() if t}
    result = {"arch": arch, "classes": len(classnames), "n_ctx": n_ctx, "learners": learners,
              "threads": torch.get_num_threads(), "fits": clip.shared_prefix_fits,
              "plain_s": round(median["plain"], 4)}  # fmt: skip
    if clip.shared_prefix_fits:

        def rel(a: torch.Tensor, b: torch.Tensor) -> float:
            return float((a - b).abs().max() / a.abs().max().clamp_min(1e-30))

        pairs = list(zip(outputs["plain"], outputs["shared_prefix"], strict=True))
        result |= {
            "shared_prefix_s": round(median["shared_prefix"], 4),
            "ratio": round(median["plain"] / median["shared_prefix"], 2),
            "max_rel_diff_features": max(rel(a, b) for a, b in pairs[:learners]),
            "max_rel_diff_grad": max(rel(a, b) for a, b in pairs[learners:]),
        }
    return result


class PeakMemory:
    """Peak resident memory above the start, sampled from /proc/self/status every 10 ms while in the block (MiB).

    ``rss``: all resident pages (a memory-mapped file's pages count once touched, and the system can drop them);
    ``anon``: anonymous memory only (what the process itself holds: tensors built in RAM); ``total``: the
    process's whole resident memory at its peak (not a difference).
    """

    def __init__(self) -> None:
        self.rss = self.anon = self.total = 0.0
        self._stop = threading.Event()

    @staticmethod
    def now() -> dict[str, float]:
        values = {}
        with open("/proc/self/status") as status:
            for line in status:
                key, _, rest = line.partition(":")
                if key in ("VmRSS", "RssAnon"):
                    values[key] = int(rest.split()[0]) / 1024.0  # kB -> MiB
        return values

    def _watch(self, start: dict[str, float]) -> None:
        while not self._stop.wait(0.01):
            self._sample(start)

    def _sample(self, start: dict[str, float]) -> None:
        values = self.now()
        self.rss = max(self.rss, values["VmRSS"] - start["VmRSS"])
        self.total = max(self.total, values["VmRSS"])
        self.anon = max(self.anon, values["RssAnon"] - start["RssAnon"])

    def __enter__(self) -> PeakMemory:
        gc.collect()
        self._start = self.now()
        self._thread = threading.Thread(target=self._watch, args=(self._start,), daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._sample(self._start)
        self._stop.set()
        self._thread.join()


def bench_memory(cfg: Config, max_images: int = 0) -> dict:
    """Size of a feature-cache entry and the memory it takes to build it and to read one epoch back.

    The entry is built for the training split's first ``max_images`` images (0 = all), as ``train`` builds it, in a
    temporary folder; then read back as a training run reads it (a cache hit, one pass of a DataLoader over it).
    Linux only (peak memory from /proc/self/status).

    Returns:
        {"images", "features" {name: [shape per image], dtype}, "entry_mib", "mib_per_image", "build_peak_mib",
        "build_peak_anon_mib", "read_peak_mib", "read_peak_anon_mib", "build_s"}.
    """
    if not Path("/proc/self/status").is_file():
        raise ConfigError("cimlic bench memory reads /proc/self/status (Linux)")
    splits = load_splits(cfg)
    train = splits.train.subset(range(min(max_images, len(splits.train)))) if max_images else splits.train
    model = build_model_for(cfg, splits.classnames)
    fn, tower, view, keys = _cached_part(cfg, model)
    images = image_dataset(cfg, train, "train", model_transform(model, train=False))
    batch = max(cfg.train.batch_size, 64)
    with tempfile.TemporaryDirectory() as tmp:
        tic = time.perf_counter()
        with PeakMemory() as build:
            feats = load_or_compute(fn, tower, images, Path(tmp), view, required=keys, batch_size=batch)
        build_s = time.perf_counter() - tic
        shapes = {k: {"per_image": list(v.shape[1:]), "dtype": str(v.dtype).removeprefix("torch.")}
                  for k, v in feats.items()}  # fmt: skip
        del feats
        entry = sum(p.stat().st_size for p in Path(tmp).glob("*.safetensors"))
        with PeakMemory() as read:
            feats = load_or_compute(fn, tower, images, Path(tmp), view, required=keys, batch_size=batch)
            loader = DataLoader(CachedFeatureDataset(feats, images.targets), batch_size=cfg.train.batch_size,
                                shuffle=True, num_workers=0)  # fmt: skip
            for item in loader:
                item["target"].sum()
        del feats, loader
    mib = entry / 2**20
    return {
        "model": cfg.model.name, "images": len(images), "features": shapes, "entry_mib": round(mib, 1),
        "mib_per_image": round(mib / max(1, len(images)), 4), "build_s": round(build_s, 1),
        "build_peak_mib": round(build.rss, 1), "build_peak_anon_mib": round(build.anon, 1),
        "read_peak_mib": round(read.rss, 1), "read_peak_anon_mib": round(read.anon, 1),
    }  # fmt: skip
