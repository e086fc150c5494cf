"""CoOp (METHODS §5.2): learned prompt contexts on a frozen CLIP; logit_c = s * cos(f_img, t_c)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from torch import Tensor

from cimlic.models.base import FrozenClipMethod, MethodSpec
from cimlic.models.clip import ClipModel
from cimlic.models.prompts import PromptLearner, encode_prompts
from cimlic.models.text import cosine_logits

if TYPE_CHECKING:
    from cimlic.config import ModelConfig


class CoOp(FrozenClipMethod):
    """CoOp: t_c is the text feature of a learned prompt, s CLIP's frozen logit scale.

    Args:
        clip: the frozen CLIP. classnames: C class names. n_ctx: context vectors M (``model.n_ctx``).
        ctx_init: initialise the context from these words (``model.ctx_init``). csc: class-specific contexts.
    """

    def __init__(
        self, clip: ClipModel, classnames: Sequence[str], n_ctx: int = 16, ctx_init: str = "", csc: bool = False
    ) -> None:
        super().__init__(clip, len(classnames))
        self.prompt = PromptLearner(clip, classnames, n_ctx, ctx_init, csc)

    def text_features(self) -> Tensor:
        """Prompt text features (C, D) (recomputed each call: they depend on the learned context)."""
        return encode_prompts(self.clip, self.prompt)[0]

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        feats = self.batch_features(batch)
        return {"logits": cosine_logits(feats["global"], self.text_features(), self.clip.logit_scale)}


def build(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> CoOp:
    return CoOp(clip, classnames, cfg.n_ctx, cfg.ctx_init, cfg.csc)


SPEC = MethodSpec(build, summary="CoOp: 16 learned context vectors, shared or class-specific (model.csc)")
