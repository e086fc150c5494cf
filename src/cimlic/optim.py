"""Optimisers, the learning-rate schedule (a pure function of the step) and EMA of the trainable tensors."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from cimlic import checkpoint as ckpt
from cimlic.checkpoint import CheckpointError
from cimlic.config import TrainConfig
from cimlic.errors import ConfigError


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """Learning rate of optimiser step ``step`` (0-based) out of ``total_steps``: a pure function of the step.

    - cosine: linear warm-up ``lr * (step + 1) / warmup_steps`` (so step ``warmup_steps - 1`` runs at ``lr``),
      then half a cosine from ``lr`` down to 0 at ``total_steps``.
    - onecycle: PyTorch's ``OneCycleLR`` (cosine, two phases, default factors) exactly: half a cosine rising from
      ``lr / 25`` at step 0 to ``lr`` at step ``onecycle_pct * total - 1``, then half a cosine falling to
      ``lr / 25 / 1e4`` at step ``total - 1`` (no separate warm-up). Only the learning rate: OneCycleLR's momentum
      cycling is not reproduced.
    - constant: the same linear warm-up, then ``lr``.
    """
    peak, total = cfg.lr, max(int(total_steps), 0)
    s = min(max(int(step), 0), total)
    if cfg.schedule == "onecycle":
        return _onecycle(peak, min(s, total - 1), total, cfg.onecycle_pct)
    if s < cfg.warmup_steps:
        return peak * (s + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return peak
    if cfg.schedule == "cosine":
        return _cosine(peak, 0.0, (s - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))
    raise ConfigError(f"unknown schedule {cfg.schedule!r}; valid: ['cosine', 'onecycle', 'constant']")


def _onecycle(peak: float, step: int, total: int, pct: float) -> float:
    """PyTorch OneCycleLR's learning rate at ``step`` (``div_factor`` 25, ``final_div_factor`` 1e4, cosine)."""
    initial, up_end, last = peak / 25.0, pct * total - 1.0, total - 1.0  # phase ends, as OneCycleLR puts them
    if step <= up_end:
        return _cosine(initial, peak, step / up_end if up_end > 0 else 1.0)
    return _cosine(peak, initial / 1e4, (step - up_end) / (last - up_end) if last > up_end else 1.0)


def _cosine(start: float, end: float, t: float) -> float:
    """Half-cosine interpolation: ``start`` at t = 0, ``end`` at t = 1."""
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * min(max(t, 0.0), 1.0)))


class EMA:
    """Exponential moving average of the trainable tensors: ``shadow = decay * shadow + (1 - decay) * current``.

    Covers the floating-point tensors a checkpoint stores (trainable parameters, non-``clip.`` buffers).

    Args:
        model: the model whose tensors are averaged (the shadow starts as a copy of them).
        decay: in (0, 1), e.g. 0.998.
    """

    def __init__(self, model: nn.Module, decay: float) -> None:
        if not 0.0 < decay < 1.0:
            raise ConfigError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = float(decay)
        live = ckpt.trainable_tensors(model)
        self.shadow = {k: v.detach().clone() for k, v in live.items() if v.is_floating_point()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Move the shadow towards the model's current tensors."""
        live = ckpt.trainable_tensors(model)
        for name, s in self.shadow.items():
            s.lerp_(live[name].detach().to(s.dtype), 1.0 - self.decay)  # s + (1 - d)(x - s)

    @contextlib.contextmanager
    def swap(self, model: nn.Module) -> Iterator[None]:
        """Context in which the model holds the shadow tensors; its own tensors come back afterwards."""
        live = ckpt.trainable_tensors(model)
        saved = {k: live[k].detach().clone() for k in self.shadow}
        ckpt.load_trainable_state(model, self.shadow, strict=False, source="EMA")
        try:
            yield
        finally:
            ckpt.load_trainable_state(model, saved, strict=False, source="EMA")

    def state_dict(self) -> dict[str, Any]:
        """``{"decay": float, "shadow": {name: tensor}}``."""
        return {"decay": self.decay, "shadow": {k: v.detach().cpu().clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore a ``state_dict`` (names and shapes must match)."""
        if set(state["shadow"]) != set(self.shadow):
            raise CheckpointError(
                f"EMA state has tensors {sorted(state['shadow'])[:5]}, expected {sorted(self.shadow)[:5]}"
            )
        self.decay = float(state["decay"])
        with torch.no_grad():
            for k, v in state["shadow"].items():
                self.shadow[k].copy_(v)


def build_optimizer(params: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ConfigError(f"unknown optimizer {cfg.optimizer!r}; valid: ['adamw', 'sgd']")
