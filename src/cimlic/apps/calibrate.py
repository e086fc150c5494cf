"""A run's decision thresholds (``calibration.json``): chosen after training, or again by ``cimlic calibrate``.

``train`` ends here when the run has a validation split (``eval.calibrate``, on by default): the selected weights
score the validation split, :func:`cimlic.calibration.calibrate` fits the probabilities and chooses one threshold per
class (``eval.threshold_rule``: F1-optimal, or the largest recall at ``eval.target_precision``), and the test split's
CP/CR/CF1/OP/OR/OF1 at those thresholds go into ``eval.json`` under ``tuned_thresholds``, next to the numbers at the
fixed ``eval.threshold``. ``predict`` and ``export`` use the file by default.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from cimlic.calibration import Calibration, calibrate
from cimlic.config import Config, ConfigError
from cimlic.io import read_json, write_json
from cimlic.metrics import threshold_metrics

logger = logging.getLogger(__name__)

CALIBRATION_FILE = "calibration.json"


def calibrate_model(
    cfg: Config,
    model: torch.nn.Module,
    val_set: Dataset,
    classnames: list[str],
    device: torch.device,
    test: tuple[torch.Tensor, torch.Tensor] | Dataset | None = None,
) -> tuple[Calibration, dict | None]:
    """Calibrate ``model`` (its current weights) on ``val_set``; the test metrics at the thresholds when ``test`` is
    given, as (logits, targets) already computed or as a dataset to score.

    Returns:
        (the calibration, ``tuned_thresholds`` of eval.json or None).
    """
    e = cfg.eval
    logits, targets = fp32_logits(model, val_set, cfg, device, len(classnames))  # (N_val, C) each
    rule_target = e.target_precision if e.threshold_rule == "precision" else None
    cal = calibrate(logits.numpy(), targets.numpy(), classnames, e.threshold_rule, rule_target, split="val")
    if test is None:
        return cal, None
    if isinstance(test, Dataset):
        test = fp32_logits(model, test, cfg, device, len(classnames))
    return cal, tuned_metrics(cal, *test, cf1=e.cf1, split="test")


def fp32_logits(model: torch.nn.Module, dataset: Dataset, cfg: Config, device: torch.device, num_classes: int):
    """(N, C) logits and targets as ``predict`` and the exported tagger compute them: float32, no autocast (the
    evaluation under ``train.amp`` runs in bf16 on a GPU, which moves logits near a threshold)."""
    from cimlic.engine import forward_all

    return forward_all(model, dataset, dataclasses.replace(cfg.train, amp=False), device, num_classes)


def amp_active(cfg: Config, device: torch.device) -> bool:
    """Whether the Trainer's evaluation ran under bf16 autocast (so its logits are not ``fp32_logits``)."""
    return device.type == "cuda" and cfg.train.amp


def tuned_metrics(cal: Calibration, logits: torch.Tensor, targets: torch.Tensor, cf1: str, split: str) -> dict:
    """``tuned_thresholds`` of eval.json: CP, CR, CF1, OP, OR, OF1 of (N, C) logits at the calibration's thresholds."""
    tuned = threshold_metrics(cal.probabilities(logits.numpy()), targets.numpy(), np.asarray(cal.thresholds), cf1=cf1)
    return {**tuned, "rule": cal.rule, "target_precision": cal.target_precision, "chosen_on": cal.split,
            "split": split, "file": CALIBRATION_FILE}  # fmt: skip


def save_calibration(run_dir: Path, cal: Calibration, tuned: dict | None, also: Path | None = None) -> None:
    """Write ``calibration.json``; put ``tuned_thresholds`` in the run's ``eval.json`` (and in ``also``'s, the top
    folder of a run trained in stages, whose eval.json is its last stage's)."""
    cal.save(run_dir / CALIBRATION_FILE)
    for evaluation in (run_dir / "eval.json", also / "eval.json" if also is not None else None):
        if tuned is not None and evaluation is not None and evaluation.is_file():
            write_json(evaluation, read_json(evaluation, ConfigError, "evaluation file") | {"tuned_thresholds": tuned})
    logger.info("thresholds (%s) chosen on %d validation images: %s", cal.rule, cal.images, run_dir / CALIBRATION_FILE)


def calibrate_run(run_dir: str | Path, rule: str | None = None, target_precision: float | None = None) -> dict:
    """``cimlic calibrate``: choose a run's thresholds again (e.g. for a target precision); rewrites its files.

    Returns:
        ``{"calibration": path, "tuned_thresholds": test metrics at the thresholds or None, "flagged": [classes]}``.
    """
    from cimlic.apps.runner import _resolve_run, build_datasets, load_run, load_splits
    from cimlic.distributed import resolve_device
    from cimlic.rundir import run_lock

    if rule == "f1" and target_precision is not None:
        raise ConfigError("--target-precision goes with --rule precision (or no --rule), not with --rule f1")
    top = Path(run_dir)
    run_dir = _resolve_run(top)
    with run_lock(run_dir, "calibrate", required=False):
        cfg, model, _ = load_run(run_dir)
        if rule is not None:
            cfg.eval.threshold_rule = rule
        if target_precision is not None:
            cfg.eval.threshold_rule, cfg.eval.target_precision = "precision", target_precision
        if cfg.eval.threshold_rule == "precision" and not 0.0 < cfg.eval.target_precision <= 1.0:
            raise ConfigError(f"--target-precision must be in (0, 1], got {cfg.eval.target_precision}")
        splits = load_splits(cfg)
        if splits.val is None:
            raise ConfigError(f"{run_dir}: the run has no validation split (data.val_labels is empty and "
                              "data.val_fraction is 0): thresholds are chosen on one")  # fmt: skip
        device = resolve_device(cfg.train.device)
        which = ("val", "test") if splits.test is not None else ("val",)
        data = build_datasets(cfg, splits, model, str(device), which=which)
        cal, tuned = calibrate_model(cfg, model.to(device), data["val"], splits.classnames, device, data.get("test"))
        save_calibration(run_dir, cal, tuned, also=top if top != run_dir else None)
    flagged = [d["class"] for d in cal.per_class if d["note"]]
    return {"calibration": str(run_dir / CALIBRATION_FILE), "tuned_thresholds": tuned, "flagged": flagged}


def read_run_calibration(run_dir: Path, classnames: list[str]) -> Calibration | None:
    """The run's ``calibration.json``, or None when it has none (a run from before thresholds, or without val)."""
    path = run_dir / CALIBRATION_FILE
    return Calibration.load(path, classnames) if path.is_file() else None
