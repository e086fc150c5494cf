"""Hostile and odd input: one line naming the file or key (exit 2), never a traceback, a silent wrong result or a
lost file. Disk-full and read-only cases mount a small tmpfs (root only; skipped with a reason otherwise)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from cimlic.apps.cli import main
from cimlic.data.dataset import ImageFileError, load_image
from cimlic.errors import ConfigError
from cimlic.io import OUTPUT_MARKER, WriteError, atomic_write_text, clean_stale_temps, read_json

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ helpers
def _config(tmp_path: Path, glyph_data: dict, name: str = "c", **sections) -> Path:
    cfg = {"name": name, "data": dict(glyph_data),
           "model": {"name": "coop", "clip_arch": "cimlic-tiny-vit", "random_init": True, "n_ctx": 4},
           "train": {"epochs": 1, "batch_size": 16, "num_workers": 0, "lr": 0.01, "cache_dir": str(tmp_path / "cache")},
           "loss": {"name": "asl"}}  # fmt: skip
    for section, values in sections.items():
        cfg[section].update(values)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _error(capsys) -> str:
    """The one error line a failed command printed (asserting there is exactly one)."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.startswith("cimlic: error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-2000:]
    return lines[0]


@pytest.fixture
def tmpfs(tmp_path):
    """Mount a 1 MiB tmpfs; yields (mount point, fill(free_bytes), read_only())."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    point = tmp_path / "tmpfs"
    point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")

    def fill(leave: int) -> None:
        free = shutil.disk_usage(point).free
        (point / "filler").write_bytes(b"\0" * max(0, free - leave))

    def read_only() -> None:
        subprocess.run(["mount", "-o", "remount,ro", str(point)], check=True)

    yield point, fill, read_only
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


# ------------------------------------------------------------------------------ disk full, read-only
@pytest.mark.parametrize("free", [2000, 16384, 45056], ids=["at-start", "logs", "checkpoints"])
def test_disk_full_during_train_is_one_line(glyph_data, tmp_path, tmpfs, capsys, free):
    point, fill, _ = tmpfs
    fill(free)  # the run folder needs about 80 KB: each size runs out at another write
    assert main(["train", "--config", str(_config(tmp_path, glyph_data)), "--run-dir", str(point / "run")]) == 2
    line = _error(capsys)
    assert str(point / "run") in line and "No space left on device" in line
    assert not list((point / "run").glob(".*.tmp")) if (point / "run").is_dir() else True


def test_disk_full_during_cache_build_and_resume(glyph_data, tmp_path, tmpfs, capsys):
    point, fill, _ = tmpfs
    config = _config(tmp_path, glyph_data, train={"cache_dir": str(point / "cache")})
    fill(1500)
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    assert str(point / "cache") in _error(capsys)
    (point / "filler").unlink()
    config = _config(tmp_path, glyph_data, "r", train={"epochs": 2})
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "r"), "--set", "train.epochs=1"]) == 0
    shutil.copytree(tmp_path / "r", point / "r")
    state = (point / "r" / "state.pt").read_bytes()
    fill(300)
    assert main(["train", "--config", str(config), "--run-dir", str(point / "r"), "--resume"]) == 2
    assert "No space left on device" in _error(capsys)
    assert (point / "r" / "state.pt").read_bytes() == state  # the resume state is never half-written
    assert not list((point / "r").glob(".*.tmp"))  # no temporary file left behind


def test_read_only_run_folder_eval_prints_the_metrics(glyph_data, tmp_path, tmpfs, capsys):
    point, _, read_only = tmpfs
    run = point / "run"
    assert main(["train", "--config", str(_config(tmp_path, glyph_data)), "--run-dir", str(run)]) == 0
    expected = json.loads((run / "eval.json").read_text())["map"]
    capsys.readouterr()
    read_only()
    assert main(["eval", "--run", str(run)]) == 2
    out, err = capsys.readouterr()
    assert "Read-only file system" in err and "printed above" in err and "Traceback" not in err
    printed = json.loads(out.strip().splitlines()[-1])
    assert printed["map"] == pytest.approx(expected, abs=1e-9)


def test_read_only_cache_and_predict_output(glyph_data, tmp_path, tmpfs, capsys):
    point, _, read_only = tmpfs
    (point / "cache").mkdir()
    run = tmp_path / "run"
    assert main(["train", "--config", str(_config(tmp_path, glyph_data)), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    read_only()
    config = _config(tmp_path, glyph_data, "ro", train={"cache_dir": str(point / "cache")})
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "ro")]) == 2
    assert str(point / "cache") in _error(capsys)
    image = str(sorted(Path(glyph_data["image_root"]).glob("*.png"))[0])
    assert main(["predict", "--run", str(run), image, "--out", str(point / "p.jsonl")]) == 2
    assert "p.jsonl" in _error(capsys)


def test_write_failures_of_every_writer_become_one_error(tmp_path, monkeypatch):
    """Without a tmpfs: a write that fails with ENOSPC (or a safetensors / torch.save error) is a WriteError."""
    from cimlic import io

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io.os, "replace", full)
    with pytest.raises(WriteError, match=r"x\.txt: cannot write \(No space left on device\)"):
        atomic_write_text(tmp_path / "x.txt", "hello")
    monkeypatch.undo()
    full_disk = pytest.raises(WriteError, match=r"y\.pt: cannot write \(No space left on device\)")
    with full_disk, io.atomic_path(tmp_path / "y.pt"):  # torch.save's own error, the OS error in its chain
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as err:
            raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed") from err
    assert not list(tmp_path.glob(".*.tmp"))
    with pytest.raises(RuntimeError, match="a bug"), io.atomic_path(tmp_path / "z.pt"):
        raise RuntimeError("a bug")  # not a file-system failure: keeps its type


def test_output_paths_that_cannot_be_written(glyph_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(_config(tmp_path, glyph_data)), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    image = str(sorted(Path(glyph_data["image_root"]).glob("*.png"))[0])
    (tmp_path / "folder.jsonl").mkdir()
    assert main(["predict", "--run", str(run), image, "--out", str(tmp_path / "folder.jsonl")]) == 2
    assert "names a folder" in _error(capsys)
    (tmp_path / "afile").write_text("x")
    argv = ["split", "partial", "--labels", glyph_data["train_labels"], "--classes", glyph_data["classes"],
            "--known", "0.5", "--out", str(tmp_path / "afile" / "out.txt")]  # fmt: skip
    assert main(argv) == 2
    assert "afile" in _error(capsys)


# ------------------------------------------------------------------------------------------ images
def _bomb_png(path: Path, side: int = 40000) -> None:
    """A tiny PNG that claims ``side`` x ``side`` pixels (a decompression bomb)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_decompression_bomb_refused_in_training_skipped_in_predict(glyph_data, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(glyph_data["image_root"], images)
    train_ids = [ln.split("\t")[0] for ln in Path(glyph_data["train_labels"]).read_text().splitlines()[1:]]
    _bomb_png(images / f"{train_ids[0]}.png")
    assert (images / f"{train_ids[0]}.png").stat().st_size < 200
    with pytest.raises(ImageFileError, match="claims too many pixels"):
        load_image(images / f"{train_ids[0]}.png")
    config = _config(tmp_path, glyph_data, data={"image_root": str(images)})
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    assert f"{train_ids[0]}.png: refused, the image claims too many pixels" in _error(capsys)
    good = _config(tmp_path, glyph_data, "good")
    assert main(["train", "--config", str(good), "--run-dir", str(tmp_path / "good")]) == 0
    capsys.readouterr()
    out = tmp_path / "p.jsonl"
    assert main(["predict", "--run", str(tmp_path / "good"), str(images), "--out", str(out)]) == 0
    assert "unreadable" in capsys.readouterr().out and "claims too many pixels" not in out.read_text()


def test_corrupt_image_in_a_loader_worker_is_one_line(glyph_data, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(glyph_data["image_root"], images)
    train_ids = [ln.split("\t")[0] for ln in Path(glyph_data["train_labels"]).read_text().splitlines()[1:]]
    victim = images / f"{train_ids[-1]}.png"
    victim.write_bytes(victim.read_bytes()[:60])  # truncated
    config = _config(tmp_path, glyph_data, data={"image_root": str(images)},
                     model={"name": "hpdval_stage1", "hpdval": {"topk": 4}}, train={"num_workers": 1})  # fmt: skip
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "run")]) == 2
    line = _error(capsys)
    assert str(victim) in line and "cannot decode image" in line and "Original Traceback" not in line


@pytest.mark.parametrize("mode", ["I;16", "I", "F", "CMYK", "P-transparent", "LA"])
def test_image_modes_decode_like_their_8_bit_image(tmp_path, mode):
    grey = np.random.default_rng(0).integers(0, 256, (6, 9)).astype(np.uint8)
    if mode == "I;16":
        im, want = Image.fromarray(grey.astype(np.uint16) * 257), grey
    elif mode == "I":
        im, want = Image.fromarray(grey.astype(np.int32) * 257, mode="I"), grey
    elif mode == "F":
        im, want = Image.fromarray(grey.astype(np.float32) / 255.0, mode="F"), grey
    elif mode == "CMYK":
        rgb = Image.fromarray(np.stack([grey] * 3, axis=-1))
        im, want = rgb.convert("CMYK"), np.asarray(rgb.convert("CMYK").convert("RGB"))[..., 0]
    elif mode == "P-transparent":
        im = Image.fromarray(grey).convert("P")
        im.info["transparency"] = 0
        want = np.asarray(im.convert("RGBA").convert("RGB"))[..., 0]
    else:
        im, want = Image.fromarray(np.stack([grey, np.full_like(grey, 128)], axis=-1), mode="LA"), grey
    path = tmp_path / ("x.tif" if mode in ("I", "F", "CMYK") else "x.png")
    im.save(path)
    decoded = np.asarray(load_image(path))
    assert decoded.dtype == np.uint8 and decoded.shape == (*grey.shape, 3)
    np.testing.assert_array_equal(decoded[..., 0], want)
    assert mode != "I;16" or set(np.unique(np.asarray(Image.open(path).convert("RGB")))) <= {0, 255}  # PIL alone


# ------------------------------------------------------------------------------------ text files
def test_byte_order_marks_are_dropped_and_latin1_is_named(glyph_data, tmp_path, capsys):
    from cimlic.data.labels import LabelFileError, read_classes, read_label_list

    classes = tmp_path / "classes.txt"
    classes.write_bytes(b"\xef\xbb\xbf" + Path(glyph_data["classes"]).read_bytes())
    names = read_classes(classes)
    assert names == read_classes(glyph_data["classes"]) and not names[0].startswith("\ufeff")
    labels = tmp_path / "train.txt"
    labels.write_bytes(b"\xef\xbb\xbf" + Path(glyph_data["train_labels"]).read_bytes())
    assert read_label_list(labels, names).ids == read_label_list(glyph_data["train_labels"], names).ids
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9\ncr\xe8me\n".encode("latin-1"))
    with pytest.raises(LabelFileError, match=r"latin\.txt: class file is not UTF-8 text \(byte 0xe9"):
        read_classes(latin)
    with pytest.raises(LabelFileError, match=r"latin\.txt: label list is not UTF-8"):
        read_label_list(latin, names)


def test_coco_files_with_bad_entries_are_named(tmp_path):
    from cimlic.data.formats import read_coco
    from cimlic.data.labels import LabelFileError

    base = {"images": [{"id": 1, "file_name": "1.jpg", "width": 64, "height": 64}],
            "categories": [{"id": 1, "name": "cat"}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25}]}  # fmt: skip
    path = tmp_path / "instances.json"
    path.write_text(json.dumps(base | {"annotations": base["annotations"] + [
        {"id": 8, "image_id": 99, "category_id": 1, "bbox": [0, 0, 5, 5], "area": 25}]}))  # fmt: skip
    with pytest.raises(LabelFileError, match="annotation 8 is for image id 99"):
        read_coco(path)
    path.write_text(json.dumps(base | {"images": [{"id": 1, "file_name": "1.jpg", "width": "wide", "height": 64}]}))
    with pytest.raises(LabelFileError, match="image 1 has a non-numeric width"):
        read_coco(path)
    path.write_text(json.dumps(base | {"annotations": [{"id": 9, "image_id": 1, "category_id": 1}]}))
    with pytest.raises(LabelFileError, match=r"instances\.json: malformed annotation 9 \(missing key 'bbox'\)"):
        read_coco(path)
    path.write_text(json.dumps(base | {"annotations": ["not a dict"]}))
    with pytest.raises(LabelFileError, match=r"malformed annotation \? \(TypeError: "):
        read_coco(path)
    path.write_text(json.dumps({k: v for k, v in base.items() if k != "annotations"}))
    with pytest.raises(LabelFileError, match=r"instances\.json: not a COCO instances file \(no 'annotations' list\)"):
        read_coco(path)
    path.write_text(json.dumps(base | {"categories": [{"name": "cat"}]}))
    with pytest.raises(LabelFileError, match=r"malformed category or image entry \(missing key 'id'\)"):
        read_coco(path)
    path.write_bytes(json.dumps(base).replace("cat", "caf\xe9").encode("latin-1"))
    with pytest.raises(LabelFileError, match=r"instances\.json: annotation file is not UTF-8"):
        read_coco(path)


# ------------------------------------------------------------------------------ settings and files
@pytest.mark.parametrize(
    ("override", "message"),
    [("train.epochs=-3", "train.epochs: -3 is not allowed"), ("data.val_fraction=1.5", "data.val_fraction: 1.5"),
     ("eval.threshold=50", "eval.threshold: 50.0"), ("train.lr=-1", "train.lr: -1.0"),
     ("train.lr=.nan", "train.lr: nan is not a finite number"), ("train.batch_size=0", "train.batch_size: 0"),
     ("train.num_workers=-1", "train.num_workers: -1"), ("train.device=banana", "train.device: 'banana'"),
     ("data.image_pattern={name}.png", "data.image_pattern: '{name}.png'"),
     ("model.hpdval.alpha=2", "model.hpdval.alpha: 2.0"), ("model.templates=['{} {}']", "exactly one '{}' slot")],
)  # fmt: skip
def test_nonsense_settings_name_the_key(glyph_data, tmp_path, capsys, override, message):
    argv = ["train", "--config", str(_config(tmp_path, glyph_data)), "--run-dir", str(tmp_path / "run"), "--set"]
    assert main([*argv, override]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_cuda_device_on_a_machine_without_one(glyph_data, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    argv = ["train", "--config", str(_config(tmp_path, glyph_data)), "--run-dir", str(tmp_path / "run")]
    assert main([*argv, "--set", "train.device=cuda"]) == 2
    assert "CUDA is not available" in _error(capsys)


@pytest.mark.parametrize(
    ("argv", "message"),
    [(["evaluate", "--threshold", "50"], "--threshold: 50.0 is not allowed"),
     (["split", "longtail", "--n-max", "-5"], "--n-max: -5"), (["split", "longtail", "--shape", "0"], "--shape: 0.0"),
     (["split", "fewshot", "--shots", "0"], "--shots: 0"), (["split", "partial", "--known", "0"], "--known: 0.0")],
)  # fmt: skip
def test_nonsense_flags_name_the_flag(glyph_data, tmp_path, capsys, argv, message):
    files = {"evaluate": ["--scores", "s.npy", "--labels", "l", "--classes", "c"],
             "longtail": ["--labels", "l", "--classes", "c", "--out", str(tmp_path / "o")] +
                         ([] if "--n-max" in argv else ["--n-max", "10"]),
             "fewshot": ["--labels", "l", "--classes", "c", "--novel", "a", "--out", str(tmp_path / "o")],
             "partial": ["--labels", "l", "--classes", "c", "--out", str(tmp_path / "o")]}  # fmt: skip
    assert main(argv + files[argv[1] if argv[0] == "split" else argv[0]]) == 2
    assert message in _error(capsys)
    assert not (tmp_path / "o").exists()


def test_yaml_errors_and_pickles_are_one_line(glyph_data, tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  epochs: [1,\n  lr: 2\n")
    assert main(["train", "--config", str(bad)]) == 2
    assert "bad.yaml: malformed YAML in this config file (line 4, column 1: expected ',' or ']'" in _error(capsys)
    assert main(["train", "--config", str(_config(tmp_path, glyph_data)), "--set", "train.lr=[1,"]) == 2
    assert "cannot parse value" in _error(capsys)

    class Payload:
        def __reduce__(self):
            return (os.system, ("echo unpickled",))

    torch.save({"state": Payload()}, tmp_path / "evil.pt")
    from cimlic.checkpoint import CheckpointError, load_state

    with pytest.raises(CheckpointError, match="not a plain tensor file .*refused, not unpickled") as info:
        load_state(tmp_path / "evil.pt")
    assert "weights_only" not in str(info.value)
    config = _config(tmp_path, glyph_data, "w", model={"name": "cprfl", "cprfl": {"backbone": "resnet18",
                     "backbone_weights": str(tmp_path / "evil.pt"), "ffn": 32, "heads": 2}})  # fmt: skip
    assert main(["train", "--config", str(config), "--run-dir", str(tmp_path / "w")]) == 2
    line = _error(capsys)
    assert "evil.pt: not a plain tensor file" in line and "weights_only" not in line


def test_checkpoint_of_other_classes_and_missing_classnames(glyph_data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--config", str(_config(tmp_path, glyph_data)), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    classes = Path(glyph_data["classes"]).read_text().split()
    other = tmp_path / "other.txt"
    other.write_text("\n".join(reversed(classes)) + "\n")
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["data"]["classes"] = str(other)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    assert main(["eval", "--run", str(run)]) == 2
    assert "best.json: the checkpoint was trained on" in _error(capsys)
    other.write_text("\n".join(classes[:-1]) + "\n")  # one class fewer: named, not a shape traceback
    assert main(["eval", "--run", str(run)]) == 2
    line = _error(capsys)
    assert f"trained on {len(classes)} classes" in line and f"({len(classes) - 1} classes" in line
    meta = json.loads((run / "best.json").read_text())
    del meta["classnames"]
    (run / "best.json").write_text(json.dumps(meta))
    assert main(["eval", "--run", str(run)]) == 2
    assert "best.json: no list of class names" in _error(capsys)


def test_internal_bugs_keep_their_traceback(glyph_data, tmp_path, monkeypatch):
    import cimlic.apps.runner as runner

    def broken(*args, **kwargs):
        raise ValueError("an internal bug")

    monkeypatch.setattr(runner, "load_splits", broken)
    with pytest.raises(ValueError, match="an internal bug"):
        main(["train", "--config", str(_config(tmp_path, glyph_data)), "--run-dir", str(tmp_path / "run")])


# --------------------------------------------------------------------------------- lost or corrupted
def test_a_run_folder_is_locked_while_in_use(glyph_data, tmp_path, capsys):
    config = _config(tmp_path, glyph_data)
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run)]) == 0
    assert not (run / ".lock").exists()
    live = subprocess.Popen(["sleep", "30"])
    try:
        (run / ".lock").write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename, "command": "train"}))
        before = (run / "metrics.jsonl").read_text()
        for argv in (
            ["train", "--config", str(config), "--run-dir", str(run), "--resume"],
            ["eval", "--run", str(run)],
        ):
            assert main(argv) == 2
            assert f"in use by process {live.pid}" in _error(capsys)
        assert (run / "metrics.jsonl").read_text() == before  # nothing interleaved
    finally:
        live.kill()
        live.wait()
    assert main(["train", "--config", str(config), "--run-dir", str(run), "--resume"]) == 0  # stale: taken over
    assert not (run / ".lock").exists()


def test_data_folders_of_the_user_are_never_overwritten(tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "train.txt").write_text("my own labels\n")
    assert main(["digits", "--out", str(mine)]) == 2
    assert "holds files cimlic did not write" in _error(capsys)
    assert (mine / "train.txt").read_text() == "my own labels\n"
    assert not (mine / OUTPUT_MARKER).exists()


def test_stale_temporary_files_are_cleaned(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = tmp_path / f".best.safetensors.pid{dead.pid}.abc.tmp"
    mine = tmp_path / f".best.json.pid{os.getpid()}.def.tmp"
    stale.write_text("x")
    mine.write_text("y")
    assert clean_stale_temps(tmp_path) == [stale]
    assert mine.exists() and not stale.exists()


def test_read_json_names_the_problem(tmp_path):
    path = tmp_path / "x.json"
    path.write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match=r"x\.json: thing is not UTF-8 text"):
        read_json(path, ConfigError, "thing")


def test_disk_full_during_predict(glyph_data, tmp_path, tmpfs, capsys):
    point, fill, _ = tmpfs
    run = tmp_path / "run"
    assert main(["train", "--config", str(_config(tmp_path, glyph_data)), "--run-dir", str(run)]) == 0
    capsys.readouterr()
    fill(300)
    out = point / "p.jsonl"
    assert main(["predict", "--run", str(run), glyph_data["image_root"], "--out", str(out)]) == 2
    line = _error(capsys)
    assert str(out) in line and "No space left on device" in line and not out.exists()


def test_fewshot_lock_split_fewshot_folder_and_stale_temps_at_resume(glyph_data, tmp_path, capsys):
    live = subprocess.Popen(["sleep", "30"])
    try:
        folder = tmp_path / "fs"
        folder.mkdir()
        (folder / ".lock").write_text(json.dumps({"pid": live.pid, "host": os.uname().nodename, "command": "x"}))
        config = _config(tmp_path, glyph_data, "f")
        assert main(["fewshot", "--config", str(config), "--run-dir", str(folder), "--set",
                     f"fewshot.base_labels={glyph_data['train_labels']}", "--set", f"fewshot.support_dir={tmp_path}",
                     "--set", f"fewshot.test_labels={glyph_data['test_labels']}"]) == 2  # fmt: skip
        assert f"in use by process {live.pid}" in _error(capsys)
    finally:
        live.kill()
        live.wait()
    mine = tmp_path / "episodes"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    argv = ["split", "fewshot", "--labels", glyph_data["train_labels"], "--classes", glyph_data["classes"],
            "--novel", "dot,star", "--out", str(mine)]  # fmt: skip
    assert main(argv) == 2
    assert "holds files cimlic did not write" in _error(capsys) and (mine / "notes.txt").read_text() == "keep"
    run = tmp_path / "run"
    assert main(["train", "--config", str(_config(tmp_path, glyph_data)), "--run-dir", str(run)]) == 0
    dead = subprocess.Popen(["true"])
    dead.wait()
    stale = run / f".state.pt.pid{dead.pid}.x1y2.tmp"
    stale.write_bytes(b"half a state")
    assert main(["train", "--config", str(_config(tmp_path, glyph_data)), "--run-dir", str(run), "--resume"]) == 0
    assert not stale.exists()  # an interrupted write's left-over, removed on the next run
