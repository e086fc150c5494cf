"""LMPT (METHODS §5.2): class-specific CoOp prompts trained with DB + the class-specific embedding loss on captions.

LMPT owns its extra training input: the captions of the training images (``data.captions``, ``id<TAB>caption``)
become ``batch["caption_tokens"]`` (:meth:`LMPT.training_inputs`); the model turns them into the CSE loss inputs.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from cimlic.data.captions import read_captions
from cimlic.errors import ConfigError
from cimlic.models.base import MethodSpec
from cimlic.models.clip import ClipModel
from cimlic.models.coop import CoOp
from cimlic.models.text import cosine_logits

if TYPE_CHECKING:
    from cimlic.config import Config, ModelConfig

logger = logging.getLogger(__name__)


class LMPT(CoOp):
    """LMPT: with ``batch["caption_tokens"]`` (B, L) it also returns the CSE loss inputs.

    The caption tokens are encoded by the frozen text tower into ``loss_inputs["caption_emb"]`` (B, D), next to
    ``loss_inputs["prompt_emb"]`` (C, D). Without captions (evaluation) only the logits are returned.
    """

    def __init__(self, clip: ClipModel, classnames: Sequence[str], n_ctx: int = 16, ctx_init: str = "") -> None:
        super().__init__(clip, classnames, n_ctx, ctx_init, csc=True)

    def tokenize_captions(self, captions: Sequence[str]) -> Tensor:
        """Caption token ids (B, L) for ``batch["caption_tokens"]``."""
        return self.clip.tokenize(captions)

    def training_inputs(self, cfg: Config, ids: Sequence[str]) -> dict[str, Tensor]:
        """``{"caption_tokens": (N, L)}`` from ``data.captions`` for the training images ``ids``."""
        if not cfg.data.captions:
            if cfg.loss.name == "lmpt":
                raise ConfigError("loss.name=lmpt needs data.captions (an id<TAB>caption file for the training images)")
            return {}
        return {"caption_tokens": self.tokenize_captions(read_captions(cfg.data.captions, list(ids)))}

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        feats = self.batch_features(batch)
        text = self.text_features()  # (C, D)
        out = {"logits": cosine_logits(feats["global"], text, self.clip.logit_scale)}
        tokens = batch.get("caption_tokens")
        if tokens is not None:
            if tokens.ndim != 2 or tokens.shape[1] != self.clip.context_length:
                raise ValueError(
                    f"LMPT: caption_tokens must be (B, {self.clip.context_length}) from this CLIP's tokenizer "
                    f"(LMPT.tokenize_captions); got {tuple(tokens.shape)}"
                )
            with torch.no_grad():
                captions = self.clip.encode_text(tokens.to(self.clip.device))  # (B, D)
            out["loss_inputs"] = {"prompt_emb": text, "caption_emb": captions}
        return out


def build(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> LMPT:
    if not cfg.csc:
        logger.info("LMPT uses class-specific prompts (model.csc=false is ignored)")
    return LMPT(clip, classnames, cfg.n_ctx, cfg.ctx_init)


SPEC = MethodSpec(build, loss_inputs=("caption_emb", "prompt_emb"),
                  summary="LMPT: class-specific prompts, DB + caption embedding loss (data.captions)")  # fmt: skip
