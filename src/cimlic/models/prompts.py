"""The prompt learner shared by the CoOp family, DualCoOp, LMPT and HP-DVAL (METHODS §5.1).

A prompt is ``[SOS] ctx_1 .. ctx_M <class-name tokens> . [EOS]``: the M context vectors are learned, everything
else is CLIP's own token embeddings, computed once from the class names (buffers, ``persistent=False``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from cimlic.errors import ConfigError
from cimlic.models.clip import ClipModel
from cimlic.models.text import prompt_classname

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

    def shared_prefix(self) -> Tensor:
        """(1 + M, W): [SOS] and the class-shared context, the start of every class's prompt (not with ``csc``)."""
        if self.csc:
            raise ValueError("class-specific contexts have no shared prefix")
        return torch.cat([self.prefix[0], self.ctx.to(self.prefix.dtype)])

    def forward(self) -> Tensor:
        """Prompt embeddings (C, L', W)."""
        ctx = self.ctx if self.csc else self.ctx.unsqueeze(0).expand(self.prefix.shape[0], -1, -1)  # (C, M, W)
        return torch.cat([self.prefix, ctx.to(self.prefix.dtype), self.suffix], dim=1)


def encode_prompts(clip: ClipModel, *learners: PromptLearner) -> list[Tensor]:
    """Text features (C_i, D) of each learner's prompts, in one pass through the text tower when shapes allow.

    With ``clip.text_pass == "shared_prefix"`` (``model.text_pass``, the default) and class-shared contexts on a
    tower that fits, the [SOS] + context positions, the same in every class's prompt, go through the tower once
    per learner and only each class's tail once per class (:meth:`ClipModel.encode_text_shared_prefix`);
    otherwise (class-specific contexts, ``plain``, another tower) every prompt runs whole.
    """
    if clip.text_pass == "shared_prefix" and not any(lr.csc for lr in learners) and clip.shared_prefix_fits:
        return _encode_shared_prefix(clip, learners)
    embs = [learner() for learner in learners]
    if len({e.shape[1:] for e in embs}) == 1:
        feats = clip.encode_text_from_embeddings(torch.cat(embs), torch.cat([lr.eot_index for lr in learners]))
        return list(feats.split([e.shape[0] for e in embs]))
    return [clip.encode_text_from_embeddings(e, lr.eot_index) for e, lr in zip(embs, learners, strict=True)]


def _encode_shared_prefix(clip: ClipModel, learners: Sequence[PromptLearner]) -> list[Tensor]:
    """encode_prompts for class-shared contexts: one shared-prefix pass per (prefix, tail) length."""
    out: list[Tensor | None] = [None] * len(learners)
    groups: dict[tuple[int, int], list[int]] = {}
    for i, lr in enumerate(learners):
        groups.setdefault((lr.n_ctx, lr.suffix.shape[1]), []).append(i)
    for members in groups.values():
        sizes = [learners[i].suffix.shape[0] for i in members]
        prefix = torch.stack([learners[i].shared_prefix() for i in members])  # (m, 1 + M, W)
        tails = torch.cat([learners[i].suffix for i in members])  # (sum C_i, T, W)
        owner = torch.repeat_interleave(torch.arange(len(members)), torch.tensor(sizes))  # (sum C_i,)
        eot = torch.cat([learners[i].eot_index for i in members])
        feats = clip.encode_text_shared_prefix(prefix, tails, owner, eot).split(sizes)
        for i, f in zip(members, feats, strict=True):
            out[i] = f
    return out  # type: ignore[return-value]
