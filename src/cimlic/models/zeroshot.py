"""Zero-shot CLIP (METHODS §5.2): logit_c = s * cos(f_img, t_c), t_c from hand-written prompt templates."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from cimlic.models.base import FrozenClipMethod, MethodSpec
from cimlic.models.clip import ClipModel
from cimlic.models.text import class_text_features, cosine_logits

if TYPE_CHECKING:
    from cimlic.config import ModelConfig


class ZeroShotCLIP(FrozenClipMethod):
    """Zero-shot CLIP; a template ensemble (``model.templates``) averages the normalised prompt embeddings."""

    def __init__(self, clip: ClipModel, classnames: Sequence[str], templates: Sequence[str] = ("a photo of a {}.",)):
        super().__init__(clip, len(classnames))
        self.templates = list(templates)
        self.register_buffer("class_text", class_text_features(clip, classnames, templates), persistent=False)

    def text_features(self) -> Tensor:
        """The class text features (C, D) (fixed: computed once from the templates)."""
        return self.class_text

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        feats = self.batch_features(batch)
        text = self.text_features().to(feats["global"])
        return {"logits": cosine_logits(feats["global"], text, self.clip.logit_scale)}


def build(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> ZeroShotCLIP:
    return ZeroShotCLIP(clip, classnames, cfg.templates)


SPEC = MethodSpec(build, summary="zero-shot CLIP with hand-written prompts (model.templates)")
