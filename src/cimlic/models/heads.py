"""Heads: the frozen-CLIP model base, zero-shot CLIP, linear probe, DualCoOp aggregation, GE/FD diversity module.

Model contract (DESIGN.md): ``forward(batch) -> {"logits": (B, C), ...}``. A batch holds ``"image"`` (B, 3, H, W)
or cached frozen features ``"feat_global"`` (B, D) (+ ``"feat_local"`` (B, N, D) when ``needs_local_features``);
the cache stores what ``image_features(images)`` returns, under ``"feat_<key>"``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cimlic.config import DiversityConfig
from cimlic.errors import ConfigError
from cimlic.models.clip import ClipModel

logger = logging.getLogger(__name__)


class FrozenClipModel(nn.Module):
    """Base of models whose CLIP (attribute ``clip``) is frozen: image features come from the cache or the tower."""

    uses_frozen_image_tower = True
    needs_local_features = False

    def __init__(self, clip: ClipModel) -> None:
        super().__init__()
        self.clip = clip

    @torch.no_grad()
    def image_features(self, images: Tensor) -> dict[str, Tensor]:
        """What the feature cache stores: ``{"global": (B, D)}`` (+ ``"local": (B, N, D)`` if needed)."""
        if self.needs_local_features:
            return self.clip.encode_image_dense(images)
        return {"global": self.clip.encode_image(images)}

    def batch_features(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Image features of a batch: the cached ``feat_*`` tensors when present, else the frozen tower's."""
        keys = ["global", "local"] if self.needs_local_features else ["global"]
        if all(f"feat_{k}" in batch for k in keys):
            return {k: batch[f"feat_{k}"].to(self.clip.device, self.clip.dtype) for k in keys}
        if "image" in batch:
            return self.image_features(batch["image"].to(self.clip.device, self.clip.dtype))
        wanted = " and ".join(f"'feat_{k}'" for k in keys)
        raise KeyError(f"{type(self).__name__}: the batch needs 'image' or cached {wanted}; got keys {sorted(batch)}")


def prompt_classname(name: str) -> str:
    """A class name as it goes into a prompt: underscores read as spaces ("potted_plant" -> "potted plant")."""
    return " ".join(str(name).replace("_", " ").split())


@torch.no_grad()
def class_text_features(clip: ClipModel, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """Normalised class embeddings (C, D): per template encode, normalise, average over templates, renormalise."""
    if not templates:
        raise ConfigError("at least one prompt template is needed, e.g. 'a photo of a {}.'")
    bad = [t for t in templates if "{}" not in t]
    if bad:
        raise ConfigError(f"prompt templates need a '{{}}' slot for the class name: {bad}")
    names = [prompt_classname(n) for n in classnames]
    total = None
    for template in templates:
        tokens = clip.tokenize([template.format(name) for name in names])
        feats = F.normalize(clip.encode_text(tokens).float(), dim=-1)  # (C, D)
        total = feats if total is None else total + feats
    return F.normalize(total / len(templates), dim=-1)


def cosine_logits(image: Tensor, text: Tensor, scale: float | Tensor) -> Tensor:
    """scale * cos(image_b, text_c): (B, D) x (C, D) -> (B, C)."""
    return scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T


class ZeroShotCLIP(FrozenClipModel):
    """Zero-shot CLIP: logit_c = s * cos(f_img, t_c), t_c from hand-written templates (ensemble = mean embedding)."""

    def __init__(self, clip: ClipModel, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",)):
        super().__init__(clip)
        self.templates = list(templates)
        self.register_buffer("text_features", class_text_features(clip, classnames, templates), persistent=False)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        feats = self.batch_features(batch)
        return {"logits": cosine_logits(feats["global"], self.text_features.to(feats["global"]), self.clip.logit_scale)}


class LinearProbe(FrozenClipModel):
    """A linear classifier on the frozen global image feature (optionally L2-normalised, with dropout)."""

    def __init__(self, clip: ClipModel, num_classes: int, normalize: bool = True, dropout: float = 0.0) -> None:
        super().__init__(clip)
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


def dualcoop_aggregate(
    s_pos: Tensor, s_neg: Tensor, tau_s: float | Tensor, tau: float | Tensor, released: bool = False
) -> Tensor:
    """DualCoOp class logits (B, C) from region-class scores (B, N, C) of the positive and negative prompts.

    a_{r,c} = softmax_r(tau_s * s+_{r,c}) is shared by both prompts; logit+-_c = tau * sum_r a_{r,c} s+-_{r,c};
    the result is logit+ - logit-. ``released``: the released code sums the tau_s-scaled scores,
    logit+-_c = tau * sum_r a_{r,c} (tau_s s+-_{r,c}), so the logits carry tau_s * tau (= 100).
    """
    a = torch.softmax(tau_s * s_pos, dim=1)  # (B, N, C): spatial weights per class
    scale = tau_s * tau if released else tau
    return scale * (a * s_pos).sum(dim=1) - scale * (a * s_neg).sum(dim=1)  # (B, C)


class DiversityModule(nn.Module):
    """GE/FD diversity enhancement **[our design]** (Chen et al., IEEE TMM 2025, only the abstract is public).

    The C category-specific features pass through one self-attention layer *across categories*, with a residual
    connection and dropout, so that tail-class features borrow information from all categories:
    x' = x + Dropout(MHA(LN(x), LN(x), LN(x))). The output projection starts at zero, so a freshly added module is
    the identity and switching it on does not disturb the model it is inserted into.

    Args:
        dim: token width D.
        heads: attention heads (must divide ``dim``).
        dropout: dropout on the attention output before the residual.
    """

    def __init__(self, dim: int, heads: int = 4, dropout: float = 0.1) -> None:
        super().__init__()
        if dim % heads:
            raise ConfigError(f"diversity module: heads ({heads}) must divide the token width ({dim})")
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.dropout = nn.Dropout(dropout)
        nn.init.zeros_(self.attn.out_proj.weight)
        nn.init.zeros_(self.attn.out_proj.bias)

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, D) category features -> (B, C, D)."""
        h = self.norm(x)
        mixed, _ = self.attn(h, h, h, need_weights=False)  # (B, C, D): every category attends to all
        return x + self.dropout(mixed)


def build_diversity(cfg: DiversityConfig, dim: int) -> nn.Module:
    """``DiversityModule`` when ``cfg.enabled`` (a ``DiversityConfig``), else the identity (the ablation switch)."""
    return DiversityModule(dim, cfg.heads, cfg.dropout) if cfg.enabled else nn.Identity()
