"""Test helpers for finished run folders: re-evaluate a run's selected checkpoint independently, chance level."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score

from cimlic.apps.runner import build_datasets, load_run, load_splits
from cimlic.data.labels import read_classes, read_label_list
from cimlic.engine import forward_all


def sklearn_map(run_dir: str | Path) -> float:
    """mAP (%) of the run's ``best`` checkpoint on its test split, from fresh logits and sklearn's AP.

    Independent of the Trainer's evaluation: the model is rebuilt from the run folder, its test images (or cached
    features) scored again, and every class with a positive test image ranked by ``average_precision_score``.
    """
    cfg, model, _ = load_run(run_dir)
    splits = load_splits(cfg)
    test = build_datasets(cfg, splits, model, "cpu", which=("test",))["test"]
    logits, targets = forward_all(model, test, cfg.train, torch.device("cpu"), len(splits.classnames))
    y = targets.numpy() == 1
    aps = [average_precision_score(y[:, c], logits[:, c].numpy()) for c in range(y.shape[1]) if y[:, c].any()]
    return 100.0 * float(np.mean(aps))


def chance_map(labels: str | Path, classes: str | Path) -> float:
    """mAP (%) a random scorer reaches on a label list in expectation: the mean positive rate of its classes."""
    names = read_classes(classes)
    targets = read_label_list(labels, names).targets == 1
    rates = targets.mean(axis=0)
    return 100.0 * float(rates[rates > 0].mean())
