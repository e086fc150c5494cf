"""Run folders written by earlier versions keep working; the frozen-weights identity names what differs."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from cimlic import checkpoint as ckpt
from cimlic.apps.cli import main
from cimlic.cache import state_digest
from cimlic.config import ModelConfig
from cimlic.models import build_model
from cimlic.models.cprfl import CPRFLConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def _train(glyph_data, tmp_path, model: dict, name: str = "run"):
    cfg = {"name": name, "data": glyph_data, "model": {"clip_arch": "cimlic-tiny-rn", "random_init": True, **model},
           "train": {"epochs": 1, "batch_size": 16, "num_workers": 0, "lr": 0.01,
                     "cache_dir": str(tmp_path / "cache")}, "loss": {"name": "asl"}}  # fmt: skip
    config = tmp_path / f"{name}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / name
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    return config, run


def test_a_run_in_the_old_config_layout_evaluates_and_resumes(glyph_data, tmp_path, caplog):
    config, run = _train(glyph_data, tmp_path, {"name": "dualcoop", "n_ctx": 4, "dualcoop": {"n_ctx_neg": 4}})
    first = json.loads((run / "eval.json").read_text())["map"]
    saved = yaml.safe_load((run / "config.yaml").read_text())
    d = saved["model"].pop("dualcoop")  # back to the layout of the earlier versions: flat DualCoOp keys
    saved["model"].update(n_ctx_neg=d["n_ctx_neg"], tau_s=d["tau_s"], tau=d["tau"], learn_temps=d["learn_temps"],
                          dualcoop_logit=d["logit"], dense_mean_token=d["mean_token"])  # fmt: skip
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    identity = json.loads((run / "clip.json").read_text())
    (run / "clip.json").write_text(json.dumps({k: identity[k] for k in ("arch", "source", "digest")}))  # no "parts"
    assert main(["eval", "--run", str(run)]) == 0
    assert json.loads((run / "eval_test_sklearn.json").read_text())["map"] == pytest.approx(first, abs=1e-9)
    with caplog.at_level("WARNING", logger="cimlic.config"):
        assert main(["train", "--config", str(config), "--run-dir", str(run), "--resume"]) == 0  # a finished run
    assert "model.tau_s is now model.dualcoop.tau_s" in caplog.text


def test_identity_names_the_frozen_part_that_differs(glyph_data, tmp_path, capsys):
    _, run = _train(glyph_data, tmp_path, {"name": "cprfl", "cprfl": {"freeze_backbone": True, "ffn": 32, "heads": 2}})
    identity = json.loads((run / "clip.json").read_text())
    assert set(identity["parts"]) == {"clip", "cprfl_backbone"}  # the backbone keeps its name of earlier runs
    identity["parts"]["cprfl_backbone"], identity["digest"] = "0" * 64, "1" * 64
    (run / "clip.json").write_text(json.dumps(identity))
    assert main(["eval", "--run", str(run)]) == 2
    err = capsys.readouterr().err
    assert "clip.json: the frozen weights differ" in err and "(cprfl_backbone differs)" in err and err.count("\n") == 1
    (run / "clip.json").write_text("[]")
    assert main(["eval", "--run", str(run)]) == 2
    assert "clip.json: malformed CLIP identity file" in capsys.readouterr().err


def test_frozen_backbone_digest_equals_the_earlier_layout():
    """Before, the frozen backbone lived under CLIP as ``cprfl_backbone``: the run identity hashes it the same way."""
    torch.manual_seed(0)
    cfg = ModelConfig(name="cprfl", clip_arch="cimlic-tiny-vit", random_init=True,
                      cprfl=CPRFLConfig(freeze_backbone=True, ffn=32, heads=2))  # fmt: skip
    model = build_model(cfg, ["a", "b", "c"])
    earlier = model.clip.state_dict() | {f"cprfl_backbone.{k}": v for k, v in model.backbone.state_dict().items()}
    assert model.identity()["digest"] == state_digest(earlier)
    assert list(ckpt.trainable_tensors(model)) and not any(
        k.startswith("backbone.") for k in ckpt.trainable_tensors(model)
    )
