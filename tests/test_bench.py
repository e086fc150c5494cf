"""``cimlic bench``: the timed epoch is the Trainer's own training step (aux losses, model targets, the optimiser)."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml

from cimlic.apps.bench import bench_cache, bench_train
from cimlic.apps.cli import main
from cimlic.config import ConfigError, load_config

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


def test_bench_suite_variants_table_and_errors(tmp_path):
    from torch import nn

    from cimlic.apps.bench_suite import _variants, bench_suite, markdown

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    resnet = nn.Sequential(*[nn.Conv2d(3, 3, 3) for _ in range(12)])
    vit = nn.Sequential(nn.Conv2d(3, 8, 16), nn.Linear(8, 8))
    assert _variants(None, vit, True, cpu) == ["fp32", "compile"]
    assert _variants(None, resnet, True, cpu) == ["fp32", "channels_last"]  # compiling a ResNet step: GPU only
    assert _variants(None, resnet, True, cuda) == ["fp32", "bf16", "channels_last", "compile"]
    assert _variants(None, resnet, False, cuda) == ["fp32", "bf16", "compile"]  # cached features: no image tower
    row = {"case": "coop", "variant": "fp32", "device": "cpu", "step_input": "cached features", "batch_size": 4,
           "s_per_step": 0.2, "peak_mib": 900.0, "data_images_per_s": 80.0, "num_workers": 2}  # fmt: skip
    table = markdown([row]).splitlines()
    assert len(table) == 3 and table[2] == "| coop | fp32 | cpu | cached features | 4 | 0.2 | 900.0 | 80.0 (2) |"
    with pytest.raises(ConfigError, match="unknown bench case"):
        bench_suite(tmp_path / "x", "cpu", ["nope"])


def test_bench_suite_times_the_trainer_step(tmp_path, glyph_data, monkeypatch):
    from cimlic.apps.bench_suite import _time_steps
    from cimlic.apps.runner import build_datasets, build_model_for, load_splits
    from cimlic.engine import Trainer
    from cimlic.losses import build_loss

    calls = []
    step = Trainer.train_step
    monkeypatch.setattr(Trainer, "train_step", lambda self, batch: calls.append(sorted(batch)) or step(self, batch))
    cfg = load_config(_config(tmp_path, glyph_data, "trmml", train__cache_dir=str(tmp_path / "cache"), train__ema=0.9))
    splits = load_splits(cfg)
    model = build_model_for(cfg, splits.classnames)
    train = build_datasets(cfg, splits, model, "cpu", which=("train",))["train"]
    loss_fn = build_loss(cfg.loss, torch.as_tensor(splits.train.class_counts()), len(splits.train))
    result = _time_steps(cfg, model, loss_fn, train, "fp32", steps=2)
    assert len(calls) == 3 and "feat_local" in calls[-1]  # one warm-up step, two timed: the Trainer's own step
    assert result["s_per_step"] > 0 and result["peak_mib"] > 0
    calls.clear()
    compiled = _time_steps(cfg, model, loss_fn, train, "compile", steps=1)  # in place: EMA finds its names
    assert len(calls) == 4 and compiled["s_per_step"] > 0


@pytest.mark.slow
def test_bench_suite_runs_a_shipped_config(tmp_path, capsys):
    assert main(["bench", "suite", "--out", str(tmp_path / "b"), "--device", "cpu", "--case", "coop"]) == 0
    result = json.loads((tmp_path / "b" / "suite.json").read_text())
    assert [r["variant"] for r in result["rows"]] == ["fp32", "compile"]
    row = result["rows"][0]
    assert row["case"] == "coop" and row["arch"] == "ViT-B-16" and row["step_input"] == "cached features"
    assert row["batch_size"] == 4 and row["steps"] == 2 and row["num_workers"] == 2
    assert row["s_per_step"] > 0 and row["peak_mib"] > 100 and row["data_images_per_s"] > 0
    assert (tmp_path / "b" / "suite.md").read_text() in capsys.readouterr().out
