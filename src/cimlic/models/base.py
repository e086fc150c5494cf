"""The method contract: what the Trainer, the runner, the feature cache and the checkpoints know of a method.

A method is a :class:`Method` (an ``nn.Module``); nothing outside this contract is asked of it.

- **Frozen parts** are registered with :meth:`Method.freeze` (CLIP first, then e.g. HP-DVAL's stage-1 student or
  CPRFL's frozen backbone). A frozen part never trains, stays in eval mode whatever the Trainer does, is never
  written to a checkpoint (its weights come from elsewhere), and is the run's weights identity (``clip.json``:
  ``eval`` and ``predict`` refuse other frozen weights). Everything else a method holds is trainable state: its
  parameters with ``requires_grad`` and its persistent buffers are what a checkpoint stores.
- **Cached features**: :attr:`Method.feature_tower` is the frozen module whose outputs ``image_features(images)``
  returns (``None``: the image side trains, nothing can be cached); :attr:`Method.feature_keys` names them
  (``"global"`` (B, D), ``"local"`` (B, N, D)). The cache is keyed by that tower's weights, and a batch then holds
  ``"feat_<key>"`` instead of ``"image"``.
- **Cached teacher**: :attr:`Method.teacher_tower` is a frozen module a method runs on each *training* image beside
  its trainable image side (HP-DVAL's L_kd teacher); ``teacher_features(images)`` returns ``{"teacher": (B, D)}``.
  When the training view is deterministic (``train.augment`` off) those features are a function of the image
  alone: they come from the feature cache (keyed like any frozen tower's, view ``"teacher"``) and a training
  batch then holds ``"feat_teacher"`` beside ``"image"`` **[our design]**.
- **Input transform**: :meth:`Method.input_spec` is the (size, mean, std) of the images it expects.
- **Hooks**: :meth:`Method.set_epoch` before each training epoch, :meth:`Method.epoch_stats` after it (logged),
  :meth:`Method.training_inputs` for per-image training inputs beyond images and labels (LMPT's captions).
- **Forward**: ``forward(batch) -> {"logits": (B, C), "loss_inputs"?: {name: tensor}, "aux_losses"?: {name:
  scalar}, "targets"?: (B, C)}``. ``loss_inputs`` go to the loss as keyword arguments, ``aux_losses`` are added to
  it (and logged as ``loss_<name>``), ``targets`` replace the batch targets in the loss (pseudo-labels).

A method is registered by one :class:`MethodSpec` line in ``cimlic.models.METHODS``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from cimlic.cache import parts_digest, weights_digest
from cimlic.models.clip import ClipModel

if TYPE_CHECKING:
    from cimlic.config import Config, ModelConfig


class Method(nn.Module):
    """Base class of every method (see the module docstring for the contract).

    Args:
        num_classes: C, the number of classes the method scores.
    """

    feature_keys: tuple[str, ...] = ("global",)  # what image_features returns (and the feature cache stores)
    identity_names: dict[str, str] = {}  # frozen part -> the name its weights are digested under (older runs' name)

    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.num_classes = int(num_classes)
        self._frozen: dict[str, str] = {}  # name -> where its weights come from

    # ------------------------------------------------------------------------------ frozen parts
    def freeze(self, name: str, module: nn.Module, source: str = "") -> nn.Module:
        """Register ``module`` as the frozen part ``name`` (attribute ``self.<name>``); returns it."""
        module.requires_grad_(False).eval()
        self.add_module(name, module)
        self._frozen[name] = source or type(module).__name__
        return module

    def frozen_parts(self) -> dict[str, nn.Module]:
        """The frozen parts, in registration order."""
        return {name: getattr(self, name) for name in self._frozen}

    def frozen_prefixes(self) -> tuple[str, ...]:
        """State-dict name prefixes of the frozen parts (``"clip."``, ...): never checkpointed."""
        return tuple(f"{name}." for name in self._frozen)

    def identity(self) -> dict[str, Any]:
        """The run's weights identity (``clip.json``): each frozen part's source and digest, and one digest of all."""
        parts = {self.identity_names.get(name, name): module for name, module in self.frozen_parts().items()}
        clip = self._modules.get("clip")
        return {
            "arch": clip.arch if isinstance(clip, ClipModel) else None,
            "source": " + ".join(f"{name}: {src}" if name != "clip" else src for name, src in self._frozen.items()),
            "digest": parts_digest(parts),
            "parts": {name: weights_digest(module) for name, module in parts.items()},
        }

    def train(self, mode: bool = True) -> Method:
        """Training or eval mode for the trainable parts; the frozen parts stay in eval mode."""
        super().train(mode)
        for module in self.frozen_parts().values():
            module.eval()
        return self

    # -------------------------------------------------------------------------------- features
    @property
    def feature_tower(self) -> nn.Module | None:
        """The frozen module ``image_features`` depends on (its weights key the cache); None: nothing to cache."""
        return None

    @torch.no_grad()
    def image_features(self, images: Tensor) -> dict[str, Tensor]:
        """What the feature cache stores for a batch of images: ``{key: tensor}`` for each of ``feature_keys``."""
        raise NotImplementedError(f"{type(self).__name__} has no cacheable image features")

    @property
    def teacher_tower(self) -> nn.Module | None:
        """The frozen module ``teacher_features`` depends on (its weights key the cache); None: no teacher."""
        return None

    @torch.no_grad()
    def teacher_features(self, images: Tensor) -> dict[str, Tensor]:
        """What the feature cache stores for the teacher: ``{"teacher": (B, D)}``."""
        raise NotImplementedError(f"{type(self).__name__} has no teacher")

    def input_spec(self) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
        """(size, mean, std) of the images the method expects: CLIP's by default."""
        clip = self.clip
        return int(clip.image_size), tuple(clip.image_mean), tuple(clip.image_std)

    # ----------------------------------------------------------------------------------- hooks
    def set_epoch(self, epoch: int) -> None:
        """Called before each training epoch (0-based)."""

    def epoch_stats(self) -> dict[str, float]:
        """Called after each training epoch: the method's own counters of the epoch (logged)."""
        return {}

    def training_inputs(self, cfg: Config, ids: Sequence[str]) -> dict[str, Tensor]:
        """Per-image training inputs beyond images and labels: ``{batch key: (N, ...)}`` in the order of ``ids``."""
        return {}


class FrozenClipMethod(Method):
    """A method on a frozen CLIP whose image features are cacheable (zero-shot, probe, CoOp family, TRM-ML)."""

    def __init__(self, clip: ClipModel, num_classes: int) -> None:
        super().__init__(num_classes)
        self.freeze("clip", clip, clip.source)

    @property
    def feature_tower(self) -> nn.Module:
        return self.clip

    @torch.no_grad()
    def image_features(self, images: Tensor) -> dict[str, Tensor]:
        """``{"global": (B, D)}`` (+ ``"local": (B, N, D)`` when ``feature_keys`` asks for it)."""
        if "local" in self.feature_keys:
            return self.clip.encode_image_dense(images)
        return {"global": self.clip.encode_image(images)}

    def batch_features(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Image features of a batch: the cached ``feat_*`` tensors when present, else the frozen tower's."""
        keys = self.feature_keys
        if all(f"feat_{k}" in batch for k in keys):
            return {k: batch[f"feat_{k}"].to(self.clip.device, self.clip.dtype) for k in keys}
        if "image" in batch:
            return self.image_features(batch["image"].to(self.clip.device, self.clip.dtype))
        wanted = " and ".join(f"'feat_{k}'" for k in keys)
        raise KeyError(f"{type(self).__name__}: the batch needs 'image' or cached {wanted}; got keys {sorted(batch)}")


Builder = Callable[["ModelConfig", list[str], ClipModel], Method]
Stages = Callable[["Config", Path], list[tuple[str, "Config"]]]


@dataclass(frozen=True)
class MethodSpec:
    """One line of the method table (``cimlic.models.METHODS``).

    Attributes:
        build: ``build(cfg.model, classnames, clip) -> Method``.
        sections: the ``model.<key>`` config sections the method reads, ``{key: dataclass}`` (sections may be shared
            by several methods, e.g. ``diversity``); they become fields of ``cimlic.config.ModelConfig``.
        stages: for a method trained as several runs (HP-DVAL's two stages): ``stages(cfg, run_dir)`` returns the
            ordered ``(sub-folder, config)`` of each run (the last one is the method's result); None for one run.
        loss_inputs: the ``loss_inputs`` its forward provides (``lmpt``: caption and prompt embeddings); a loss that
            needs others (``cimlic.losses.LOSS_INPUTS``) is refused before anything is computed.
        summary: one line for listings and the docs.
    """

    build: Builder | None
    sections: Mapping[str, type] = field(default_factory=dict)
    stages: Stages | None = None
    loss_inputs: tuple[str, ...] = ()
    summary: str = ""
