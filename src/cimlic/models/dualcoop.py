"""DualCoOp (METHODS §5.2): positive and negative prompts per class, aggregated over the local image tokens."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cimlic.errors import ConfigError
from cimlic.models.base import FrozenClipMethod, MethodSpec
from cimlic.models.clip import ClipModel
from cimlic.models.prompts import PromptLearner, encode_prompts

if TYPE_CHECKING:
    from cimlic.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class DualCoOpConfig:
    n_ctx_neg: int = 16  # context length of the negative prompts (the positive ones: model.n_ctx)
    tau_s: float = 20.0  # spatial softmax temperature
    tau: float = 5.0  # logit scale of the aggregated region scores
    learn_temps: bool = False  # learn tau_s and tau (in log space)
    logit: Literal["paper", "released"] = "paper"  # released: tau_s * tau * sum_r a s (tau_s reused: 100x)
    mean_token: bool = False  # ResNet CLIPs: the attention pool's mean token as one more region (released: 50)

    RANGES = {"n_ctx_neg": ">=1", "tau_s": ">0", "tau": ">0"}


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


class DualCoOp(FrozenClipMethod):
    """DualCoOp: positive and negative prompts per class scored against every local image token.

    Region scores s+-_{r,c} = cos(local_r, t+-_c); the spatial weights softmax_r(tau_s s+_{r,c}) are shared by both
    prompts; logit_c = tau sum_r a_{r,c} s+_{r,c} - tau sum_r a_{r,c} s-_{r,c}. ``ctx_init`` initialises the
    positive context only (the negative one starts at N(0, 0.02)); with ``learn_temps`` tau_s and tau are learned
    in log space (parameters ``log_tau_s``, ``log_tau``). Released-code switches (``model.dualcoop.logit: released``
    and ``model.dualcoop.mean_token``, set by ``model.preset: released``): ``released_logit`` (the logits carry
    tau_s * tau, see :func:`dualcoop_aggregate`) and ``mean_token`` (ResNet CLIPs: the attention pool's mean token
    is one more region, 50 instead of 49; ViT towers have no such token and keep their patch tokens).
    """

    feature_keys = ("global", "local")

    def __init__(
        self,
        clip: ClipModel,
        classnames: Sequence[str],
        n_ctx: int = 16,
        n_ctx_neg: int = 16,
        ctx_init: str = "",
        csc: bool = False,
        tau_s: float = 20.0,
        tau: float = 5.0,
        learn_temps: bool = False,
        released_logit: bool = False,
        mean_token: bool = False,
    ) -> None:
        super().__init__(clip, len(classnames))
        if tau_s <= 0 or tau <= 0:
            raise ConfigError(f"model.dualcoop temperatures must be > 0 (tau_s={tau_s}, tau={tau})")
        self.released_logit = released_logit
        self.mean_token = mean_token and clip.has_mean_token
        if mean_token and not clip.has_mean_token:
            logger.info("model.dualcoop.mean_token: CLIP %s has no attention-pool mean token; its patch tokens are "
                        "the regions", clip.arch)  # fmt: skip
        self.prompt_pos = PromptLearner(clip, classnames, n_ctx, ctx_init, csc)
        self.prompt_neg = PromptLearner(clip, classnames, n_ctx_neg, "", csc)
        for name, value in (("log_tau_s", tau_s), ("log_tau", tau)):
            log_value = torch.tensor(math.log(value), device=clip.device)
            if learn_temps:
                setattr(self, name, nn.Parameter(log_value))
            else:
                self.register_buffer(name, log_value, persistent=False)

    @property
    def tau_s(self) -> Tensor:
        return self.log_tau_s.exp()

    @property
    def tau(self) -> Tensor:
        return self.log_tau.exp()

    def prompt_features(self) -> tuple[Tensor, Tensor]:
        """Positive and negative prompt text features, (C, D) each."""
        pos, neg = encode_prompts(self.clip, self.prompt_pos, self.prompt_neg)
        return pos, neg

    def region_scores(self, local: Tensor) -> tuple[Tensor, Tensor]:
        """Cosine scores (B, N, C) of every local token (B, N, D) against the positive and negative prompts."""
        pos, neg = self.prompt_features()
        local = F.normalize(local, dim=-1)
        return local @ F.normalize(pos, dim=-1).T, local @ F.normalize(neg, dim=-1).T

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        local = self.batch_features(batch)["local"]  # (B, N, D)
        if self.mean_token:
            local = self.clip.add_mean_token(local)  # (B, 1 + N, D)
        s_pos, s_neg = self.region_scores(local)
        return {"logits": dualcoop_aggregate(s_pos, s_neg, self.tau_s, self.tau, self.released_logit)}


def build(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> DualCoOp:
    d = cfg.dualcoop
    return DualCoOp(
        clip, classnames, cfg.n_ctx, d.n_ctx_neg, cfg.ctx_init, cfg.csc, d.tau_s, d.tau, d.learn_temps,
        released_logit=d.logit == "released", mean_token=d.mean_token,
    )  # fmt: skip


SPEC = MethodSpec(build, {"dualcoop": DualCoOpConfig}, summary="DualCoOp: positive/negative prompts over regions")
