"""A run's decision thresholds (``calibration.json``): chosen after training, or again by ``cimlic calibrate``.

``train`` ends here when the run has a validation split (``eval.calibrate``, on by default): the selected weights
score the validation split, :func:`cimlic.calibration.calibrate` fits the probabilities and chooses one threshold per
class (``eval.threshold_rule``: F1-optimal, or the largest recall at ``eval.target_precision``), and the test split's
CP/CR/CF1/OP/OR/OF1 at those thresholds go into ``eval.json`` under ``tuned_thresholds``, next to the numbers at the
fixed ``eval.threshold``. ``predict`` and ``export`` use the file by default.
"""

from __future__ import annotations

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
    from cimlic.engine import forward_all

    e = cfg.eval
    logits, targets = forward_all(model, val_set, cfg.train, device, len(classnames))  # (N_val, C) each
    rule_target = e.target_precision if e.threshold_rule == "precision" else None
    cal = calibrate(logits.numpy(), targets.numpy(), classnames, e.threshold_rule, rule_target, split="val")
    if test is None:
        return cal, None
    if isinstance(test, Dataset):
        test = forward_all(model, test, cfg.train, device, len(classnames))
    test_logits, test_targets = test
    tuned = threshold_metrics(cal.probabilities(test_logits.numpy()), test_targets.numpy(),
                              threshold=np.asarray(cal.thresholds), cf1=e.cf1)  # fmt: skip
    return cal, {**tuned, "rule": cal.rule, "target_precision": cal.target_precision, "chosen_on": "val",
                 "split": "test", "file": CALIBRATION_FILE}  # fmt: skip


def save_calibration(run_dir: Path, cal: Calibration, tuned: dict | None) -> None:
    """Write ``calibration.json``; add ``tuned_thresholds`` to the run's ``eval.json`` (when both exist)."""
    cal.save(run_dir / CALIBRATION_FILE)
    evaluation = run_dir / "eval.json"
    if tuned is not None and evaluation.is_file():
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

    run_dir = _resolve_run(Path(run_dir))
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
        save_calibration(run_dir, cal, tuned)
    flagged = [d["class"] for d in cal.per_class if d["note"]]
    return {"calibration": str(run_dir / CALIBRATION_FILE), "tuned_thresholds": tuned, "flagged": flagged}


def read_run_calibration(run_dir: Path, classnames: list[str]) -> Calibration | None:
    """The run's ``calibration.json``, or None when it has none (a run from before thresholds, or without val)."""
    path = run_dir / CALIBRATION_FILE
    return Calibration.load(path, classnames) if path.is_file() else None
