"""Checkpoints (safetensors + JSON sidecar), atomic writes, resume state and run-folder helpers."""

from __future__ import annotations

import json
import os
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from cimlic import checkpoint as ckpt
from cimlic.checkpoint import (
    CheckpointError,
    get_rng_state,
    load_checkpoint,
    load_state,
    load_trainable_state,
    read_checkpoint,
    save_checkpoint,
    save_state,
    set_rng_state,
)
from cimlic.models.base import Method
from cimlic.rundir import RunDirError, check_resume_config, check_run_dir, trim_jsonl


class Net(Method):
    """Frozen ``clip`` (parameters + a buffer), a trainable head, a frozen non-clip layer, buffers of each kind."""

    def __init__(self, num_classes: int = 4, extra: bool = False) -> None:
        super().__init__(num_classes)
        self.freeze("clip", nn.Sequential(nn.Linear(6, 6), nn.BatchNorm1d(6)))
        self.frozen = nn.Linear(6, 6).requires_grad_(False)
        self.head = nn.Linear(6, num_classes)
        self.register_buffer("prior", torch.randn(num_classes))  # persistent -> saved
        self.register_buffer("text", torch.randn(num_classes, 6), persistent=False)  # derived -> not saved
        if extra:
            self.extra = nn.Parameter(torch.zeros(3))


META = {"classnames": ["a", "b", "c", "d"], "group_counts": [50, 20, 5, 1], "epoch": 2, "step": 10}


def test_round_trip_saves_only_trainable_tensors(tmp_path):
    torch.manual_seed(0)
    model = Net()
    meta = save_checkpoint(tmp_path / "best", model, META)
    on_disk = load_file(tmp_path / "best.safetensors")
    assert sorted(on_disk) == ["head.bias", "head.weight", "prior"]  # no clip.*, no frozen, no non-persistent
    sidecar = json.loads((tmp_path / "best.json").read_text())
    assert sidecar == meta and sidecar["tensors"] == sorted(on_disk)
    assert sidecar["classnames"] == META["classnames"] and sidecar["step"] == 10
    assert {"cimlic", "torch", "open_clip"} <= set(sidecar["versions"])
    fresh = Net()
    clip_before = {k: v.clone() for k, v in fresh.clip.state_dict().items()}
    assert load_checkpoint(tmp_path / "best", fresh, classnames=META["classnames"])["epoch"] == 2
    for name in on_disk:
        assert torch.equal(fresh.state_dict()[name], model.state_dict()[name])
    for k, v in fresh.clip.state_dict().items():
        assert torch.equal(v, clip_before[k])  # frozen CLIP comes from elsewhere


def test_zero_tensor_checkpoint(tmp_path):
    model = nn.Module()
    model.clip = nn.Linear(2, 2).requires_grad_(False)
    save_checkpoint(tmp_path / "zs", model, {})
    assert load_checkpoint(tmp_path / "zs", model)["tensors"] == []


def test_mismatches_name_the_file(tmp_path):
    save_checkpoint(tmp_path / "ck", Net(4), META)
    with pytest.raises(CheckpointError, match=r"ck\.safetensors.*4 classes, the model has 5"):
        load_checkpoint(tmp_path / "ck", Net(5))
    tensors, _ = read_checkpoint(tmp_path / "ck")
    with pytest.raises(CheckpointError, match=r"ck: 3 shape mismatch\(es\), first prior: \(4,\) vs \(5,\)"):
        load_trainable_state(Net(5), tensors, source=str(tmp_path / "ck"))
    with pytest.raises(CheckpointError, match=r"ck\.safetensors.*1 missing key\(s\), first \['extra'\]"):
        load_checkpoint(tmp_path / "ck", Net(4, extra=True))
    load_checkpoint(tmp_path / "ck", Net(4, extra=True), strict=False)  # loads what is there
    with pytest.raises(CheckpointError, match="class names differ"):
        load_checkpoint(tmp_path / "ck", Net(4), classnames=["a", "b", "x", "d"])


def test_missing_corrupt_and_torn_files(tmp_path):
    with pytest.raises(CheckpointError, match=r"nope\.safetensors.*not found"):
        load_checkpoint(tmp_path / "nope", Net())
    save_checkpoint(tmp_path / "ck", Net(), META)
    good = (tmp_path / "ck.safetensors").read_bytes()
    (tmp_path / "ck.safetensors").write_bytes(good[:-7])
    with pytest.raises(CheckpointError, match=r"ck\.safetensors.*does not match ck\.json"):
        load_checkpoint(tmp_path / "ck", Net())
    (tmp_path / "ck.safetensors").write_bytes(good)
    (tmp_path / "ck.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"ck\.json: malformed JSON in this checkpoint metadata"):
        load_checkpoint(tmp_path / "ck", Net())


def test_failed_write_keeps_existing_checkpoint(tmp_path, monkeypatch):
    torch.manual_seed(0)
    old_model = Net()
    save_checkpoint(tmp_path / "ck", old_model, META)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    real_fsync, calls = os.fsync, []

    def crash_on_second(fd: int) -> None:  # the tensor file's temp is complete, the sidecar's is half-way
        calls.append(fd)
        if len(calls) == 2:
            raise OSError("disk full")
        real_fsync(fd)

    monkeypatch.setattr(ckpt.os, "fsync", crash_on_second)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(tmp_path / "ck", Net(), {**META, "epoch": 3})
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # old pair intact, no temp files left
    fresh = Net()
    assert load_checkpoint(tmp_path / "ck", fresh)["epoch"] == 2
    assert torch.equal(fresh.head.weight, old_model.head.weight)


def test_state_round_trip_with_weights_only(tmp_path):
    model = nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    save_state(tmp_path / "state.pt", {"optimizer": opt.state_dict(), "rng": get_rng_state(), "best": {"map": 1.5}})
    expected = (random.random(), np.random.rand(), torch.rand(2))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    state = load_state(tmp_path / "state.pt")
    set_rng_state(state["rng"])
    got = (random.random(), np.random.rand(), torch.rand(2))
    assert got[:2] == expected[:2] and torch.equal(got[2], expected[2])
    other = torch.optim.AdamW(nn.Linear(3, 2).parameters(), lr=0.1)
    other.load_state_dict(state["optimizer"])
    assert torch.equal(other.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match=r"bad\.pt"):
        load_state(tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match="not found"):
        load_state(tmp_path / "missing.pt")


def test_run_dir_helpers(tmp_path):
    assert check_run_dir(tmp_path / "new", resume=False) is False
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.yaml").write_text("seed: 1\ntrain:\n  lr: 0.1\n  epochs: 2\n")
    with pytest.raises(RunDirError, match="not empty"):
        check_run_dir(tmp_path / "run", resume=False)
    assert check_run_dir(tmp_path / "run", resume=True) is False  # nothing to resume yet: start over
    check_resume_config(
        tmp_path / "run" / "config.yaml", {"seed": 1, "train": {"lr": 0.1, "epochs": 5}}, ["train.epochs"]
    )
    with pytest.raises(RunDirError, match=r"\['seed'\]"):
        check_resume_config(tmp_path / "run" / "config.yaml", {"seed": 2, "train": {"lr": 0.1, "epochs": 2}})
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1}\n{"step": 2, "split": "val"}\n{"step": 3}\n{"ste')
    trim_jsonl(log, 2)
    assert log.read_text() == '{"step": 1}\n{"step": 2, "split": "val"}\n'
