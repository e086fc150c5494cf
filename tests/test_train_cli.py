"""End to end through main(argv): train / eval / predict for every model on a tiny CLIP and generated images."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from cimlic.apps.cli import main
from cimlic.calibration import Calibration
from cimlic.data.labels import read_classes, read_label_list
from cimlic.models import METHODS
from glyphs import build_world
from runs import sklearn_map


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("world")
    build_world(root, n_pool=300, n_test=60, n_max=90, seed=0)
    classes = read_classes(root / "classes.txt")
    train = read_label_list(root / "train.txt", classes)
    captions = [
        f"{i}\ta picture with " + " and ".join(classes[k] for k in train.positives(r)) for r, i in enumerate(train.ids)
    ]
    (root / "captions.txt").write_text("\n".join(captions) + "\n")
    return root


def write_config(path: Path, world: Path, model: str, **extra) -> Path:
    cfg = {
        "name": f"tiny_{model}",
        "data": {"classes": str(world / "classes.txt"), "train_labels": str(world / "train.txt"),
                 "test_labels": str(world / "test.txt"), "image_root": str(world / "images"),
                 "image_pattern": "{id}.png"},
        "model": {"name": model, "clip_arch": "cimlic-tiny-vit", "random_init": True, "n_ctx": 4,
                  "dualcoop": {"n_ctx_neg": 4}},
        "train": {"epochs": 1, "batch_size": 16, "num_workers": 0, "lr": 0.01, "cache_dir": str(path.parent / "cache")},
        "loss": {"name": "lmpt" if model == "lmpt" else "asl"},
    }  # fmt: skip
    if model == "lmpt":
        cfg["data"]["captions"] = str(world / "captions.txt")
    for key, value in extra.items():
        section, field = key.split("__")
        cfg[section][field] = value
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.parametrize("model", [name for name, spec in METHODS.items() if spec.build is not None])
def test_train_eval_predict(model, world, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", world, model)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["map"] == pytest.approx(sklearn_map(run), abs=1e-6)  # the saved best re-scored, sklearn's AP
    assert result["split"] == "test" and result["selected_on"] == "val"
    for name in ("config.yaml", "metrics.jsonl", "log.txt", "best.safetensors", "best.json", "clip.json"):
        assert (run / name).is_file(), name
    assert main(["eval", "--run", str(run), "--ap", "voc07_11pt"]) == 0
    again = json.loads((run / "eval_test_voc07_11pt.json").read_text())
    assert again["ap_variant"] == "voc07_11pt" and again["num_images"] == 60
    assert main(["eval", "--run", str(run)]) == 0  # same checkpoint, same AP variant: the same mAP
    assert json.loads((run / "eval_test_sklearn.json").read_text())["map"] == pytest.approx(result["map"], abs=1e-9)
    out = tmp_path / "p.jsonl"
    (tmp_path / "broken.png").write_bytes(b"not an image")
    image = world / "images" / "test_00000.png"
    assert main(["predict", "--run", str(run), str(image), str(tmp_path / "broken.png"), "--out", str(out)]) == 0
    lines = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(lines) == 1 and lines[0]["image"] == str(image) and len(lines[0]["scores"]) == 8
    assert "1 image(s) scored, 1 unreadable" in capsys.readouterr().out


def test_predict_matches_eval_logits(world, tmp_path):
    """Scores written by predict are the run's calibration of the logits the evaluator used (same transform, same
    weights); with no calibration.json, sigmoid of them."""
    import torch

    from cimlic.apps.runner import build_datasets, load_run, load_splits
    from cimlic.distributed import resolve_device
    from cimlic.engine import forward_all

    run = tmp_path / "run"
    assert (
        main(["train", "--config", str(write_config(tmp_path / "c.yaml", world, "coop")), "--run-dir", str(run)]) == 0
    )
    cfg, model, _ = load_run(run)
    splits = load_splits(cfg)
    test = build_datasets(cfg, splits, model, "cpu", which=("test",))["test"]
    logits, _ = forward_all(model, test, cfg.train, resolve_device("cpu"), 8)
    out = tmp_path / "p.csv"
    files = [str(world / "images" / f"{i}.png") for i in splits.test.ids[:5]]
    assert main(["predict", "--run", str(run), *files, "--out", str(out)]) == 0
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    probs = np.array([[float(v) for v in r[2:]] for r in rows])
    cal = Calibration.load(run / "calibration.json")
    np.testing.assert_allclose(probs, cal.probabilities(logits[:5].numpy()), atol=1e-5)
    (run / "calibration.json").unlink()
    assert main(["predict", "--run", str(run), *files, "--out", str(out)]) == 0
    rows = [line.split(",") for line in out.read_text().splitlines()[1:]]
    probs = np.array([[float(v) for v in r[2:]] for r in rows])
    np.testing.assert_allclose(probs, torch.sigmoid(logits[:5]).numpy(), atol=1e-5)


def test_train_errors(world, tmp_path, capsys):
    config = write_config(tmp_path / "c.yaml", world, "coop")
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    before = sorted(p.name for p in run.iterdir())
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 2  # never overwrite a run
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in run.iterdir()) == before
    assert main(["train", "--config", str(config), "--set", "model.nme=x", "--run-dir", str(tmp_path / "r2")]) == 2
    assert "unknown key 'nme' in model" in capsys.readouterr().err
    bad = write_config(tmp_path / "b.yaml", world, "coop", data__image_pattern="{id}.jpg")
    assert main(["train", "--config", str(bad), "--run-dir", str(tmp_path / "r3")]) == 2
    err = capsys.readouterr().err
    assert ".jpg: image file not found" in err and err.count("\n") == 1
    nockpt = write_config(tmp_path / "n.yaml", world, "coop", model__random_init=False)
    assert main(["train", "--config", str(nockpt), "--run-dir", str(tmp_path / "r4")]) == 2
    assert "random_init" in capsys.readouterr().err
    nocap = write_config(tmp_path / "l.yaml", world, "coop", loss__name="lmpt")
    assert main(["train", "--config", str(nocap), "--run-dir", str(tmp_path / "r5")]) == 2
    err = capsys.readouterr().err
    assert "loss.name=lmpt needs ['caption_emb', 'prompt_emb'] from the model" in err and "model.name=lmpt" in err
    assert not (tmp_path / "r5").exists()  # refused before anything was computed or written
    nocap = write_config(tmp_path / "m.yaml", world, "lmpt")
    nocap.write_text(nocap.read_text().replace("captions: " + str(world / "captions.txt"), "captions: ''"))
    assert main(["train", "--config", str(nocap), "--run-dir", str(tmp_path / "r6")]) == 2
    assert "needs data.captions" in capsys.readouterr().err and not (tmp_path / "r6").exists()


@pytest.mark.slow
def test_torchrun_two_processes(world, tmp_path):
    """`torchrun --nproc_per_node 2 -m cimlic train` (gloo on CPU) trains, gathers and writes one run folder."""
    import subprocess
    import sys

    config = write_config(tmp_path / "c.yaml", world, "coop", train__batch_size=8)
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cimlic", "train", "--config", str(config), "--run-dir", str(run)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads((run / "eval.json").read_text())
    assert result["num_images"] == 60  # every test image scored once, gathered from the two ranks
    assert result["map"] == pytest.approx(sklearn_map(run), abs=1e-6)  # = one process re-scoring the checkpoint
    assert proc.stdout.count("run folder:") == 1  # only rank 0 reports


def test_hpdval_two_stages_in_one_run(world, tmp_path):
    """model.name=hpdval: stage 1, then stage 2 on its student, in one run folder; eval and predict use stage 2."""
    from safetensors.torch import load_file

    config = write_config(tmp_path / "c.yaml", world, "hpdval", loss__name="db_star")
    cfg = yaml.safe_load(config.read_text())
    cfg["model"]["hpdval"] = {"topk": 8, "stage2_epochs": 1, "stage2_lr": 0.01}
    config.write_text(yaml.safe_dump(cfg))
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    assert (run / "stage1" / "eval.json").is_file() and (run / "stage2" / "eval.json").is_file()
    combined = json.loads((run / "eval.json").read_text())
    assert combined["map"] == json.loads((run / "stage2" / "eval.json").read_text())["map"]
    stage2_cfg = yaml.safe_load((run / "stage2" / "config.yaml").read_text())
    assert stage2_cfg["model"]["name"] == "hpdval_stage2" and stage2_cfg["train"]["lr"] == 0.01
    assert Path(stage2_cfg["model"]["hpdval"]["stage1_run"]) == (run / "stage1").resolve()
    assert set(load_file(run / "stage2" / "best.safetensors")) == {"prompt_global.ctx", "prompt_local.ctx"}
    assert main(["eval", "--run", str(run)]) == 0
    assert main(["report", str(run / "stage1"), str(run / "stage2"), "--out", str(tmp_path / "r.html")]) == 0
    assert "<svg" in (tmp_path / "r.html").read_text()
    assert main(["train", "--config", str(config), "--run-dir", str(run), "--resume"]) == 0  # both stages done
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--run", str(run), str(world / "images" / "test_00001.png"), "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 1
