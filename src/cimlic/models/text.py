"""Text-side helpers shared by the methods: class names in prompts, class text features, cosine logits."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from cimlic.errors import ConfigError
from cimlic.models.clip import ClipModel
from cimlic.ranges import one_slot


def prompt_classname(name: str) -> str:
    """A class name as it goes into a prompt: underscores read as spaces ("potted_plant" -> "potted plant")."""
    return " ".join(str(name).replace("_", " ").split())


def _check_templates(templates: Sequence[str]) -> None:
    if not templates:
        raise ConfigError("at least one prompt template is needed, e.g. 'a photo of a {}.'")
    bad = [t for t in templates if not one_slot(t)]
    if bad:
        raise ConfigError(f"prompt templates need exactly one '{{}}' slot for the class name: {bad}")


@torch.no_grad()
def class_text_features(clip: ClipModel, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """Normalised class embeddings (C, D): per template encode, normalise, average over templates, renormalise."""
    _check_templates(templates)
    names = [prompt_classname(n) for n in classnames]
    total = None
    for template in templates:
        tokens = clip.tokenize([template.format(name) for name in names])
        feats = F.normalize(clip.encode_text(tokens).float(), dim=-1)  # (C, D)
        total = feats if total is None else total + feats
    return F.normalize(total / len(templates), dim=-1)


@torch.no_grad()
def hand_text_features(clip: ClipModel, classnames: Sequence[str], templates: Sequence[str]) -> Tensor:
    """Unnormalised text features (C, D) of hand-crafted prompts: the mean over templates of ``encode_text``."""
    _check_templates(templates)
    names = [prompt_classname(n) for n in classnames]
    feats = [clip.encode_text(clip.tokenize([t.format(n) for n in names])).float() for t in templates]
    return torch.stack(feats).mean(dim=0)


def cosine_logits(image: Tensor, text: Tensor, scale: float | Tensor) -> Tensor:
    """scale * cos(image_b, text_c): (B, D) x (C, D) -> (B, C)."""
    return scale * F.normalize(image, dim=-1) @ F.normalize(text, dim=-1).T
