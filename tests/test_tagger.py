"""The practitioner's path on real run folders: thresholds after training, predict (thresholds, top-k, gallery),
calibrate, export (ONNX / TorchScript equal to predict), TensorBoard scalars equal to metrics.jsonl."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cimlic.apps.cli import main
from cimlic.calibration import Calibration
from cimlic.data.labels import LabelSet, read_classes, read_label_list, write_classes, write_label_list
from cimlic.metrics import threshold_metrics
from cimlic.models import METHODS
from glyphs import CLASSES, GLYPH, _draw_labels, _render

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """320 training and 60 test glyph images (32x32 PNG), long-tailed class frequencies, 1-3 labels each."""
    root = tmp_path_factory.mktemp("tagger_world")
    rng = np.random.default_rng(1)
    glyphs = rng.uniform(0, 1, (len(CLASSES), GLYPH, GLYPH, 3))
    popularity = 1.0 / np.arange(1, len(CLASSES) + 1)
    (root / "images").mkdir()
    write_classes(root / "classes.txt", CLASSES)
    for split, n in (("train", 320), ("test", 60)):
        labels = _draw_labels(n, popularity / popularity.sum(), rng)
        ids = [f"{split}_{i:04d}" for i in range(n)]
        for i, row in zip(ids, labels, strict=True):
            Image.fromarray(_render(row, glyphs, rng)).save(root / "images" / f"{i}.png")
        write_label_list(root / f"{split}.txt", LabelSet(ids, labels, CLASSES))
    return root


def _config(path: Path, world: Path, model: str = "linear_probe", **train) -> Path:
    cfg = {"name": "t", "data": {"classes": str(world / "classes.txt"), "train_labels": str(world / "train.txt"),
                                 "test_labels": str(world / "test.txt"), "image_root": str(world / "images"),
                                 "image_pattern": "{id}.png", "val_fraction": 0.25, "head_threshold": 80,
                                 "tail_threshold": 30},
           "model": {"name": model, "clip_arch": "cimlic-tiny-vit", "random_init": True, "n_ctx": 4,
                     "dualcoop": {"n_ctx_neg": 4}},
           "train": {"epochs": 8, "batch_size": 32, "num_workers": 0, "lr": 0.05,
                     "cache_dir": str(path.parent / "cache"), **train},
           "loss": {"name": "asl"}}  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def run(world, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("tagger_run")
    config = _config(folder / "c.yaml", world, log=["jsonl", "tensorboard"])
    assert main(["train", "--config", str(config), "--run-dir", str(folder / "run")]) == 0
    return folder / "run"


def _test_images(world: Path) -> tuple[list[str], np.ndarray]:
    classes = read_classes(world / "classes.txt")
    test = read_label_list(world / "test.txt", classes)
    return [str(world / "images" / f"{i}.png") for i in test.ids], test.targets


def _predictions(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# ---------------------------------------------------------------------------------- thresholds
def test_thresholds_after_training_are_what_predict_uses(run, world, tmp_path):
    cal = Calibration.load(run / "calibration.json", read_classes(world / "classes.txt"))
    assert cal.split == "val" and cal.rule == "f1" and cal.images == 80  # a quarter of the 320 training images
    tuned = json.loads((run / "eval.json").read_text())["tuned_thresholds"]
    files, targets = _test_images(world)
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--run", str(run), *files, "--out", str(out)]) == 0
    records = _predictions(out)
    probs = np.array([[r["scores"][c] for c in cal.classnames] for r in records])  # (40, C), rounded to 1e-6
    again = threshold_metrics(probs, targets, threshold=np.array(cal.thresholds))
    for key in ("cp", "cr", "cf1", "op", "or", "of1"):  # eval.json's tuned numbers = predict's labels on test
        assert again[key] == pytest.approx(tuned[key], abs=1e-6), key
    assert main(["eval", "--run", str(run)]) == 0  # cimlic eval reports them too
    assert json.loads((run / "eval_test_sklearn.json").read_text())["tuned_thresholds"] == tuned
    for record, row in zip(records, probs, strict=True):  # labels: at or above the class's threshold, best first
        expected = [cal.classnames[k] for k in np.argsort(-row, kind="stable") if row[k] >= cal.thresholds[k]]
        assert [d["label"] for d in record["labels"]] == expected


def test_predict_threshold_top_k_and_gallery(run, world, tmp_path, capsys):
    files, _ = _test_images(world)
    classes = read_classes(world / "classes.txt")
    out, html = tmp_path / "p.jsonl", tmp_path / "g.html"
    argv = ["predict", "--run", str(run), *files[:12], "--out", str(out), "--threshold", "0", "--top-k", "2",
            "--batch-size", "5", "--html", str(html)]  # fmt: skip
    assert main(argv) == 0
    records = _predictions(out)
    assert [len(r["labels"]) for r in records] == [2] * 12  # threshold 0: every class passes, top-k keeps two
    for r in records:
        best = sorted(r["scores"].values(), reverse=True)[:2]
        assert [d["score"] for d in r["labels"]] == best
    page = html.read_text()
    assert page.count('class="card"') == 12 and "data:image/jpeg;base64," in page
    assert "thresholds from --threshold 0" in capsys.readouterr().out
    table = tmp_path / "t.json"
    table.write_text(json.dumps({classes[0]: 1.0}))  # class 0 can never be predicted; the others keep the run's
    assert main(["predict", "--run", str(run), *files[:12], "--out", str(out), "--thresholds", str(table)]) == 0
    cal = Calibration.load(run / "calibration.json")
    for r in _predictions(out):
        assert classes[0] not in [d["label"] for d in r["labels"]]
        expected = [c for c in classes[1:] if r["scores"][c] >= cal.thresholds[classes.index(c)]]
        assert sorted(d["label"] for d in r["labels"]) == sorted(expected)
    for argv, message in (
        (["--top-k", "-1"], "--top-k: -1"), (["--batch-size", "0"], "--batch-size: 0"),
        (["--html", str(tmp_path / "g.txt")], "must name an .html file"),
    ):  # fmt: skip
        assert main(["predict", "--run", str(run), files[0], "--out", str(out), *argv]) == 2
        assert message in capsys.readouterr().err


def test_calibrate_for_a_target_precision(run, tmp_path, capsys):
    copy = tmp_path / "run"
    subprocess.run(["cp", "-r", str(run), str(copy)], check=True)
    before = Calibration.load(copy / "calibration.json")
    assert main(["calibrate", "--run", str(copy), "--target-precision", "0.9"]) == 0
    after = Calibration.load(copy / "calibration.json")
    assert after.rule == "precision" and after.target_precision == 0.9
    for stats in after.per_class:  # reached on the split, or flagged with the best precision it has
        assert stats["note"] or stats["positives"] == 0 or stats["precision"] >= 0.9
    assert (np.array(after.thresholds) >= np.array(before.thresholds) - 1e-12).sum() >= len(before.thresholds) - 1
    tuned = json.loads((copy / "eval.json").read_text())["tuned_thresholds"]
    assert tuned["rule"] == "precision" and tuned["target_precision"] == 0.9
    assert "test at these thresholds" in capsys.readouterr().out
    assert main(["calibrate", "--run", str(copy), "--target-precision", "1.5"]) == 2
    assert "--target-precision: 1.5" in capsys.readouterr().err


def test_a_run_without_validation_split_has_no_thresholds(world, tmp_path, capsys):
    config = _config(tmp_path / "c.yaml", world, epochs=1)
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "r"), "--set",
                 "data.val_fraction=0"]) == 0  # fmt: skip
    assert not (tmp_path / "r" / "calibration.json").exists()
    assert "tuned_thresholds" not in json.loads((tmp_path / "r" / "eval.json").read_text())
    assert main(["calibrate", "--run", str(tmp_path / "r")]) == 2
    assert "has no validation split" in capsys.readouterr().err


# -------------------------------------------------------------------------------------- export
SNIPPET_GUARD = "import sys; sys.modules['cimlic'] = None  # the snippet must not need cimlic\n"


def _snippet(export: Path, image: Path) -> str:
    text = (export / "README.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    assert len(code.strip().splitlines()) <= 10 and "cimlic" not in code
    return SNIPPET_GUARD + code.replace("photo.jpg", str(image))


@pytest.mark.parametrize("fmt", ["onnx", "torchscript"])
def test_export_gives_predict_probabilities(fmt, run, world, tmp_path, capsys):
    from cimlic.apps.export import run_exported

    # real JPEG and PNG files of other sizes than the model's input: the resize is part of what is compared
    files = []
    for k, path in enumerate(_test_images(world)[0][:6]):
        image = Image.open(path).convert("RGB").resize((45 + 7 * k, 38 + 5 * k), Image.BICUBIC)
        files.append(tmp_path / f"img{k}.{'jpg' if k % 2 else 'png'}")
        image.save(files[-1], quality=92) if k % 2 else image.save(files[-1])
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--run", str(run), *map(str, files), "--out", str(out)]) == 0
    expected = _predictions(out)
    export = tmp_path / "export"
    assert main(["export", "--run", str(run), "--format", fmt, "--out", str(export)]) == 0
    info = json.loads((export / "tagger.json").read_text())
    assert info["classes"] == read_classes(world / "classes.txt") and info["max_difference"] <= 1e-4
    assert info["thresholds"] == Calibration.load(run / "calibration.json").thresholds
    size = info["input"]["size"]
    batch = np.stack([(np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR),
                                  dtype=np.float32) / 255.0).transpose(2, 0, 1) for f in files])  # fmt: skip
    probs = run_exported(export / info["file"], fmt, batch)  # (6, C)
    want = np.array([[r["scores"][c] for c in info["classes"]] for r in expected])
    np.testing.assert_allclose(probs, want, atol=1e-4)
    if fmt == "onnx":  # the README's snippet, run without cimlic, prints predict's labels of the image
        proc = subprocess.run([sys.executable, "-c", _snippet(export, files[1])], capture_output=True, text=True,
                              check=True)  # fmt: skip
        labels = [(d["label"], round(d["score"], 3)) for d in expected[1]["labels"]]
        assert sorted(eval(proc.stdout)) == sorted(labels)  # noqa: S307 (our own printed list)
    assert main(["export", "--run", str(run), "--format", fmt, "--out", str(export)]) == 0  # its own folder: again
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    assert main(["export", "--run", str(run), "--format", fmt, "--out", str(tmp_path / "mine")]) == 2
    assert "holds files cimlic did not write" in capsys.readouterr().err
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


@pytest.mark.slow
@pytest.mark.parametrize("model", [name for name, spec in METHODS.items() if spec.build is not None])
def test_every_method_exports_to_onnx(model, world, tmp_path):
    """Each method's whole scoring path (frozen towers, trained parts, fused score) survives the ONNX export."""
    config = _config(tmp_path / "c.yaml", world, model, epochs=1)
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]) == 0
    assert main(["export", "--run", str(tmp_path / "run"), "--out", str(tmp_path / "export")]) == 0
    assert json.loads((tmp_path / "export" / "tagger.json").read_text())["max_difference"] <= 1e-4


# --------------------------------------------------------------------------------- TensorBoard
def _tensorboard(run: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _jsonl_scalars(run: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        prefix = record.get("split", "train")
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, int | float):
                out.setdefault(f"{prefix}/{key}", []).append((record["step"], value))
    return out


def test_tensorboard_has_the_scalars_of_metrics_jsonl(run):
    board, jsonl = _tensorboard(run), _jsonl_scalars(run)
    assert set(board) == set(jsonl) and {"train/loss", "train/lr", "val/map", "val/head", "test/map"} <= set(board)
    for tag, values in jsonl.items():
        assert [s for s, _ in board[tag]] == [s for s, _ in values], tag
        np.testing.assert_allclose([v for _, v in board[tag]], [v for _, v in values], rtol=1e-6, err_msg=tag)


def test_tensorboard_after_resume_has_each_step_once(world, tmp_path, capsys):
    config = _config(tmp_path / "c.yaml", world, epochs=1, log=["jsonl", "tensorboard"], log_every=1)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    epoch_one = (run / "state.pt").read_bytes()
    resume = ["train", "--config", str(config), "--run-dir", str(run), "--resume", "--set", "train.epochs=2"]
    assert main(resume) == 0
    (run / "state.pt").write_bytes(epoch_one)  # as if killed after epoch 2's steps were logged, before its state
    assert main(resume) == 0
    board, jsonl = _tensorboard(run), _jsonl_scalars(run)
    steps = [s for s, _ in board["train/loss"]]
    assert steps == list(range(1, steps[-1] + 1)) and steps[-1] > 8 and steps == [s for s, _ in jsonl["train/loss"]]
    np.testing.assert_allclose([v for _, v in board["train/loss"]], [v for _, v in jsonl["train/loss"]], rtol=1e-6)
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "r2"), "--set",
                 "train.log=[jsonl, wandb]"]) == 2  # fmt: skip
    assert "train.log" in capsys.readouterr().err


def test_readme_shows_the_exported_snippet():
    from cimlic.apps.export import SNIPPET

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    snippet = SNIPPET.format(dir="tagger")
    assert "\n".join("   " + line if line else "" for line in snippet.splitlines()) in readme
    assert len(snippet.strip().splitlines()) <= 10


# ------------------------------------------------------------------------------- odd cases of the path
def test_predict_with_no_readable_image_writes_an_empty_file(run, tmp_path, capsys):
    bad = tmp_path / "bad.jpg"
    bad.write_text("not an image")
    out = tmp_path / "deep" / "er" / "p.jsonl"  # parent folders are made
    assert main(["predict", "--run", str(run), str(bad), "--out", str(out)]) == 0
    assert out.read_text() == "" and "0 image(s) scored, 1 unreadable" in capsys.readouterr().out


def test_export_refuses_another_commands_folder(run, tmp_path, capsys):
    folder = tmp_path / "imported"
    images = tmp_path / "images"
    images.mkdir()
    rows = []
    for i in range(6):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(images / f"{i}.png")
        rows.append(f"{i}.png,{CLASSES[i % 2]}")
    (tmp_path / "tags.csv").write_text("\n".join(rows) + "\n")
    assert main(["import", str(tmp_path / "tags.csv"), "--images", str(images), "--out", str(folder),
                 "--split", "0.5", "0.5"]) == 0  # fmt: skip
    before = sorted(p.name for p in folder.iterdir())
    capsys.readouterr()
    assert main(["export", "--run", str(run), "--format", "torchscript", "--out", str(folder)]) == 2
    assert "cimlic import" in capsys.readouterr().err and sorted(p.name for p in folder.iterdir()) == before


def test_calibration_file_needs_a_positive_scale(run, tmp_path):
    from cimlic.config import ConfigError

    data = json.loads((run / "calibration.json").read_text())
    for scale in (0.0, -1.0):
        path = tmp_path / "c.json"
        path.write_text(json.dumps(data | {"scale": scale}))
        with pytest.raises(ConfigError, match="a scale > 0"):
            Calibration.load(path)


def test_calibrate_rule_f1_with_a_target_precision_is_refused(run, capsys):
    assert main(["calibrate", "--run", str(run), "--rule", "f1", "--target-precision", "0.9"]) == 2
    assert "--target-precision goes with --rule precision" in capsys.readouterr().err


def test_calibration_scores_in_float32_even_under_amp(world, tmp_path, monkeypatch):
    """train.amp evaluates in bf16 on a GPU; the thresholds are chosen on predict's float32 scores instead."""
    import cimlic.apps.calibrate as calibrate_app
    import cimlic.engine as engine

    seen = []
    real = engine.forward_all

    def spy(model, dataset, train_cfg, *args, **kw):
        seen.append(train_cfg.amp)
        return real(model, dataset, train_cfg, *args, **kw)

    monkeypatch.setattr(engine, "forward_all", spy)
    monkeypatch.setattr(calibrate_app, "amp_active", lambda cfg, device: True)  # as on a GPU with train.amp
    config = _config(tmp_path / "c.yaml", world, epochs=1, amp=True)
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "r")]) == 0
    assert seen[-2:] == [False, False]  # val, then test scored again (the Trainer's test scores were under amp)
    assert json.loads((tmp_path / "r" / "eval.json").read_text())["tuned_thresholds"]["split"] == "test"


def test_tensorboard_after_a_start_with_nothing_to_resume(world, tmp_path):
    """Killed before its first state.pt: the restart's events replace the first attempt's, step for step."""
    config = _config(tmp_path / "c.yaml", world, epochs=1, log=["jsonl", "tensorboard"], log_every=1)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    (run / "state.pt").unlink()
    assert main(["train", "--config", str(config), "--run-dir", str(run), "--resume"]) == 0
    board, jsonl = _tensorboard(run), _jsonl_scalars(run)
    assert (
        [s for s, _ in board["train/loss"]] == [s for s, _ in jsonl["train/loss"]] == list(range(1, 9))
    )  # 240 images, batches of 32


def test_calibrate_a_run_trained_in_stages_updates_its_top_eval(world, tmp_path):
    config = _config(tmp_path / "c.yaml", world, "hpdval", epochs=1)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run), "--set", "model.hpdval.stage2_epochs=1"]) == 0
    top = json.loads((run / "eval.json").read_text())
    assert top["tuned_thresholds"] == json.loads((run / "stage2" / "eval.json").read_text())["tuned_thresholds"]
    assert main(["calibrate", "--run", str(run), "--target-precision", "0.9"]) == 0
    for folder in (run, run / "stage2"):
        tuned = json.loads((folder / "eval.json").read_text())["tuned_thresholds"]
        assert tuned["rule"] == "precision" and tuned["target_precision"] == 0.9, folder
    assert Calibration.load(run / "stage2" / "calibration.json").rule == "precision"
