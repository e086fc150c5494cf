"""From a config to a run: data splits, datasets (optionally over cached features), model, loss, Trainer.

Used by ``cimlic train | eval | predict``; importable for notebooks and scripts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cimlic import checkpoint as ckpt
from cimlic.cache import CachedFeatureDataset, load_or_compute
from cimlic.config import Config, ConfigError, load_config, save_config
from cimlic.data.dataset import ExtraInputsDataset, MultiLabelDataset, default_transform
from cimlic.data.labels import LabelSet, read_classes, read_label_list
from cimlic.data.splits import carve_validation
from cimlic.distributed import barrier, rank_zero_first
from cimlic.io import write_json
from cimlic.models import METHODS, Method
from cimlic.rundir import run_dir_entries, run_lock

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


def model_transform(model: Method, train: bool):
    """The image transform for ``model``: its ``input_spec()`` (size, mean, std), with augmentation when ``train``."""
    size, mean, std = model.input_spec()
    return default_transform(int(size), train=train, mean=tuple(mean), std=tuple(std))


def build_datasets(
    cfg: Config, splits: Splits, model: Method, device: str, which: tuple[str, ...] = ("train", "val", "test")
) -> dict[str, Dataset | None]:
    """Datasets of the ``which`` splits: cached frozen features where the model allows it, else images."""
    tower = model.feature_tower
    use_cache = tower is not None and cfg.train.cache_features
    if use_cache and cfg.train.augment:
        logger.info("train.augment is on: training images are augmented, so the training split is not cached")
    out: dict[str, Dataset | None] = {}
    for split in which:
        labels = getattr(splits, split)
        if labels is None:
            out[split] = None
            continue
        augment = split == "train" and cfg.train.augment
        ds = image_dataset(cfg, labels, split, model_transform(model, train=augment))
        if use_cache and not augment:
            with rank_zero_first():  # under DDP rank 0 fills the cache, the others then read it
                feats = load_or_compute(model.image_features, tower, ds, cfg.train.cache_dir, device=device,
                                        batch_size=max(cfg.train.batch_size, 64),
                                        required=model.feature_keys)  # fmt: skip
            ds = CachedFeatureDataset(feats, ds.targets)
        if split == "train":
            ds = with_cached_teacher(cfg, model, ds, device)
        out[split] = ds
    return out


def with_cached_teacher(cfg: Config, model: Method, train_set: Dataset, device: str) -> Dataset:
    """The training set with the teacher's cached features (``feat_teacher``) beside each image, when the method
    has a teacher (``model.teacher_tower``), the cache is on and the training view is deterministic."""
    teacher = model.teacher_tower
    if teacher is None or not isinstance(train_set, MultiLabelDataset):  # a teacher sees images, not cached features
        return train_set
    if cfg.train.augment:
        logger.info("train.augment is on: the teacher sees each augmented image, so it runs at every training step")
        return train_set
    if not cfg.train.cache_features:
        logger.info("train.cache_features is off: the teacher runs at every training step")
        return train_set
    with rank_zero_first():  # under DDP rank 0 fills the cache, the others then read it
        feats = load_or_compute(model.teacher_features, teacher, train_set, cfg.train.cache_dir, view="teacher",
                                device=device, batch_size=max(cfg.train.batch_size, 64),
                                required=("teacher",))  # fmt: skip
    logger.info("teacher features of the %d training images from the cache: no teacher pass per step", len(train_set))
    return ExtraInputsDataset(train_set, {"feat_teacher": feats["teacher"]})


def training_extras(cfg: Config, splits: Splits, model: Method) -> dict[str, torch.Tensor]:
    """Per-image training inputs: the method's own (``model.training_inputs``) and, for a partial-label run, the
    hidden unmasked labels ``true_target`` (only counted, e.g. TRM-ML's right pseudo-labels)."""
    extras = dict(model.training_inputs(cfg, splits.train.ids))
    if splits.train_true is not None:
        extras["true_target"] = torch.as_tensor(splits.train_true.targets, dtype=torch.float32)
    return extras


# -------------------------------------------------------------------------------------------- runs
def build_model_for(cfg: Config, classnames: list[str]) -> torch.nn.Module:
    """``build_model`` with the seed set first, so a randomly initialised CLIP is the same in every process."""
    from cimlic.distributed import seed_everything
    from cimlic.models import build_model

    seed_everything(cfg.seed)
    return build_model(cfg.model, classnames)


def check_clip_identity(run_dir: Path, model: Method) -> None:
    """The frozen weights (CLIP and the method's other frozen parts) must be those the run was trained with."""
    ckpt.check_identity(run_dir / "clip.json", model.identity())


def train_run(cfg: Config, run_dir: str | Path, resume: bool = False) -> dict:
    """Train and test ``cfg`` into ``run_dir`` (``cimlic train``); returns the test metrics (eval.json).

    A method trained in stages (``MethodSpec.stages``, e.g. ``model.name: hpdval``) runs each stage into its own
    sub-folder of ``run_dir``.
    """
    from cimlic.distributed import init_distributed

    run_dir = Path(run_dir)
    rank, _ = init_distributed()
    with run_lock(run_dir, "train --resume" if resume else "train"):  # one command per run folder at a time
        spec = METHODS.get(cfg.model.name)
        if spec is not None and spec.stages is not None:
            return _train_stages(cfg, spec.stages(cfg, run_dir), run_dir, resume, rank)
        return _train_one(cfg, run_dir, resume, rank)


def _train_one(cfg: Config, run_dir: Path, resume: bool, rank: int) -> dict:
    from cimlic.distributed import resolve_device
    from cimlic.engine import Trainer
    from cimlic.losses import build_loss

    _check_loss_inputs(cfg)
    splits = load_splits(cfg)
    model = build_model_for(cfg, splits.classnames)
    extras = training_extras(cfg, splits, model)  # before the cache is filled: a bad extra file fails first
    device = str(resolve_device(cfg.train.device))
    data = build_datasets(cfg, splits, model, device)
    if extras:
        data["train"] = ExtraInputsDataset(data["train"], extras)
    class_counts = torch.as_tensor(splits.train.class_counts())  # n_c of the images trained on (after the carve)
    loss_fn = build_loss(cfg.loss, class_counts, len(splits.train))
    trainer = Trainer(cfg, model, loss_fn, data["train"], data["val"], data["test"], splits.classnames,
                      splits.group_counts, run_dir)  # fmt: skip
    result = trainer.fit(resume=resume)
    if rank == 0:
        write_json(run_dir / "clip.json", model.identity())
        result = _calibrate_after_training(cfg, trainer, data["val"], splits.classnames, run_dir, result)
    barrier()
    return result


def _calibrate_after_training(cfg: Config, trainer, val_set, classnames: list[str], run_dir: Path, result: dict):
    """Choose the run's thresholds on val with the selected weights (``eval.calibrate``); ``result`` + tuned metrics."""
    from cimlic.apps.calibrate import amp_active, calibrate_model, save_calibration
    from cimlic.distributed import world
    from cimlic.errors import CimlicError

    if not cfg.eval.calibrate or val_set is None:
        if cfg.eval.calibrate:
            logger.info("no validation split: no thresholds chosen (predict uses 0.5 on sigmoid(logit))")
        return result
    # the tested split's scores are reused when they are what predict computes (one process, float32)
    reuse = result.get("split") == "test" and world()[1] == 1 and not amp_active(cfg, trainer.device)
    test = trainer.test_scores if reuse else trainer.datasets["test"]
    try:
        cal, tuned = calibrate_model(cfg, trainer.model, val_set, classnames, trainer.device, test)  # selected weights
    except CimlicError as err:  # the trained run stands; `cimlic calibrate` can choose the thresholds later
        logger.warning("no thresholds chosen: %s", err)
        return result
    save_calibration(run_dir, cal, tuned)
    return result | ({"tuned_thresholds": tuned} if tuned is not None else {})


def _check_loss_inputs(cfg: Config) -> None:
    """The loss's extra inputs (``losses.LOSS_INPUTS``) must be among those the method provides."""
    from cimlic.losses import LOSS_INPUTS

    spec = METHODS.get(cfg.model.name)
    missing = [k for k in LOSS_INPUTS.get(cfg.loss.name, ()) if spec is None or k not in spec.loss_inputs]
    if spec is not None and missing:
        givers = " or ".join(name for name, s in METHODS.items() if set(missing) <= set(s.loss_inputs)) or "?"
        raise ConfigError(f"loss.name={cfg.loss.name} needs {missing} from the model, which model.name="
                          f"{cfg.model.name} does not provide (use model.name={givers})")  # fmt: skip


def _train_stages(cfg: Config, stages: list[tuple[str, Config]], run_dir: Path, resume: bool, rank: int) -> dict:
    """Each (sub-folder, config) in order; a finished stage before the last is kept when resuming."""
    run_dir_entries(run_dir, resume)  # never into a non-empty folder unless resuming
    result: dict = {}
    for i, (name, stage_cfg) in enumerate(stages):
        stage_dir = run_dir / name
        if resume and i < len(stages) - 1 and (stage_dir / "eval.json").is_file():
            logger.info("%s already finished in %s", name, stage_dir)
            continue
        result = train_run(stage_cfg, stage_dir, resume=resume and stage_dir.is_dir())
    if rank == 0:
        save_config(cfg, run_dir / "config.yaml")
        write_json(run_dir / "eval.json", result | {"stages": [name for name, _ in stages]})
    return result


def _resolve_run(run_dir: Path) -> Path:
    """A run folder of a method trained in stages stands for its last stage."""
    if (run_dir / "best.json").is_file() or not (run_dir / "config.yaml").is_file():
        return run_dir
    cfg = load_config(run_dir / "config.yaml", apply_preset=False)
    spec = METHODS.get(cfg.model.name)
    if spec is not None and spec.stages is not None:
        return run_dir / spec.stages(cfg, run_dir)[-1][0]
    return run_dir


def load_run(run_dir: str | Path) -> tuple[Config, torch.nn.Module, dict]:
    """The config, the model with its ``best`` weights, and the checkpoint metadata of a finished run."""
    run_dir = _resolve_run(Path(run_dir))
    if not (run_dir / "config.yaml").is_file():
        raise FileNotFoundError(f"{run_dir / 'config.yaml'}: not a run folder (no config.yaml)")
    cfg = load_config(run_dir / "config.yaml", apply_preset=False)  # resolved: the preset's values are in it
    _, meta = ckpt.read_checkpoint(run_dir / "best")
    names = meta.get("classnames")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ckpt.CheckpointError(f"{run_dir / 'best.json'}: no list of class names ('classnames')")
    if cfg.data.classes and Path(cfg.data.classes).is_file():  # the run's own class list, when it is still there
        own = read_classes(cfg.data.classes)
        if own != names:
            raise ckpt.CheckpointError(
                f"{run_dir / 'best.json'}: the checkpoint was trained on {len(names)} classes {names[:3]}..., "
                f"not on the run's class list {cfg.data.classes} ({len(own)} classes {own[:3]}...)"
            )
    model = build_model_for(cfg, list(names))
    check_clip_identity(run_dir, model)
    ckpt.load_checkpoint(run_dir / "best", model, classnames=meta["classnames"])
    return cfg, model, meta


def eval_run(run_dir: str | Path, split: str = "test", ap: str | None = None) -> dict:
    """Evaluate a run's selected checkpoint on ``split`` (``cimlic eval``); writes ``eval_<split>_<ap>.json``."""
    result, out = evaluate_run(run_dir, split, ap)
    write_json(out, result)
    logger.info("wrote %s", out)
    return result


def evaluate_run(run_dir: str | Path, split: str = "test", ap: str | None = None) -> tuple[dict, Path]:
    """(metrics of a run's selected checkpoint on ``split``, the file they belong in); writes nothing."""
    from cimlic.apps.calibrate import amp_active, fp32_logits, read_run_calibration, tuned_metrics
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
    cal = read_run_calibration(run_dir, splits.classnames)
    if cal is not None:  # the threshold metrics at the run's own thresholds, on predict's float32 scores
        if amp_active(cfg, device):
            logits, targets = fp32_logits(model, dataset, cfg, device, len(splits.classnames))
        result["tuned_thresholds"] = tuned_metrics(cal, logits, targets, cfg.eval.cf1, split)
    return result, run_dir / f"eval_{split}_{cfg.eval.ap}.json"
