"""docs/adding-a-method.md, followed once: a method that exists only in this file trains end to end.

The method is registered by one line in the method table (here ``monkeypatch.setitem``); nothing in the runner,
the Trainer, the cache or the checkpoints knows it, yet it is cached, trained with its aux loss, extra inputs and
epoch hooks, checkpointed without its frozen CLIP, re-evaluated and used for predictions.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from torch import nn

from cimlic.apps.cli import main
from cimlic.models import METHODS
from cimlic.models.base import FrozenClipMethod, MethodSpec
from cimlic.models.text import class_text_features, cosine_logits
from runs import sklearn_map

pytestmark = pytest.mark.usefixtures("one_thread")
SEEN: dict[str, list] = {"batch_keys": [], "epochs": []}


class BiasedZeroShot(FrozenClipMethod):
    """Zero-shot CLIP plus a learned per-class bias; an L2 aux loss; one extra per-image input; epoch hooks."""

    def __init__(self, clip, classnames, templates):
        super().__init__(clip, len(classnames))
        self.register_buffer("text", class_text_features(clip, classnames, templates), persistent=False)
        self.bias = nn.Parameter(torch.zeros(len(classnames)))
        self.epochs_seen = 0

    def training_inputs(self, cfg, ids):
        return {"image_number": torch.arange(len(ids), dtype=torch.float32)}

    def set_epoch(self, epoch):
        SEEN["epochs"].append(epoch)

    def epoch_stats(self):
        self.epochs_seen += 1
        return {"epochs_seen": float(self.epochs_seen)}

    def forward(self, batch):
        if self.training:
            SEEN["batch_keys"].append(sorted(batch))
        feats = self.batch_features(batch)
        logits = cosine_logits(feats["global"], self.text, self.clip.logit_scale) + self.bias
        out = {"logits": logits}
        if self.training:
            out["aux_losses"] = {"l2": 1e-3 * self.bias.pow(2).sum()}
        return out


def build(cfg, classnames, clip):
    return BiasedZeroShot(clip, classnames, cfg.templates)


def test_a_new_method_needs_only_its_file_and_a_table_line(monkeypatch, glyph_data, tmp_path):
    monkeypatch.setitem(METHODS, "zs_bias", MethodSpec(build, summary="zero-shot + a learned bias"))
    SEEN["batch_keys"].clear()
    SEEN["epochs"].clear()
    cfg = {"name": "new", "data": glyph_data,
           "model": {"name": "zs_bias", "clip_arch": "cimlic-tiny-vit", "random_init": True},
           "train": {"epochs": 2, "batch_size": 8, "num_workers": 0, "lr": 0.05,
                     "cache_dir": str(tmp_path / "cache")}, "loss": {"name": "bce"}}  # fmt: skip
    config = tmp_path / "new.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    assert SEEN["epochs"] == [0, 1]
    assert all(k == ["feat_global", "image_number", "index", "target"] for k in SEEN["batch_keys"])  # cached
    assert list(load_file(run / "best.safetensors")) == ["bias"]  # its trainable tensor, never CLIP's
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epochs_seen"] for r in records if r.get("split") == "train"] == [1.0, 2.0]
    assert any("loss_l2" in r for r in records)
    result = json.loads((run / "eval.json").read_text())
    assert result["map"] == pytest.approx(sklearn_map(run), abs=1e-6)  # reloaded from the run folder, re-scored
    out = tmp_path / "p.jsonl"
    image = sorted(Path(glyph_data["image_root"]).glob("*.png"))[0]
    assert main(["predict", "--run", str(run), str(image), "--out", str(out)]) == 0
    n_classes = len(Path(glyph_data["classes"]).read_text().split())
    assert len(json.loads(out.read_text())["scores"]) == n_classes
