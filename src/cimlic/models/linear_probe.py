"""Linear probe (METHODS §5.2): a linear classifier on the frozen global CLIP image feature."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cimlic.models.base import FrozenClipMethod, MethodSpec
from cimlic.models.clip import ClipModel
from cimlic.models.text import class_text_features

if TYPE_CHECKING:
    from cimlic.config import ModelConfig


@dataclass
class LinearProbeConfig:
    dropout: float = 0.0  # dropout on the image feature
    normalize: bool = True  # L2-normalise the image feature first
    init: Literal["random", "zeroshot"] = "random"  # start from PyTorch's init or at exactly zero-shot CLIP

    RANGES = {"dropout": "[0, 1)"}


class LinearProbe(FrozenClipMethod):
    """A linear classifier on the frozen global image feature (optionally L2-normalised, with dropout)."""

    def __init__(self, clip: ClipModel, num_classes: int, normalize: bool = True, dropout: float = 0.0) -> None:
        super().__init__(clip, num_classes)
        self.normalize = normalize
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(clip.embed_dim, num_classes)

    @torch.no_grad()
    def init_from_text(self, text_features: Tensor) -> None:
        """Start at zero-shot CLIP: weight = s * t_c (normalised class text features (C, D)), bias 0.

        With ``normalize`` the initial logits are exactly zero-shot CLIP's s * cos(f, t_c); training then moves the
        classifier away from that prior only as far as the data asks (the tail keeps the text prior, the head adapts).
        """
        if text_features.shape != self.head.weight.shape:
            raise ValueError(
                f"text features {tuple(text_features.shape)} do not fit the probe {tuple(self.head.weight.shape)}"
            )
        scale = float(self.clip.logit_scale)
        self.head.weight.copy_(scale * F.normalize(text_features.float(), dim=-1))
        self.head.bias.zero_()

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        f = self.batch_features(batch)["global"]  # (B, D)
        if self.normalize:
            f = F.normalize(f, dim=-1)
        return {"logits": self.head(self.dropout(f))}


def build(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> LinearProbe:
    p = cfg.linear_probe
    probe = LinearProbe(clip, len(classnames), normalize=p.normalize, dropout=p.dropout)
    if p.init == "zeroshot":
        probe.init_from_text(class_text_features(clip, classnames, cfg.templates))
    return probe


SPEC = MethodSpec(build, {"linear_probe": LinearProbeConfig}, summary="a linear layer on the frozen image feature")
