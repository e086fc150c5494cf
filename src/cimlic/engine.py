"""The shared training engine: the Trainer (AMP, DDP, checkpoints, resume) and evaluation helpers.

A run folder holds ``config.yaml`` (resolved config), ``metrics.jsonl`` (one JSON object per logged step with
``loss``/``lr``, one per evaluation with ``split``), ``log.txt``, ``last``/``best`` checkpoints
(``.safetensors`` + ``.json``: the weights that were evaluated, i.e. the EMA weights when EMA is on),
``state.pt`` (everything needed to resume, including the raw weights) and ``eval.json`` (test metrics of the
selected checkpoint). Checkpoint and state I/O live in ``cimlic.checkpoint``, schedules and EMA in
``cimlic.optim``, process set-up in ``cimlic.distributed``.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Sampler
from tqdm.auto import tqdm

from cimlic import checkpoint as ckpt
from cimlic import rundir
from cimlic.config import Config, TrainConfig, from_dict, migrate_moved_keys, save_config, to_dict, validate
from cimlic.data.samplers import build_sampler
from cimlic.distributed import barrier, resolve_device, seed_everything, shard, world
from cimlic.errors import ConfigError
from cimlic.io import write_json
from cimlic.metrics import Evaluator, format_table
from cimlic.optim import EMA, build_optimizer, lr_at

logger = logging.getLogger(__name__)

# Config keys that may change when a run is resumed (they do not change what is computed, or extend it).
RESUMABLE_CHANGES = (
    "train.epochs",
    "train.max_steps",
    "train.device",
    "train.num_workers",
    "train.log_every",
    "train.log",
    "eval.calibrate",
    "eval.threshold_rule",
    "eval.target_precision",
)
SUMMARY_KEYS = ("map", "head", "medium", "tail", "var")


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v for k, v in batch.items()}


def _summary(metrics: dict | None) -> dict | None:
    return None if metrics is None else {k: metrics.get(k) for k in SUMMARY_KEYS}


def _resolved(saved: dict) -> dict:
    """A saved config in the current layout: moved keys migrated, fields added since at their defaults."""
    return to_dict(from_dict(Config, migrate_moved_keys(saved)))


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


# ---------------------------------------------------------------------------------------- trainer
@torch.no_grad()
def forward_all(model: nn.Module, dataset: Dataset, cfg: TrainConfig, device: torch.device, num_classes: int):
    """(N, C) float32 CPU logits and (N, C) targets (zeros when items have none) of ``dataset``, in order."""
    model.eval()
    loader = DataLoader(
        dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers, pin_memory=device.type == "cuda"
    )
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and cfg.amp else None
    logits, targets = [], []
    for batch in loader:
        with autocast or contextlib.nullcontext():
            out = model(_to_device(batch, device))
        logits.append(out["logits"].float().cpu())  # (B, C)
        targets.append(batch["target"] if "target" in batch else torch.zeros_like(logits[-1]))
    empty = torch.zeros(0, num_classes)
    return (torch.cat(logits), torch.cat(targets)) if logits else (empty, empty)


def evaluate_logits(logits: Tensor, targets: Tensor, cfg: Config, classnames: Sequence[str], group_counts) -> dict:
    """Evaluator metrics (``cfg.eval`` settings, groups from ``group_counts``); a collective under DDP."""
    e, d = cfg.eval, cfg.data
    evaluator = Evaluator(
        len(classnames), list(classnames), group_counts, e.ap, e.threshold, e.cf1, e.top_k,
        head_threshold=d.head_threshold, tail_threshold=d.tail_threshold, ap_scores=e.ap_scores,
    )  # fmt: skip
    if len(logits):
        evaluator.update(logits, targets)
    return evaluator.compute()


class Trainer:
    """Trains, selects, checkpoints and tests one model (shared by every method; never subclassed).

    Args:
        cfg: the experiment config.
        model: a :class:`cimlic.models.base.Method` (its contract: forward outputs, frozen parts, epoch hooks).
        loss_fn: ``loss_fn(logits, targets, **loss_inputs) -> scalar``; its state_dict is part of the resume state.
        train_set: training items ``{"image" or features, "target": (C,), "index"}``.
        val_set: model-selection split, or None (then the last epoch is selected).
        test_set: the split the selected checkpoint is tested on.
        classnames: the C class names.
        group_counts: (C,) n_c of the full training list (before a validation split is carved from it), which
            define the head/medium/tail groups.
        run_dir: the run folder (created; must be empty unless resuming).
        sampler: training sampler; default ``build_sampler(cfg.sampler, train_set.targets, ...)``, a
            DistributedSampler under DDP with the random sampler, or plain seeded shuffling.
    """

    def __init__(
        self,
        cfg: Config,
        model: nn.Module,
        loss_fn: nn.Module,
        train_set: Dataset,
        val_set: Dataset | None,
        test_set: Dataset,
        classnames: Sequence[str],
        group_counts: Sequence[int] | np.ndarray | Tensor | None,
        run_dir: str | os.PathLike,
        sampler: Sampler | None = None,
    ) -> None:
        validate(cfg)  # ranges and finite numbers, the key named (load_config has done it for a file)
        self.cfg, self.run_dir, self.classnames = cfg, Path(run_dir), list(classnames)
        self.group_counts = None if group_counts is None else np.asarray(group_counts).astype(np.int64).tolist()
        self.datasets = {"train": train_set, "val": val_set, "test": test_set}
        self.rank, self.world_size = world()
        self.device = resolve_device(cfg.train.device)
        self.model, self.loss_fn = model.to(self.device), loss_fn.to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.net = self.model  # what the training step calls: the DDP wrapper or the model itself
        if self.world_size > 1 and self.params:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.model, device_ids=ids)
        self.optimizer = build_optimizer(self.params, cfg.train) if self.params else None
        self.ema = EMA(self.model, cfg.train.ema) if cfg.train.ema > 0 and self.params else None
        self.generator = torch.Generator()  # reseeded from (seed, epoch) at every epoch
        self.sampler = sampler if sampler is not None or not self.params else self._default_sampler(train_set)
        self.train_loader = self._loader(train_set, train=True) if self.params else None
        steps = len(self.train_loader) * cfg.train.epochs if self.params else 0
        self.total_steps = min(steps, cfg.train.max_steps) if cfg.train.max_steps > 0 else steps
        self.step, self.epoch, self._tic = 0, 0, (time.perf_counter(), 0)
        self.test_scores: tuple[Tensor, Tensor] | None = None  # after fit: the tested split's logits and targets
        self._scalars = rundir.ScalarLog(self.run_dir, cfg.train.log)  # metrics.jsonl (+ TensorBoard)
        self.best: dict[str, Any] = {"map": -math.inf, "epoch": None, "metrics": None}
        if test_set is None and val_set is None:
            raise ConfigError("Trainer needs a test or a validation split to evaluate on")
        if self.datasets[cfg.eval.select_on] is None:
            logger.warning("no %s split: the last epoch's weights are selected", cfg.eval.select_on)

    def fit(self, resume: bool = False, stop_after_epochs: int | None = None) -> dict:
        """Train, select on ``cfg.eval.select_on``, test the selected checkpoint; return its test metrics.

        Args:
            resume: continue the run in ``run_dir`` from its ``state.pt`` (weights, optimiser, EMA, loss state,
                RNG states, best so far): the result equals that of an uninterrupted run.
            stop_after_epochs: return after this many epochs of this call, as an interruption would (tests);
                the result is then ``{"stopped_after_epoch": n}``.

        Returns:
            The content of ``eval.json``: the Evaluator's test metrics plus ``selected_epoch``, ``selected_on``
            and ``selection`` (the selection split's summary at that epoch).
        """
        resumable = rundir.check_run_dir(self.run_dir, resume) and resume
        barrier()  # every rank has looked at the folder before rank 0 writes to it
        with self._file_logging(), contextlib.closing(self._scalars):
            start = self._start(resumable)
            epochs = self.cfg.train.epochs if self.optimizer is not None else 0  # nothing trainable: test only
            for epoch in range(start, epochs):
                if self.step >= self.total_steps:
                    break
                self.start_epoch(epoch)
                bar = tqdm(self.train_loader, desc=f"epoch {epoch + 1}/{epochs}", disable=self.rank != 0, leave=False)
                for batch in bar:
                    out, lr, grad_norm = self.train_step(batch)
                    self._log_step(epoch, lr, out, grad_norm, bar)
                    if self.step >= self.total_steps:
                        break
                self._end_epoch(epoch + 1)  # evaluate when due, checkpoints, state.pt
                if stop_after_epochs is not None and epoch + 1 - start >= stop_after_epochs:
                    return {"stopped_after_epoch": epoch + 1}
            return self._finish()

    def train_step(self, batch: dict) -> tuple[dict[str, Tensor], float, Tensor | None]:
        """One optimiser step on a batch: forward and loss, backward, clipping, the step's learning rate, the update,
        EMA. Returns (``forward_loss``'s parts, learning rate, gradient norm before clipping or None)."""
        out = self.forward_loss(_to_device(batch, self.device))  # forward (autocast) + loss parts
        self.optimizer.zero_grad(set_to_none=True)
        out["loss"].backward()
        grad_norm = self._clip_gradients()
        lr = self._set_lr()
        self.optimizer.step()
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1
        return out, lr, grad_norm

    def forward_loss(self, batch: dict) -> dict[str, Tensor]:
        """Forward and loss of one batch (already on the device).

        Returns:
            ``{"loss": scalar with its graph, "logits": (B, C) detached, "loss_main": the loss_fn term,
            "loss_<name>": each aux loss}`` (the parts detached, for logging).
        """
        with self._autocast():
            out = self.net(batch)
        logits = out["logits"].float()  # (B, C); losses run in fp32
        targets = out.get("targets", batch["target"])  # (B, C): the model may fill unknowns (pseudo-labels)
        parts = {"loss_main": self.loss_fn(logits, targets, **out.get("loss_inputs", {}))}
        parts.update({f"loss_{k}": v.float() for k, v in out.get("aux_losses", {}).items()})
        loss = torch.stack(list(parts.values())).sum()
        logged = {f"loss_{k}": v for k, v in self.loss_fn.last_parts.items()}  # e.g. LMPT's db/cse
        return {"loss": loss, "logits": logits.detach(), **{k: v.detach() for k, v in {**logged, **parts}.items()}}

    def evaluate(self, dataset: Dataset, split: str = "test") -> dict:
        """Evaluator metrics of the current weights (EMA when enabled) on ``dataset`` (named ``split``).

        A collective under DDP: each rank scores a contiguous block of the dataset, the Evaluator gathers them.
        """
        return self._evaluate(dataset, split)[0]

    def _evaluate(self, dataset: Dataset, split: str) -> tuple[dict, tuple[Tensor, Tensor]]:
        """(``evaluate``'s metrics, this rank's (n_r, C) logits and targets)."""
        logits, targets = self._forward_all(shard(dataset, self.rank, self.world_size))  # (n_r, C) each
        return evaluate_logits(logits, targets, self.cfg, self.classnames, self.group_counts), (logits, targets)

    # ------------------------------------------------------------------------------ loop helpers
    def _default_sampler(self, train_set: Dataset) -> Sampler | None:
        if self.cfg.sampler.name != "random":
            targets = getattr(train_set, "targets", None)
            if targets is None:
                raise ValueError(f"sampler {self.cfg.sampler.name!r} needs train_set.targets, an (N, C) matrix")
            d = self.cfg.data
            kw = dict(rank=self.rank, world_size=self.world_size, head=d.head_threshold, tail=d.tail_threshold)
            return build_sampler(self.cfg.sampler, targets, self.cfg.seed, **kw)
        if self.world_size > 1:
            return DistributedSampler(train_set, self.world_size, self.rank, shuffle=True, seed=self.cfg.seed)
        return None

    def _loader(self, dataset: Dataset, train: bool) -> DataLoader:
        t = self.cfg.train
        kw: dict[str, Any] = dict(
            batch_size=t.batch_size, num_workers=t.num_workers, pin_memory=self.device.type == "cuda"
        )
        if train:  # seeded order: the sampler's set_epoch, or shuffling with the per-epoch generator
            kw.update(sampler=self.sampler, shuffle=self.sampler is None, generator=self.generator)
            kw.update(persistent_workers=t.num_workers > 0)
        return DataLoader(dataset, **kw)

    def start_epoch(self, epoch: int) -> None:
        """Seed the epoch's data order from (seed, epoch), put the model in training mode, call its epoch hook."""
        self.generator.manual_seed((self.cfg.seed * 1_000_003 + epoch) % 2**63)
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)
        self.net.train()
        self.loss_fn.train()
        self.model.set_epoch(epoch)  # e.g. TRM-ML's pseudo-label warm-up (the frozen parts stay in eval mode)
        self._tic = (time.perf_counter(), self.step)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.device.type == "cuda" and self.cfg.train.amp:
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _eval_weights(self) -> contextlib.AbstractContextManager:
        return self.ema.swap(self.model) if self.ema is not None else contextlib.nullcontext()

    def _clip_gradients(self) -> Tensor | None:
        """Clip the global gradient norm to ``grad_clip``; return the norm before clipping (None when off)."""
        if self.cfg.train.grad_clip > 0:
            return nn.utils.clip_grad_norm_(self.params, self.cfg.train.grad_clip)
        return None

    def _set_lr(self) -> float:
        lr = lr_at(self.step, self.total_steps, self.cfg.train)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _log_step(self, epoch: int, lr: float, out: dict, grad_norm: Tensor | None, bar: tqdm) -> None:
        if self.rank != 0 or (self.step % max(1, self.cfg.train.log_every) and self.step < self.total_steps):
            return
        (t0, s0), now = self._tic, time.perf_counter()
        record = {"step": self.step, "epoch": epoch + 1, "lr": lr}
        record.update({k: float(v.detach()) for k, v in out.items() if k != "logits"})
        if grad_norm is not None:
            record["grad_norm"] = float(grad_norm)
        record["sec_per_step"] = (now - t0) / max(1, self.step - s0)
        self._tic = (now, self.step)
        self._write_jsonl(record)
        bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")

    def _forward_all(self, dataset: Dataset) -> tuple[Tensor, Tensor]:
        """(N, C) float32 CPU logits and (N, C) targets of ``dataset`` with the evaluation weights."""
        with self._eval_weights():
            return forward_all(self.model, dataset, self.cfg.train, self.device, len(self.classnames))

    # ------------------------------------------------------------------------- run-folder state
    def _start(self, resumable: bool) -> int:
        """Restore ``state.pt`` (resume) or seed everything (fresh run); write config.yaml; return the first epoch."""
        if resumable:
            rundir.check_resume_config(self.run_dir / "config.yaml", to_dict(self.cfg), RESUMABLE_CHANGES,
                                       normalise=_resolved)  # fmt: skip
            self._restore(ckpt.load_state(self.run_dir / "state.pt"))
            logger.info("resumed %s after epoch %d (step %d)", self.run_dir, self.epoch, self.step)
        else:
            seed_everything(self.cfg.seed)
        if self.rank == 0:
            save_config(self.cfg, self.run_dir / "config.yaml")
            rundir.trim_jsonl(self.run_dir / "metrics.jsonl", self.step)  # drop steps logged after the state was saved
            self._scalars.purge_step = self.step + 1  # and TensorBoard drops them too (a fresh start: every step)
        barrier()
        return self.epoch

    def _restore(self, state: dict) -> None:
        parts = (self.model, self.optimizer, self.ema, self.loss_fn)
        counters = ckpt.restore_training_state(state, *parts, rank=self.rank, source=str(self.run_dir / "state.pt"))
        self.step, self.epoch, self.best = counters["step"], counters["epoch"], counters["best"]

    def _end_epoch(self, done: int, force: bool = False) -> None:
        """Evaluate on the selection split when due; write ``last`` (and ``best``) and ``state.pt``."""
        self.epoch, split = done, self.cfg.eval.select_on
        dataset, last = self.datasets[split], done >= self.cfg.train.epochs or self.step >= self.total_steps
        metrics = None
        stats = self.model.epoch_stats() if not force else {}
        if stats:  # the model's own counters of the epoch (e.g. pseudo-labels made / right)
            self._write_jsonl({"step": self.step, "epoch": done, "split": "train", **stats})
            if self.rank == 0:
                logger.info("epoch %d train: %s", done, ", ".join(f"{k} {v:.4g}" for k, v in stats.items()))
        if dataset is not None and (force or last or done % max(1, self.cfg.train.eval_every) == 0):
            metrics = self.evaluate(dataset, split)
            self._write_jsonl({"step": self.step, "epoch": done, "split": split, **_summary(metrics)})
            if self.rank == 0:
                logger.info("epoch %d %s: %s", done, split, ", ".join(f"{k} {_fmt(metrics[k])}" for k in SUMMARY_KEYS))
        score = -math.inf if metrics is None or metrics["map"] is None else metrics["map"]
        is_best = dataset is None or (metrics is not None and (score > self.best["map"] or self.best["epoch"] is None))
        if is_best:
            self.best = {"map": score, "epoch": done, "metrics": _summary(metrics)}
        rng = ckpt.gather_rng_states()
        if self.rank == 0:
            meta = self._meta(metrics)
            with self._eval_weights():
                ckpt.save_checkpoint(self.run_dir / "last", self.model, {**meta, "kind": "last"})
                if is_best:
                    ckpt.save_checkpoint(self.run_dir / "best", self.model, {**meta, "kind": "best"})
            parts = (self.model, self.optimizer, self.ema, self.loss_fn)
            state = ckpt.training_state(*parts, rng=rng, step=self.step, epoch=self.epoch, best=self.best)
            ckpt.save_state(self.run_dir / "state.pt", state)
        barrier()

    def _finish(self) -> dict:
        """Test the ``best`` checkpoint (on val when there is no test split) and write ``eval.json``."""
        if not (self.run_dir / "best.json").is_file():
            self._end_epoch(self.epoch, force=True)  # nothing was trained (no trainable parameter)
        ckpt.load_checkpoint(self.run_dir / "best", self.model)
        if self.ema is not None:
            self.ema = EMA(self.model, self.ema.decay)  # the model now holds the selected (EMA) weights
        split = "test" if self.datasets["test"] is not None else "val"  # no test list: report the val split
        test, self.test_scores = self._evaluate(self.datasets[split], split)  # the scores: this rank's block
        selected_on = self.cfg.eval.select_on if self.datasets[self.cfg.eval.select_on] is not None else "last_epoch"
        result = {**test, "split": split, "selected_epoch": self.best["epoch"], "selected_on": selected_on}
        result["selection"] = self.best["metrics"]
        if self.rank == 0:
            write_json(self.run_dir / "eval.json", result)
            self._write_jsonl({"step": self.step, "epoch": self.epoch, "split": split, **_summary(test)})
            logger.info("%s, epoch %s selected on %s:\n%s", split, self.best["epoch"], selected_on, format_table(test))
        barrier()
        return result

    def _meta(self, metrics: dict | None) -> dict:
        return {
            "config": to_dict(self.cfg),
            "classnames": self.classnames,
            "group_counts": self.group_counts,
            "epoch": self.epoch,
            "step": self.step,
            "selected_on": self.cfg.eval.select_on,
            "metrics": metrics,
        }

    def _write_jsonl(self, record: dict) -> None:
        if self.rank == 0:
            self._scalars.write(record)

    def _file_logging(self) -> contextlib.AbstractContextManager:
        return rundir.log_to_file(self.run_dir / "log.txt") if self.rank == 0 else contextlib.nullcontext()
