"""Trainer, LR schedules, EMA, resume and DDP on tiny in-memory problems (CPU, seconds)."""

from __future__ import annotations

import copy
import json
import math
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset, DistributedSampler, SequentialSampler

from cimlic.checkpoint import load_checkpoint, load_state, read_checkpoint, trainable_state
from cimlic.config import Config, LossConfig, TrainConfig
from cimlic.distributed import init_distributed, shard
from cimlic.engine import Trainer
from cimlic.losses import BCELoss, Loss, build_loss
from cimlic.models.base import Method
from cimlic.optim import EMA, lr_at
from cimlic.rundir import RunDirError

C, D = 4, 8
CLASSNAMES = ["a", "b", "c", "d"]


# ------------------------------------------------------------------------------------------ toys
class ToyData(Dataset):
    """Features of a fixed random 'teacher' problem: target_c = [x . w_c + b_c > 0] (learnable, imbalanced)."""

    def __init__(self, n: int, seed: int) -> None:
        teacher = torch.Generator().manual_seed(1234)
        w, b = torch.randn(D, C, generator=teacher), torch.tensor([0.8, 0.2, -0.4, -1.0])  # descending frequency
        self.x = torch.randn(n, D, generator=torch.Generator().manual_seed(seed))  # (N, D)
        self.targets = ((self.x @ w + b) > 0).float()  # (N, C)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"feat_global": self.x[i], "target": self.targets[i], "index": i}


class ToyModel(Method):
    """Frozen 'clip' (parameters + a buffer) -> dropout -> trainable head; an aux L2 loss; buffers of each kind."""

    def __init__(self, dropout: float = 0.0, seed: int = 0) -> None:
        super().__init__(C)
        torch.manual_seed(seed)
        self.freeze("clip", nn.Sequential(nn.Linear(D, D), nn.BatchNorm1d(D)))  # BN must stay in eval mode
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(D, C)
        self.register_buffer("logit_bias", torch.zeros(C))  # persistent, saved
        self.register_buffer("text_features", torch.randn(C, D), persistent=False)  # derived, not saved

    def forward(self, batch: dict) -> dict:
        x = self.drop(self.clip(batch["feat_global"]))  # (B, D)
        logits = self.head(x) + self.logit_bias  # (B, C)
        return {"logits": logits, "aux_losses": {"l2": 1e-3 * self.head.weight.pow(2).sum()}}


class ZeroShot(Method):
    """No trainable parameter at all (like zero-shot CLIP)."""

    def __init__(self) -> None:
        super().__init__(C)
        torch.manual_seed(0)
        self.freeze("clip", nn.Linear(D, C))
        self.register_buffer("scale", torch.tensor(2.0))

    def forward(self, batch: dict) -> dict:
        return {"logits": self.scale * self.clip(batch["feat_global"])}


class CrashingLoss(Loss):
    """Wraps a loss; raises on call number ``crash_at`` (simulates a killed run)."""

    def __init__(self, inner: nn.Module, crash_at: int | None = None) -> None:
        super().__init__()
        self.inner, self.crash_at, self.calls = inner, crash_at, 0

    def forward(self, logits: torch.Tensor, targets: torch.Tensor, **extra) -> torch.Tensor:
        self.calls += 1
        if self.crash_at is not None and self.calls == self.crash_at:
            raise KeyboardInterrupt("simulated crash")
        return self.inner(logits, targets, **extra)


def make_cfg(**train) -> Config:
    cfg = Config(seed=7)
    defaults = dict(epochs=3, batch_size=16, lr=0.05, device="cpu", num_workers=0, log_every=1)
    cfg.train = TrainConfig(**{**defaults, **train})
    cfg.data.head_threshold, cfg.data.tail_threshold = 30, 10
    return cfg


def splits() -> tuple[ToyData, ToyData, ToyData]:
    return ToyData(64, seed=1), ToyData(32, seed=2), ToyData(37, seed=3)


def make_trainer(run_dir: Path, cfg: Config, model: nn.Module | None = None, loss=None, **kw) -> Trainer:
    train, val, test = splits()
    counts = train.targets.sum(0).long()
    model = model if model is not None else ToyModel()
    return Trainer(cfg, model, loss or BCELoss(), train, val, test, CLASSNAMES, counts, run_dir, **kw)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


# -------------------------------------------------------------------------------------- schedules
def test_lr_at_cosine_with_warmup():
    cfg = TrainConfig(lr=1.0, schedule="cosine", warmup_steps=10)
    assert lr_at(0, 110, cfg) == pytest.approx(0.1)
    assert lr_at(9, 110, cfg) == pytest.approx(1.0)  # warm-up ends at lr
    assert lr_at(10, 110, cfg) == pytest.approx(1.0)
    assert lr_at(60, 110, cfg) == pytest.approx(0.5)  # cosine midpoint
    assert lr_at(110, 110, cfg) == pytest.approx(0.0, abs=1e-12)
    assert 0 < lr_at(109, 110, cfg) < 1e-3
    assert all(lr_at(s, 110, cfg) >= lr_at(s + 1, 110, cfg) for s in range(10, 110))


def test_lr_at_onecycle_and_constant():
    cfg = TrainConfig(lr=2.0, schedule="onecycle", onecycle_pct=0.25)
    assert lr_at(0, 100, cfg) == pytest.approx(2.0 / 25)
    assert lr_at(24, 100, cfg) == pytest.approx(2.0)  # peak at pct * total - 1, as OneCycleLR puts it
    assert lr_at(99, 100, cfg) == pytest.approx(2.0 / 25 / 1e4)  # the last step
    assert lr_at(100, 100, cfg) == lr_at(99, 100, cfg)  # past the end: the last value
    values = [lr_at(s, 100, cfg) for s in range(100)]
    assert values.index(max(values)) == 24
    assert all(a < b for a, b in zip(values[:24], values[1:25], strict=True))


@pytest.mark.parametrize(("total", "pct"), [(100, 0.25), (37, 0.1), (7, 0.3), (5, 0.1)])
def test_lr_at_onecycle_equals_torch_onecycle_lr(total, pct):
    """The released HP-DVAL and CPRFL code use torch's OneCycleLR: the same learning rate at every step."""
    cfg = TrainConfig(lr=1e-3, schedule="onecycle", onecycle_pct=pct)
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=total, pct_start=pct)
    for step in range(total):
        assert lr_at(step, total, cfg) == pytest.approx(opt.param_groups[0]["lr"], rel=1e-12, abs=0), step
        opt.step()
        sched.step()
    const = TrainConfig(lr=0.5, schedule="constant", warmup_steps=4)
    assert [lr_at(s, 20, const) for s in (0, 3, 4, 19)] == pytest.approx([0.125, 0.5, 0.5, 0.5])


# -------------------------------------------------------------------------------------------- EMA
def test_ema_matches_hand_computation():
    model = nn.Linear(2, 1)
    model.register_buffer("running", torch.tensor([1.0]))
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 2.0]]))
    ema = EMA(model, decay=0.9)
    history = [torch.tensor([[1.0, 2.0]])]
    for w in ([[3.0, 0.0]], [[-1.0, 4.0]]):
        with torch.no_grad():
            model.weight.copy_(torch.tensor(w))
            model.running.add_(1.0)
        ema.update(model)
        history.append(torch.tensor(w))
    expected = 0.9 * (0.9 * history[0] + 0.1 * history[1]) + 0.1 * history[2]  # [[0.71, 2.02]]
    torch.testing.assert_close(ema.shadow["weight"], expected)
    torch.testing.assert_close(ema.shadow["running"], torch.tensor([0.9 * (0.9 * 1 + 0.1 * 2) + 0.1 * 3]))
    with ema.swap(model):
        torch.testing.assert_close(model.weight.detach(), expected)
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[-1.0, 4.0]]))  # restored
    other = EMA(model, decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.decay == 0.9 and torch.equal(other.shadow["weight"], ema.shadow["weight"])
    with pytest.raises(ValueError):
        EMA(model, decay=1.0)


# ------------------------------------------------------------------------------------------- fit
def test_fit_learns_and_writes_run_folder(tmp_path):
    cfg = make_cfg(epochs=6, log_every=2, lr=0.2)
    trainer = make_trainer(tmp_path / "run", cfg)
    clip_before = copy.deepcopy(trainer.model.clip.state_dict())
    result = trainer.fit()
    run = tmp_path / "run"
    names = {"config.yaml", "metrics.jsonl", "log.txt", "state.pt", "eval.json"}
    names |= {f"{k}.{s}" for k in ("best", "last") for s in ("safetensors", "json")}
    assert names <= {p.name for p in run.iterdir()}
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    records = read_jsonl(run / "metrics.jsonl")
    steps = [r for r in records if "loss" in r]
    assert len(steps) == 24 // 2 and all(
        {"step", "epoch", "lr", "loss", "loss_main", "loss_l2"} <= r.keys() for r in steps
    )
    assert all(r["sec_per_step"] >= 0 for r in steps)
    assert [r["epoch"] for r in records if r.get("split") == "val"] == list(range(1, 7))
    assert steps[-1]["loss"] < 0.6 * steps[0]["loss"]  # it learns
    saved = json.loads((run / "eval.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["selected_on"] == "val" and 1 <= saved["selected_epoch"] <= 6
    assert set(saved["per_class_ap"]) == set(CLASSNAMES) and saved["ap_variant"] == "sklearn"
    assert set(saved["groups"].values()) <= {"head", "medium", "tail"} and saved["num_images"] == 37
    assert saved["map"] > 75
    assert "epoch 6 val" in (run / "log.txt").read_text()
    for k, v in clip_before.items():  # frozen CLIP untouched, BN statistics included
        assert torch.equal(trainer.model.clip.state_dict()[k], v), k


def test_grad_clip_bounds_gradient_norm(tmp_path):
    cfg = make_cfg(epochs=1, grad_clip=0.05, lr=0.01)
    trainer = make_trainer(tmp_path / "run", cfg)
    norms = []

    def record(optimizer, args, kwargs):
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.params])).item())

    trainer.optimizer.register_step_pre_hook(record)
    trainer.fit()
    unclipped = [r["grad_norm"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "grad_norm" in r]
    assert len(norms) == 4 and max(norms) <= 0.05 * (1 + 1e-5)
    assert max(unclipped) > 0.05  # clipping acted


def test_zero_trainable_model_evaluates_without_optimizer(tmp_path):
    trainer = make_trainer(tmp_path / "zs", make_cfg(), model=ZeroShot())
    assert trainer.optimizer is None and trainer.total_steps == 0
    result = trainer.fit()
    saved = json.loads((tmp_path / "zs" / "eval.json").read_text())
    assert saved["map"] == pytest.approx(result["map"]) and saved["selected_epoch"] == 0
    meta = json.loads((tmp_path / "zs" / "best.json").read_text())
    assert meta["tensors"] == ["scale"]  # only the non-clip buffer
    assert (tmp_path / "zs" / "config.yaml").is_file() and (tmp_path / "zs" / "log.txt").is_file()


def test_select_on_test_is_labelled_and_sampler_from_config(tmp_path):
    cfg = make_cfg(epochs=2)
    cfg.eval.select_on = "test"
    cfg.sampler.name = "class_aware"
    result = make_trainer(tmp_path / "run", cfg).fit()
    saved = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert result["selected_on"] == saved["selected_on"] == "test"
    assert [r["split"] for r in read_jsonl(tmp_path / "run" / "metrics.jsonl") if "split" in r] == ["test"] * 3


def test_checkpoints_hold_the_ema_weights(tmp_path):
    """What eval and predict load (``best``/``last``) are the EMA weights, not the raw ones."""
    trainer = make_trainer(tmp_path / "run", make_cfg(epochs=2, ema=0.5))
    assert trainer.fit(stop_after_epochs=1) == {"stopped_after_epoch": 1}
    best, _ = read_checkpoint(tmp_path / "run" / "best")
    raw = trainable_state(trainer.model)
    for name, shadow in trainer.ema.shadow.items():
        assert torch.equal(best[name], shadow.cpu()), name
    assert any(not torch.equal(best[k], raw[k]) for k in trainer.ema.shadow)


# ---------------------------------------------------------------------------------------- resume
def _resume_cfg() -> Config:
    cfg = make_cfg(epochs=3, ema=0.8, schedule="onecycle", grad_clip=1.0, log_every=3)
    cfg.loss = LossConfig(name="grad_balance")
    return cfg


def _resume_run(run_dir: Path, crash_at: int | None = None, stop: int | None = None, resume: bool = False):
    cfg = _resume_cfg()
    counts = ToyData(64, seed=1).targets.sum(0)
    loss = CrashingLoss(build_loss(cfg.loss, counts, 64), crash_at)
    trainer = make_trainer(run_dir, cfg, model=ToyModel(dropout=0.3), loss=loss)
    return trainer, trainer.fit(resume=resume, stop_after_epochs=stop)


@pytest.mark.parametrize("interrupt", ["crash", "stop"])
def test_resume_reproduces_uninterrupted_run(tmp_path, interrupt):
    """Tolerance: exact (bitwise) equality of the final metrics, weights and optimiser/loss state on CPU."""
    ref, ref_result = _resume_run(tmp_path / "a")
    if interrupt == "crash":  # killed in the middle of epoch 2 (4 steps per epoch): after step 6
        with pytest.raises(KeyboardInterrupt):
            _resume_run(tmp_path / "b", crash_at=7)
        assert load_state(tmp_path / "b" / "state.pt")["epoch"] == 1
    else:
        assert _resume_run(tmp_path / "b", stop=1)[1] == {"stopped_after_epoch": 1}
    resumed, result = _resume_run(tmp_path / "b", resume=True)
    assert result == ref_result
    for k, v in trainable_state(ref.model).items():
        assert torch.equal(trainable_state(resumed.model)[k], v), k
    a, b = load_state(tmp_path / "a" / "state.pt"), load_state(tmp_path / "b" / "state.pt")
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["loss"]["inner.pos_grad"], b["loss"]["inner.pos_grad"])
    assert a["optimizer"]["state"][0]["exp_avg"].equal(b["optimizer"]["state"][0]["exp_avg"])
    logs = [read_jsonl(tmp_path / r / "metrics.jsonl") for r in ("a", "b")]
    assert [r["step"] for r in logs[0]] == [r["step"] for r in logs[1]]  # no duplicated steps after the crash
    assert [r.get("loss") for r in logs[0]] == [r.get("loss") for r in logs[1]]


def test_run_dir_protection(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    make_trainer(run, make_cfg(epochs=1)).fit()  # an existing empty folder is fine
    before = (run / "eval.json").read_bytes()
    with pytest.raises(RunDirError, match="not empty"):
        make_trainer(run, make_cfg(epochs=1)).fit()
    assert (run / "eval.json").read_bytes() == before
    changed = make_cfg(epochs=1, lr=0.1)
    with pytest.raises(RunDirError, match="train.lr"):
        make_trainer(run, changed).fit(resume=True)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "mine.txt").write_text("keep")
    with pytest.raises(RunDirError, match="config.yaml"):
        make_trainer(other, make_cfg(epochs=1)).fit(resume=True)
    assert (other / "mine.txt").read_text() == "keep"
    finished = make_trainer(run, make_cfg(epochs=1)).fit(resume=True)  # resuming a finished run: same test result
    assert json.dumps(finished) == json.dumps(json.loads(before))


def test_shard_covers_dataset_without_duplicates():
    data = list(range(37))
    parts = [list(shard(data, r, 3)) for r in range(3)]
    assert sum(parts, []) == data
    assert init_distributed() == (0, 1)  # not launched by torchrun: no-op


# ------------------------------------------------------------------------------------------- DDP
def _ddp_cfg() -> Config:
    return make_cfg(epochs=2, batch_size=8, lr=0.05, grad_clip=5.0, ema=0.7)


def _ddp_loss(name: str) -> nn.Module:
    """BCE, or the GE/FD gradient-balancing loss whose running sums are all-reduced across ranks."""
    return BCELoss() if name == "bce" else build_loss(LossConfig(name=name), splits()[0].targets.sum(0), 64)


def _ddp_worker(rank: int, world: int, port: int, root: str, loss: str = "bce") -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    os.environ["LOCAL_RANK"] = str(rank)
    torch.set_num_threads(1)
    assert init_distributed() == (rank, world)
    try:
        train, _, test = splits()
        sampler = DistributedSampler(train, world, rank, shuffle=False)  # rank r: positions r::2 of each block
        trainer = make_trainer(Path(root) / "ddp", _ddp_cfg(), sampler=sampler, loss=_ddp_loss(loss))
        result = trainer.fit()
        loss_state = {k: v.tolist() for k, v in trainer.loss_fn.state_dict().items()}
        trainer.ema = None  # evaluate exactly the weights loaded below
        load_checkpoint(Path(root) / "single" / "best", trainer.model)
        gathered = trainer.evaluate(test, "test")
        if rank == 0:
            out = {
                "fit": result,
                "eval": gathered,
                "weights": {k: v.tolist() for k, v in trainable_state(trainer.model).items()},
                "loss_state": loss_state,
            }
            (Path(root) / "ddp.json").write_text(json.dumps(out))
        dist.barrier()  # no rank tears its connections down while the other may still use them
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["bce", "grad_balance"])
def test_ddp_two_gloo_processes_match_one_process(tmp_path, loss):
    """2 ranks x batch 8 == 1 process x batch 16 with the same sample order per step.

    DDP averages the two half-batch gradients, which equals the full-batch mean gradient up to float32
    summation order, so weights agree to 1e-5 and test mAP to 1e-4 points; the gathered evaluation of the
    same checkpoint over 2 ranks equals the single-process evaluation exactly. With the GE/FD gradient-balancing
    loss the running gradient sums are all-reduced, so they (and the weights they set) equal the single process's.
    """
    train, _, test = splits()
    cfg = _ddp_cfg()
    cfg.train.batch_size = 16
    single = make_trainer(tmp_path / "single", cfg, sampler=SequentialSampler(train), loss=_ddp_loss(loss))
    ref = single.fit()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, str(tmp_path), loss), nprocs=2, join=True)
    out = json.loads((tmp_path / "ddp.json").read_text())
    assert out["fit"]["selected_epoch"] == ref["selected_epoch"]
    assert out["fit"]["map"] == pytest.approx(ref["map"], abs=1e-4)
    for k, v in trainable_state(single.model).items():
        torch.testing.assert_close(torch.tensor(out["weights"][k]), v, atol=1e-5, rtol=0)
    assert set(out["loss_state"]) == set(single.loss_fn.state_dict())
    for k, v in single.loss_fn.state_dict().items():  # grad_balance: G+ and G- (bce has none)
        assert v.abs().sum() > 0
        torch.testing.assert_close(torch.tensor(out["loss_state"][k], dtype=v.dtype), v, atol=1e-4, rtol=1e-5)
    evaluator = make_trainer(tmp_path / "eval", make_cfg(batch_size=8))
    load_checkpoint(tmp_path / "single" / "best", evaluator.model)
    assert out["eval"] == json.loads(json.dumps(evaluator.evaluate(test, "test")))
    assert not math.isnan(out["eval"]["map"])
