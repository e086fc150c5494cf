"""``cimlic bench``: the timed epoch is the Trainer's own training step (aux losses, model targets, the optimiser)."""

from __future__ import annotations

import json
import math

import pytest
import yaml

from cimlic.apps.bench import bench_cache, bench_train
from cimlic.apps.cli import main
from cimlic.config import load_config

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, glyph_data, model: str, **extra):
    cfg = {"name": f"bench_{model}", "data": glyph_data,
           "model": {"name": model, "clip_arch": "cimlic-tiny-vit", "random_init": True, "n_ctx": 4},
           "train": {"batch_size": 8, "num_workers": 0, "lr": 0.01, "device": "cpu"},
           "loss": {"name": "asl"}}  # fmt: skip
    for key, value in extra.items():
        section, name = key.split("__")
        cfg[section][name] = value
    path = tmp_path / f"{model}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_bench_cache_times_the_trainer_step(tmp_path, glyph_data, capsys, monkeypatch):
    from cimlic.engine import Trainer

    calls = []
    step = Trainer.train_step

    def counted(self, batch):
        calls.append(sorted(batch))
        return step(self, batch)

    monkeypatch.setattr(Trainer, "train_step", counted)
    config = _config(tmp_path, glyph_data, "trmml")  # an aux loss and model-provided targets
    result = bench_cache(load_config(config), max_images=12)
    assert result["images"] == 12 and result["steps"] == math.ceil(12 / 8)
    assert len(calls) == 2 * (1 + result["steps"])  # a warm-up step and the epoch, uncached then cached
    assert "image" in calls[0] and "feat_local" in calls[-1] and "image" not in calls[-1]
    assert result["uncached_s"] > 0 and result["cached_s"] > 0 and result["ratio"] > 0
    assert main(["bench", "cache", "--config", str(config), "--max-images", "8"]) == 0
    printed = json.loads(capsys.readouterr().out.splitlines()[0])
    assert printed["steps"] == 1 and printed["model"] == "trmml"


def test_bench_train_and_errors(tmp_path, glyph_data, capsys):
    config = _config(tmp_path, glyph_data, "hpdval_stage1", model__hpdval={"topk": 4})
    result = bench_train(load_config(config), max_images=8)
    assert result["steps"] == 1 and result["trainable_params"] > 0 and result["s_per_step"] > 0
    no_kd = _config(tmp_path, glyph_data, "hpdval_stage1", model__hpdval={"topk": 4, "kd_weight": 0.0})
    assert main(["bench", "cache", "--config", str(no_kd)]) == 2  # a trainable image tower and no teacher
    assert "no frozen image tower or teacher" in capsys.readouterr().err
    zeroshot = _config(tmp_path, glyph_data, "zeroshot")
    assert main(["bench", "train", "--config", str(zeroshot), "--max-images", "16"]) == 2
    assert "nothing to train" in capsys.readouterr().err


def test_bench_cache_of_the_stage1_teacher(tmp_path, glyph_data, monkeypatch):
    """HP-DVAL stage 1: the uncached epoch runs the teacher at each step, the cached one reads feat_teacher."""
    from cimlic.engine import Trainer

    calls = []
    step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, batch: calls.append(sorted(batch)) or step(self, batch))
    config = _config(tmp_path, glyph_data, "hpdval_stage1", model__hpdval={"topk": 4})
    result = bench_cache(load_config(config), max_images=16)
    assert result["cached"] == "teacher" and result["steps"] == 2 and len(calls) == 6
    assert "feat_teacher" not in calls[0] and "image" in calls[-1] and "feat_teacher" in calls[-1]
    assert result["ratio"] > 0


def test_bench_text_plain_vs_shared_prefix(capsys):
    argv = ["bench", "text", "--arch", "cimlic-tiny-vit", "--num-classes", "6", "--n-ctx", "4", "--learners", "2",
            "--repeats", "2"]  # fmt: skip
    assert main(argv) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    assert result["fits"] and result["classes"] == 6 and result["learners"] == 2
    assert result["plain_s"] > 0 and result["shared_prefix_s"] > 0 and result["ratio"] > 0
    assert result["max_rel_diff_features"] < 1e-5 and result["max_rel_diff_grad"] < 1e-5
    assert main([*argv[:-1], "0"]) == 2 and "--repeats" in capsys.readouterr().err


def test_bench_memory_reports_the_entry_and_its_peaks(tmp_path, glyph_data, capsys):
    config = _config(tmp_path, glyph_data, "dualcoop", model__dualcoop={"n_ctx_neg": 4})  # global + local tokens
    assert main(["bench", "memory", "--config", str(config), "--max-images", "16"]) == 0
    result = json.loads(capsys.readouterr().out.splitlines()[0])
    per_image = sum(math.prod(v["per_image"]) * 4 for v in result["features"].values()) / 2**20
    assert result["images"] == 16 and set(result["features"]) == {"global", "local"}
    assert result["mib_per_image"] == pytest.approx(per_image, rel=0.05)  # the rows, and a small header
    assert result["build_peak_mib"] >= 0 and result["read_peak_anon_mib"] >= 0 and result["build_s"] >= 0
