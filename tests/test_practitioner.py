"""README "Train a tagger on your own images", end to end: a folder of JPEG/PNG files and a tags CSV, imported,
trained, predicted, exported and applied without cimlic. The images are the Digits world's, re-saved as a user's
photos (sub-folders, JPEG and PNG, other sizes); the CLIP is the demo's pre-trained tiny CLIP (cached in
checkpoints/digits, as the demo test uses it)."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cimlic.apps.cli import main
from cimlic.data.labels import read_classes, read_label_list
from runs import chance_map

REPO = Path(__file__).resolve().parents[1]


def _save(source: Path, target: Path, k: int) -> None:
    """A user's copy of an image: JPEG or PNG, 40-56 px (the model resizes to its input)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    size = 40 + (k % 5) * 4
    image = Image.open(source).convert("RGB").resize((size, size + (k % 3) * 2), Image.BICUBIC)
    image.save(target, quality=95) if target.suffix == ".jpg" else image.save(target)


def _photos(world: Path, tmp: Path) -> tuple[Path, Path, list[str], np.ndarray]:
    """photos/ + photos.csv (the world's train and val images) and new_photos/ (its test images, with labels)."""
    classes = read_classes(world / "classes.txt")
    rows = ["path,tags"]
    for split in ("train", "val"):
        labels = read_label_list(world / f"{split}.txt", classes)
        for r, i in enumerate(labels.ids):
            name = f"{'holiday' if r % 2 else 'garden'}/{i}.{'jpg' if r % 3 else 'png'}"
            _save(world / "images" / f"{i}.png", tmp / "photos" / name, r)
            rows.append(f"{name},{';'.join(classes[k] for k in labels.positives(r))}")
    (tmp / "photos" / "garden" / "broken.jpg").write_bytes(b"\xff\xd8 not really a JPEG")
    rows.append("garden/broken.jpg,zero")
    (tmp / "photos.csv").write_text("\n".join(rows) + "\n")
    test = read_label_list(world / "test.txt", classes)
    files = []  # as predict names them, run from ``tmp``: new_photos/<file>
    for r, i in enumerate(test.ids):
        files.append(f"new_photos/{i}.{'jpg' if r % 2 else 'png'}")
        _save(world / "images" / f"{i}.png", tmp / files[-1], r)
    return tmp / "photos", tmp / "photos.csv", files, test.targets


def readme_commands() -> list[str]:
    """The command lines of the README's "Train a tagger on your own images" block, as a user would paste them."""
    text = (REPO / "README.md").read_text().split("## Train a tagger on your own images", 1)[1]
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def _predictions(path: Path, classes: list[str]) -> tuple[dict[str, list[str]], dict[str, np.ndarray]]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    labels = {r["image"]: [d["label"] for d in r["labels"]] for r in records}
    return labels, {r["image"]: np.array([r["scores"][c] for c in classes]) for r in records}


def _f1(labels: dict[str, list[str]], files: list[str], truth: np.ndarray, classes: list[str]) -> float:
    predicted = np.array([[c in labels[f] for c in classes] for f in files])
    tp = (predicted & (truth == 1)).sum()
    return 2 * tp / (predicted.sum() + (truth == 1).sum())


@pytest.mark.slow
def test_train_a_tagger_on_your_own_images(tmp_path, monkeypatch):
    from cimlic.digits.pretrain import ARCH, pretrain_digits
    from cimlic.digits.world import build_digits_world

    checkpoint = pretrain_digits(REPO / "checkpoints" / "digits", seed=0)  # cached after the first time
    build_digits_world(tmp_path / "world", seed=0)
    photos, csv, new, truth = _photos(tmp_path / "world", tmp_path)
    new, truth = zip(*sorted(zip(new, truth, strict=True)), strict=True)  # predict's order: sorted paths
    truth = np.array(truth)
    classes = read_classes(tmp_path / "world" / "classes.txt")
    monkeypatch.chdir(tmp_path)
    tiny = [f"model.clip_arch={ARCH}", f"model.clip_checkpoint={checkpoint}", "train.optimizer=adamw", "train.lr=5e-3",
            "train.epochs=10", "train.warmup_steps=10", "train.num_workers=0"]  # fmt: skip
    sets = [a for item in tiny for a in ("--set", item)]

    commands = readme_commands()  # the README's five lines, run as written (the train line gets the tiny CLIP)
    assert [c.split()[:2] for c in commands] == [["cimlic", "import"], ["cimlic", "train"], ["cimlic", "predict"],
                                                 ["cimlic", "export"], ["python", "apply_tagger.py"]]  # fmt: skip
    Path("configs").symlink_to(REPO / "configs")
    imp, train, predict, export, _ = (shlex.split(c)[1:] for c in commands)

    # 1. import: checked, split, listed
    assert main(imp) == 0
    stats = json.loads(Path("data/mine/stats.json").read_text())
    assert [b["image"] for b in stats["bad_images"]] == ["garden/broken.jpg"]
    assert stats["images"]["total"] == len(csv.read_text().splitlines()) - 2  # header and the broken one
    assert not any(stats["absent_classes"].values())  # every class in train, val and test
    # 2. train (the tagger config + the import's data.yaml): thresholds chosen on val
    assert main([*train, *sets]) == 0
    result = json.loads(Path("runs/mine/eval.json").read_text())
    assert result["map"] > chance_map("data/mine/test.txt", "data/mine/classes.txt") + 30
    assert result["tuned_thresholds"]["cf1"] > result["cf1"] - 1  # per-class F1-optimal thresholds do not lose CF1
    # 3. predict new images, with a gallery
    assert main(predict) == 0
    labels, scores = _predictions(Path("predictions.jsonl"), classes)
    assert len(labels) == len(new) and Path("gallery.html").read_text().count('class="card"') == len(new)
    assert _f1(labels, new, truth, classes) > 0.6
    # 4. export, 5. apply without cimlic: the export README's snippet, saved as apply_tagger.py, prints predict's labels
    assert main(export) == 0
    readme = Path("tagger/README.md").read_text()
    snippet = readme.split("```python\n", 1)[1].split("```", 1)[0].replace("photo.jpg", new[1])
    Path("apply_tagger.py").write_text("import sys; sys.modules['cimlic'] = None\n" + snippet)
    out = subprocess.run([sys.executable, "apply_tagger.py"], capture_output=True, text=True, check=True).stdout
    assert sorted(c for c, _ in eval(out)) == sorted(labels[new[1]])  # noqa: S307 (the snippet's own printed list)
    import onnxruntime as ort

    info = json.loads(Path("tagger/tagger.json").read_text())
    session, size = ort.InferenceSession("tagger/tagger.onnx"), info["input"]["size"]
    batch = np.stack([(np.asarray(Image.open(f).convert("RGB").resize((size, size), Image.BILINEAR),
                                  dtype=np.float32) / 255.0).transpose(2, 0, 1) for f in new])  # fmt: skip
    probs = session.run(None, {"image": batch})[0]  # (N, C), C in the model's order: the import's classes.txt
    _, scores = _predictions(Path("predictions.jsonl"), info["classes"])
    np.testing.assert_allclose(probs, np.stack([scores[f] for f in new]), atol=1e-4)

    # the fixed 0.5 on sigmoid(100 cos) labels nearly every class of a zero-shot run; its thresholds do not
    zeroshot = [*train, *sets, "--set", "model.name=zeroshot"]
    zeroshot[zeroshot.index("--run-dir") + 1] = "runs/zs"
    assert main(zeroshot) == 0
    assert main(["predict", "--run", "runs/zs", "new_photos", "--out", "zs.jsonl"]) == 0
    Path("runs/zs/calibration.json").rename("runs/zs/calibration.off")
    assert main(["predict", "--run", "runs/zs", "new_photos", "--out", "zs_raw.jsonl"]) == 0
    tuned, _ = _predictions(Path("zs.jsonl"), classes)
    raw, _ = _predictions(Path("zs_raw.jsonl"), classes)
    per_image = {name: np.mean([len(v) for v in d.values()]) for name, d in (("tuned", tuned), ("raw", raw))}
    true_per_image = (truth == 1).sum(axis=1).mean()
    assert per_image["raw"] > 3 * true_per_image and abs(per_image["tuned"] - true_per_image) < 0.5 * true_per_image
    assert _f1(tuned, new, truth, classes) > _f1(raw, new, truth, classes) + 0.2
