"""From a config to a run: data splits, datasets (optionally over cached features), model, loss, Trainer.

Used by ``cimlic train | eval | predict``; importable for notebooks and scripts.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cimlic import checkpoint as ckpt
from cimlic.cache import CachedFeatureDataset, load_or_compute, weights_digest
from cimlic.config import Config, ConfigError, load_config, save_config
from cimlic.data.dataset import MultiLabelDataset, default_transform
from cimlic.data.labels import LabelSet, read_classes, read_label_list
from cimlic.io import read_json, write_json
from cimlic.rundir import RunDirError

logger = logging.getLogger(__name__)


@dataclass
class Splits:
    """Label sets of a run; ``group_counts`` = class counts of the full training list (defines the groups)."""

    train: LabelSet
    val: LabelSet | None
    test: LabelSet | None
    classnames: list[str]
    group_counts: np.ndarray
    train_true: LabelSet | None = None  # with data.partial_mask: the unmasked labels of ``train`` (logging only)


def carve_validation(labels: LabelSet, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Hold out about ``fraction`` of the training images for model selection. **[our design]**

    Images are visited in a seeded random order and moved to validation while the validation set is
    smaller than ``fraction``·N and every positive class of the image keeps at most max(1, ⌊fraction·n_c⌋)
    validation images and at least one training image; so tail classes with a handful of images keep
    almost all of them for training.

    Returns:
        (training rows, validation rows), each in ascending order.
    """
    counts = labels.class_counts()
    cap = np.maximum(1, np.floor(fraction * counts)).astype(np.int64)
    taken = np.zeros_like(counts)
    target = round(fraction * len(labels))
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    val: list[int] = []
    for i in order:
        if len(val) >= target:
            break
        pos = labels.targets[i] == 1
        if (taken[pos] < cap[pos]).all() and (counts[pos] - taken[pos] > 1).all():
            val.append(i)
            taken[pos] += 1
    chosen = set(val)
    return [i for i in range(len(labels)) if i not in chosen], sorted(val)


def load_splits(cfg: Config) -> Splits:
    """Read the class list and the train/val/test lists of ``cfg.data`` (partial mask applied to training)."""
    d = cfg.data
    if not d.classes or not d.train_labels:
        raise ConfigError("data.classes and data.train_labels must be set (see configs/ and `cimlic prepare`)")
    classnames = read_classes(d.classes)
    full = read_label_list(d.train_labels, classnames)
    true = None
    if d.partial_mask:
        masked = read_label_list(d.partial_mask, classnames)
        if masked.ids != full.ids:
            raise ConfigError(
                f"{d.partial_mask}: ids differ from {d.train_labels} (a partial list must keep its order)"
            )
        true, full = full, LabelSet(full.ids, masked.targets, classnames, source=str(d.partial_mask))
    group_counts = full.class_counts()
    if d.val_labels:
        train, val = full, read_label_list(d.val_labels, classnames)
    elif d.val_fraction > 0:
        tr, va = carve_validation(full, d.val_fraction, cfg.seed)
        train, val = full.subset(tr), full.subset(va)
        true = true.subset(tr) if true is not None else None
        logger.info("validation split carved from training: %d train / %d val images", len(tr), len(va))
    else:
        train, val = full, None
    test = read_label_list(d.test_labels, classnames) if d.test_labels else None
    return Splits(train, val, test, classnames, group_counts, true)


def _image_root(cfg: Config, split: str) -> Path:
    d = cfg.data
    root = (d.test_image_root if split == "test" else d.train_image_root) or d.image_root
    if not root:
        raise ConfigError(f"no image folder for the {split} split: set data.image_root or data.{split}_image_root")
    return Path(root)


def image_dataset(cfg: Config, labels: LabelSet, split: str, transform) -> MultiLabelDataset:
    """A dataset over ``labels``; fails early, naming the first missing image file."""
    ds = MultiLabelDataset(
        labels, _image_root(cfg, "test" if split == "test" else "train"), cfg.data.image_pattern, transform
    )
    missing = ds.missing_images()
    if missing:
        raise FileNotFoundError(
            f"{missing[0]}: image file not found ({len(missing)} of {len(ds)} {split} images missing)"
        )
    return ds


def model_transform(model: torch.nn.Module, cfg: Config, train: bool):
    """The image transform for ``model``.

    ``model.input_spec`` ``(size, mean, std)`` when the model has one (e.g. CPRFL on an ImageNet backbone), else its
    CLIP tower's size and normalisation, else the data config's size.
    """
    spec = getattr(model, "input_spec", None)
    if spec is not None:
        size, mean, std = spec
        return default_transform(int(size), train=train, mean=tuple(mean), std=tuple(std))
    clip = getattr(model, "clip", None)
    if clip is None:
        return default_transform(cfg.data.image_size, train=train)
    return default_transform(int(clip.image_size), train=train, mean=clip.image_mean, std=clip.image_std)


@contextlib.contextmanager
def _rank_zero_first():
    """Run the body on rank 0 first, then on the other ranks (no-op without torch.distributed)."""
    dist = torch.distributed
    active = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    if active and dist.get_rank() != 0:
        dist.barrier()
    yield
    if active and dist.get_rank() == 0:
        dist.barrier()


def build_datasets(
    cfg: Config, splits: Splits, model: torch.nn.Module, device: str, which: tuple[str, ...] = ("train", "val", "test")
) -> dict[str, Dataset | None]:
    """Datasets of the ``which`` splits: cached frozen features where the model allows it, else images."""
    use_cache = bool(getattr(model, "uses_frozen_image_tower", False)) and cfg.train.cache_features
    if use_cache and cfg.train.augment:
        logger.info("train.augment is on: training images are augmented, so the training split is not cached")
    out: dict[str, Dataset | None] = {}
    for split in which:
        labels = getattr(splits, split)
        if labels is None:
            out[split] = None
            continue
        augment = split == "train" and cfg.train.augment
        ds = image_dataset(cfg, labels, split, model_transform(model, cfg, train=augment))
        if use_cache and not augment:
            tower = getattr(model, "image_tower", None) or model.clip
            need = ("global", "local") if getattr(model, "needs_local_features", False) else ("global",)
            with _rank_zero_first():  # under DDP rank 0 fills the cache, the others then read it
                feats = load_or_compute(model.image_features, tower, ds, cfg.train.cache_dir, device=device,
                                        batch_size=max(cfg.train.batch_size, 64), required=need)  # fmt: skip
            ds = CachedFeatureDataset(feats, ds.targets)
        if split == "train" and splits.train_true is not None:
            ds = TrueTargetDataset(ds, torch.as_tensor(splits.train_true.targets, dtype=torch.float32))
        out[split] = ds
    return out


class TrueTargetDataset(Dataset):
    """Adds ``"true_target": (C,)``, the hidden unmasked labels, to every item of ``base`` (partial-label runs).

    Only for logging how many pseudo-labels are right; nothing trains on it.
    """

    def __init__(self, base: Dataset, true_targets: torch.Tensor) -> None:
        if len(base) != true_targets.shape[0]:
            raise ValueError(f"{len(base)} items but {true_targets.shape[0]} true label rows")
        self.base, self.true_targets = base, true_targets
        self.targets = getattr(base, "targets", None)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        return self.base[index] | {"true_target": self.true_targets[index]}


# ------------------------------------------------------------------------------------------ captions
class CaptionDataset(Dataset):
    """Adds ``"caption_tokens": (L,)`` to every item of ``base`` (LMPT's class-specific embedding loss)."""

    def __init__(self, base: Dataset, tokens: torch.Tensor) -> None:
        if tokens.shape[0] != len(base):
            raise ValueError(f"{tokens.shape[0]} captions for {len(base)} images")
        self.base, self.tokens = base, tokens
        self.targets = base.targets  # (N, C), what the samplers read

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        return self.base[index] | {"caption_tokens": self.tokens[index]}


def read_captions(path: str | Path, ids: list[str]) -> list[str]:
    """Captions (``id<TAB>caption`` lines) for ``ids``, in that order; a missing id is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: captions file not found")
    table: dict[str, str] = {}
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" not in line:
            raise ConfigError(f"{path}:{lineno}: expected 'image_id<TAB>caption'")
        image_id, text = line.split("\t", 1)
        table[image_id.strip()] = text.strip()
    missing = [i for i in ids if i not in table]
    if missing:
        raise ConfigError(f"{path}: no caption for {len(missing)} training image(s), e.g. {missing[:3]}")
    return [table[i] for i in ids]


# -------------------------------------------------------------------------------------------- runs
def build_model_for(cfg: Config, classnames: list[str]) -> torch.nn.Module:
    """``build_model`` with the seed set first, so a randomly initialised CLIP is the same in every process."""
    from cimlic.distributed import seed_everything
    from cimlic.models import build_model

    seed_everything(cfg.seed)
    return build_model(cfg.model, classnames)


def _clip_identity(model: torch.nn.Module) -> dict:
    clip = getattr(model, "clip", None)
    if clip is None:
        return {}
    return {"arch": clip.arch, "source": clip.source, "digest": weights_digest(clip)}


def check_clip_identity(run_dir: Path, model: torch.nn.Module) -> None:
    """The frozen CLIP weights must be those the run was trained with (they are not in the checkpoint)."""
    path = run_dir / "clip.json"
    if not path.is_file():
        return
    saved, now = read_json(path, ckpt.CheckpointError, "CLIP identity file"), _clip_identity(model)
    if saved.get("digest") != now.get("digest"):
        raise ckpt.CheckpointError(
            f"{path}: the frozen CLIP weights differ from those this run was trained with "
            f"(trained on {saved.get('source') or saved.get('arch')}, now {now.get('source') or now.get('arch')})"
        )


def train_run(cfg: Config, run_dir: str | Path, resume: bool = False) -> dict:
    """Train and test ``cfg`` into ``run_dir`` (``cimlic train``); returns the test metrics (eval.json).

    ``model.name: hpdval`` runs HP-DVAL's two stages into ``run_dir/stage1`` and ``run_dir/stage2``.
    """
    from cimlic.distributed import init_distributed, resolve_device
    from cimlic.engine import Trainer
    from cimlic.losses import build_loss

    run_dir = Path(run_dir)
    rank, _ = init_distributed()
    if cfg.model.name == "hpdval":
        return _train_two_stage(cfg, run_dir, resume, rank)
    splits = load_splits(cfg)
    model = build_model_for(cfg, splits.classnames)
    device = str(resolve_device(cfg.train.device))
    data = build_datasets(cfg, splits, model, device)
    if cfg.data.captions:
        tokens = model.clip.tokenize(read_captions(cfg.data.captions, splits.train.ids))
        data["train"] = CaptionDataset(data["train"], tokens)
    elif cfg.loss.name == "lmpt":
        raise ConfigError("loss.name=lmpt needs data.captions (an id<TAB>caption file for the training images)")
    class_counts = torch.as_tensor(splits.train.class_counts())  # n_c of the images trained on (after the carve)
    loss_fn = build_loss(cfg.loss, class_counts, len(splits.train))
    trainer = Trainer(cfg, model, loss_fn, data["train"], data["val"], data["test"], splits.classnames,
                      splits.group_counts, run_dir)  # fmt: skip
    result = trainer.fit(resume=resume)
    if rank == 0:
        write_json(run_dir / "clip.json", _clip_identity(model))
    return result


def _train_two_stage(cfg: Config, run_dir: Path, resume: bool, rank: int) -> dict:
    """HP-DVAL: stage 1 (DVAL) into ``run_dir/stage1``, then stage 2 (HPT) on its frozen student into ``stage2``."""
    if not resume and run_dir.is_dir() and any(run_dir.iterdir()):
        raise RunDirError(f"{run_dir}: run folder is not empty; resume it (--resume) or choose another name")
    stage1 = copy.deepcopy(cfg)
    stage1.model.name, stage1.name = "hpdval_stage1", f"{cfg.name}/stage1"
    if resume and (run_dir / "stage1" / "eval.json").is_file():
        logger.info("stage 1 already finished in %s", run_dir / "stage1")
    else:
        train_run(stage1, run_dir / "stage1", resume=resume and (run_dir / "stage1").is_dir())
    stage2 = copy.deepcopy(cfg)
    stage2.model.name, stage2.name = "hpdval_stage2", f"{cfg.name}/stage2"
    stage2.model.hpdval.stage1_run = str((run_dir / "stage1").resolve())
    stage2.train.epochs, stage2.train.lr = cfg.model.hpdval.stage2_epochs, cfg.model.hpdval.stage2_lr
    result = train_run(stage2, run_dir / "stage2", resume=resume and (run_dir / "stage2").is_dir())
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
        write_json(run_dir / "eval.json", result | {"stages": ["stage1", "stage2"]})
    return result


def _resolve_run(run_dir: Path) -> Path:
    """A two-stage HP-DVAL run folder stands for its stage-2 run."""
    if not (run_dir / "best.json").is_file() and (run_dir / "stage2" / "best.json").is_file():
        return run_dir / "stage2"
    return run_dir


def load_run(run_dir: str | Path) -> tuple[Config, torch.nn.Module, dict]:
    """The config, the model with its ``best`` weights, and the checkpoint metadata of a finished run."""
    run_dir = _resolve_run(Path(run_dir))
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'}: not a run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", apply_preset=False)  # resolved: the preset's values are in it
    _, meta = ckpt.read_checkpoint(run_dir / "best")
    model = build_model_for(cfg, list(meta["classnames"]))
    check_clip_identity(run_dir, model)
    ckpt.load_checkpoint(run_dir / "best", model, classnames=meta["classnames"])
    return cfg, model, meta


def eval_run(run_dir: str | Path, split: str = "test", ap: str | None = None) -> dict:
    """Evaluate a run's selected checkpoint on ``split`` (``cimlic eval``); writes ``eval_<split>_<ap>.json``."""
    from cimlic.distributed import resolve_device
    from cimlic.engine import evaluate_logits, forward_all

    run_dir = _resolve_run(Path(run_dir))
    cfg, model, meta = load_run(run_dir)
    if ap:
        cfg.eval.ap = ap
    splits = load_splits(cfg)
    labels = getattr(splits, split)
    if labels is None:
        raise ConfigError(f"{run_dir}: the run has no {split} split")
    device = resolve_device(cfg.train.device)
    dataset = build_datasets(cfg, splits, model, str(device), which=(split,))[split]
    logits, targets = forward_all(model.to(device), dataset, cfg.train, device, len(splits.classnames))
    result = evaluate_logits(logits, targets, cfg, splits.classnames, splits.group_counts)
    result |= {"split": split, "checkpoint_epoch": meta.get("epoch")}
    out = run_dir / f"eval_{split}_{cfg.eval.ap}.json"
    write_json(out, result)
    logger.info("wrote %s", out)
    return result
