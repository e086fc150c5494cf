"""Prompt learning on a frozen CLIP: the context learner and the CoOp, DualCoOp and LMPT models (METHODS §5.2).

A prompt is ``[SOS] ctx_1 .. ctx_M <class-name tokens> . [EOS]``: the M context vectors are learned, everything
else is CLIP's own token embeddings, computed once from the class names (buffers, ``persistent=False``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cimlic.errors import ConfigError
from cimlic.models.clip import ClipModel
from cimlic.models.heads import FrozenClipModel, cosine_logits, dualcoop_aggregate, prompt_classname

logger = logging.getLogger(__name__)


def _check_prompts_fit(clip: ClipModel, prompts: list[str], names: list[str]) -> None:
    """Raise when a prompt would be truncated by the text tower (its class name would be cut)."""
    full = clip.tokenize(prompts, context_length=4 * clip.context_length)
    need = (full != 0).sum(dim=-1)  # [SOS] .. [EOS]; padding id is 0
    over = (need > clip.context_length).nonzero().flatten().tolist()
    if over:
        i = over[0]
        raise ConfigError(
            f"the prompt for class {names[i]!r} needs {int(need[i])} tokens but CLIP {clip.arch!r} holds "
            f"{clip.context_length}: use fewer context vectors (model.n_ctx) or a shorter class name"
        )


class PromptLearner(nn.Module):
    """Learnable context vectors, shared by all classes or class-specific (``csc``), spliced into class prompts.

    It holds no reference to CLIP (CLIP's weights stay under the model's ``clip.`` prefix): ``forward()`` returns
    the prompt embeddings (C, L', W) for ``ClipModel.encode_text_from_embeddings(emb, self.eot_index)``.

    Args:
        clip: the frozen CLIP whose tokenizer and token table build the fixed parts.
        classnames: C class names (underscores read as spaces).
        n_ctx: number M of context vectors (ignored when ``ctx_init`` is given: M = its token count).
        ctx_init: initialise the context from the embeddings of these words; empty = N(0, init_std).
        csc: class-specific contexts (C, M, W) instead of one shared (M, W).
        init_std: standard deviation of the random initialisation.
    """

    def __init__(
        self,
        clip: ClipModel,
        classnames: Sequence[str],
        n_ctx: int = 16,
        ctx_init: str = "",
        csc: bool = False,
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        names = [prompt_classname(n) for n in classnames]
        if not names:
            raise ValueError("a prompt learner needs at least one class name")
        words = " ".join(ctx_init.split())
        if words:
            n_ctx = int(clip.eot_index(clip.tokenize([words]))[0]) - 1  # tokens between [SOS] and [EOS]
        elif n_ctx < 1:
            raise ConfigError(f"n_ctx must be >= 1 (got {n_ctx})")
        placeholder = words or " ".join(["X"] * n_ctx)
        prompts = [f"{placeholder} {name}." for name in names]
        _check_prompts_fit(clip, prompts, names)
        tokens = clip.tokenize(prompts)  # (C, L)
        eot = clip.eot_index(tokens)  # (C,)
        # with a causal text tower nothing after [EOS] matters: keep only the positions up to the last [EOS]
        length = int(eot.max()) + 1 if clip.causal_text else tokens.shape[1]
        with torch.no_grad():
            emb = clip.token_embedding(tokens[:, :length])  # (C, L', W)
        if words:
            ctx = emb[0, 1 : 1 + n_ctx].clone()  # (M, W): the init words' own embeddings
            if csc:
                ctx = ctx.unsqueeze(0).repeat(len(names), 1, 1)  # (C, M, W)
        else:
            ctx = torch.empty((len(names), n_ctx, emb.shape[-1]) if csc else (n_ctx, emb.shape[-1]), dtype=emb.dtype)
            nn.init.normal_(ctx, std=init_std)
        self.classnames, self.n_ctx, self.csc = names, n_ctx, csc
        self.ctx = nn.Parameter(ctx.to(emb.device))
        self.register_buffer("prefix", emb[:, :1].clone(), persistent=False)  # (C, 1, W): [SOS]
        self.register_buffer("suffix", emb[:, 1 + n_ctx :].clone(), persistent=False)  # (C, L'-1-M, W)
        self.register_buffer("eot_index", eot, persistent=False)  # (C,)
        logger.debug("prompt learner: %d classes, %d context vectors, csc=%s, init=%r", len(names), n_ctx, csc, words)

    def forward(self) -> Tensor:
        """Prompt embeddings (C, L', W)."""
        ctx = self.ctx if self.csc else self.ctx.unsqueeze(0).expand(self.prefix.shape[0], -1, -1)  # (C, M, W)
        return torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)


def encode_prompts(clip: ClipModel, *learners: PromptLearner) -> list[Tensor]:
    """Text features (C_i, D) of each learner's prompts, in one pass through the text tower when shapes allow."""
    embs = [learner() for learner in learners]
    if len({e.shape[1:] for e in embs}) == 1:
        feats = clip.encode_text_from_embeddings(torch.cat(embs), torch.cat([lr.eot_index for lr in learners]))
        return list(feats.split([e.shape[0] for e in embs]))
    return [clip.encode_text_from_embeddings(e, lr.eot_index) for e, lr in zip(embs, learners, strict=True)]


class CoOp(FrozenClipModel):
    """CoOp: logit_c = s * cos(f_img, t_c), t_c the text feature of a learned prompt, s CLIP's frozen scale."""

    def __init__(
        self, clip: ClipModel, classnames: Sequence[str], n_ctx: int = 16, ctx_init: str = "", csc: bool = False
    ) -> None:
        super().__init__(clip)
        self.prompt = PromptLearner(clip, classnames, n_ctx, ctx_init, csc)

    def text_features(self) -> Tensor:
        """Prompt text features (C, D) (recomputed each call: they depend on the learned context)."""
        return self.clip.encode_text_from_embeddings(self.prompt(), self.prompt.eot_index)

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        feats = self.batch_features(batch)
        return {"logits": cosine_logits(feats["global"], self.text_features(), self.clip.logit_scale)}


class LMPT(CoOp):
    """LMPT: class-specific CoOp prompts; with captions in the batch it also returns the CSE loss inputs.

    ``batch["caption_tokens"]`` (B, L) (from ``tokenize_captions``) are encoded
    by the frozen text tower into ``loss_inputs["caption_emb"]`` (B, D), next to ``loss_inputs["prompt_emb"]`` (C, D).
    Without captions (evaluation) only the logits are returned.
    """

    def __init__(self, clip: ClipModel, classnames: Sequence[str], n_ctx: int = 16, ctx_init: str = "") -> None:
        super().__init__(clip, classnames, n_ctx, ctx_init, csc=True)

    def tokenize_captions(self, captions: Sequence[str]) -> Tensor:
        """Caption token ids (B, L) for ``batch["caption_tokens"]``."""
        return self.clip.tokenize(captions)

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


class DualCoOp(FrozenClipModel):
    """DualCoOp: positive and negative prompts per class scored against every local image token.

    Region scores s+-_{r,c} = cos(local_r, t+-_c); the spatial weights softmax_r(tau_s s+_{r,c}) are shared by both
    prompts; logit_c = tau sum_r a_{r,c} s+_{r,c} - tau sum_r a_{r,c} s-_{r,c}. ``ctx_init`` initialises the
    positive context only (the negative one starts at N(0, 0.02)); with ``learn_temps`` tau_s and tau are learned
    in log space (parameters ``log_tau_s``, ``log_tau``). Released-code switches: ``released_logit`` (the logits
    carry tau_s * tau, see :func:`dualcoop_aggregate`) and ``mean_token`` (ResNet CLIPs: the attention pool's mean
    token is one more region, 50 instead of 49; ViT towers have no such token and keep their patch tokens).
    """

    needs_local_features = True

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
        super().__init__(clip)
        if tau_s <= 0 or tau <= 0:
            raise ConfigError(f"DualCoOp temperatures must be > 0 (tau_s={tau_s}, tau={tau})")
        self.released_logit = released_logit
        self.mean_token = mean_token and clip.has_mean_token
        if mean_token and not clip.has_mean_token:
            logger.info("model.dense_mean_token: CLIP %s has no attention-pool mean token; its patch tokens are the "
                        "regions", clip.arch)  # fmt: skip
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

    def text_features(self) -> tuple[Tensor, Tensor]:
        """Positive and negative prompt text features, (C, D) each."""
        pos, neg = encode_prompts(self.clip, self.prompt_pos, self.prompt_neg)
        return pos, neg

    def region_scores(self, local: Tensor) -> tuple[Tensor, Tensor]:
        """Cosine scores (B, N, C) of every local token (B, N, D) against the positive and negative prompts."""
        pos, neg = self.text_features()
        local = F.normalize(local, dim=-1)
        return local @ F.normalize(pos, dim=-1).T, local @ F.normalize(neg, dim=-1).T

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        local = self.batch_features(batch)["local"]  # (B, N, D)
        if self.mean_token:
            local = self.clip.add_mean_token(local)  # (B, 1 + N, D)
        s_pos, s_neg = self.region_scores(local)
        return {"logits": dualcoop_aggregate(s_pos, s_neg, self.tau_s, self.tau, self.released_logit)}
