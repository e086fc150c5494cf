"""CPRFL (Yan et al., ACM MM 2024; METHODS §5.4): category-prompt refined feature learning.

The paper:
- F = phi(f) (B, v, d): the backbone's token map f (B, v, d0) through one linear layer phi.
- Prompt initialisation (PI): P = GELU(W W1 + b1) W2 + b2 (C, d), W (C, D_text) the CLIP text embeddings of
  "a photo of a [CLASS]." from the frozen text encoder (computed once; ``encode_text`` as is, not L2-normalised
  **[our reading]**); hidden width d / 2.
- Visual-semantic interaction (VSI): one pre-norm Transformer-encoder layer over [F; P] (B, v + C, d); only the C
  prompt outputs P' (B, C, d) are kept.
- Classifier: logit_c = p'_c . p_c, each refined feature against its own prompt (the loss applies the sigmoid), so
  the gradient reaches P along two paths, through the VSI layer and through the dot product (dual-path).

The VSI layer's default layout is the released one: no residual connections, bias-free query/key/value
projections, dropout on the attention output and in the FFN but not on the attention weights; ``vsi_layout=standard``
gives the projections biases and drops attention weights too (nn.MultiheadAttention's layout, this project's layer
before it was checked against the released code). The shipped configs use the released sizes (``head_dim=512``,
8 heads x 512); ``model.preset: released`` adds ``train_text=True`` (the released code trains the text encoder),
the released ASL and the one-cycle schedule (see ``cimlic.presets``).

**[our design]**: the pluggable backbone (``cimlic.models.backbones``); ``vsi_path`` / ``dot_path`` detach P where
it enters the VSI layer / the dot product (the dual-path ablation); the GE/FD diversity module (METHODS §5.6) on P'
before the classifier; with ``train_text`` the trainable text tower is a copy held outside ``clip`` (the run's CLIP
stays frozen, so its identity check and the checkpoint rule hold); ``freeze_backbone`` makes the backbone a frozen
part (eval mode, not checkpointed, part of the run's identity) and lets the runner cache its tokens; the VSI layer
computes the queries of the C prompt tokens only (the visual-token outputs are discarded, so this changes nothing).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cimlic.errors import ConfigError
from cimlic.models.backbones import build_backbone
from cimlic.models.base import Method, MethodSpec
from cimlic.models.clip import ClipModel
from cimlic.models.diversity import DiversityConfig, build_diversity
from cimlic.models.text import prompt_classname

if TYPE_CHECKING:
    from cimlic.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class CPRFLConfig:
    backbone: str = "clip"  # "clip" (trainable copy of CLIP's image trunk) or a torchvision/timm name (resnet101, ...)
    backbone_weights: str = ""  # torchvision/timm: local ImageNet weights file, "imagenet" (online only), "" = random
    image_size: int = 0  # square input size of the backbone; 0 = CLIP's for backbone=clip, else 448 (the paper)
    freeze_backbone: bool = False  # keep the visual backbone frozen (only phi, PI, VSI train)
    dim: int = 0  # width d of the visual tokens F and the prompts P (0 = the backbone's feature width)
    pi_hidden: int = 0  # hidden width of the PI MLP (0 = d / 2, the paper)
    heads: int = 8  # attention heads of the VSI layer (must divide d)
    head_dim: int = 0  # width of each VSI attention head (0 = d / heads, then heads must divide d; authors' code: 512)
    ffn: int = 2048  # feed-forward width of the VSI layer
    vsi_residual: bool = False  # residual connections in the VSI layer (the authors' code has none)
    vsi_layout: Literal["released", "standard"] = "released"  # released: bias-free q/k/v, dropout on the layer output;
    # standard: q/k/v with biases and dropout on the attention weights as well (nn.MultiheadAttention's layout)
    vsi_dropout: float = 0.1  # dropout inside the VSI layer
    prompt_template: str = "a photo of a {}."  # text of the PI input W (CLIP text embeddings, computed once)
    train_text: bool = False  # trainable CLIP text tower (released code) instead of frozen (paper)
    vsi_path: bool = True  # gradient reaches P through the VSI layer (False = P detached at the VSI input)
    dot_path: bool = True  # gradient reaches P through the final dot product (False = P detached there)

    RANGES = {"image_size": ">=0", "dim": ">=0", "pi_hidden": ">=0", "heads": ">=1", "head_dim": ">=0", "ffn": ">=1",
              "vsi_dropout": "[0, 1)"}  # fmt: skip


class VSILayer(nn.Module):
    """One pre-norm Transformer-encoder layer whose residual connections can be switched off.

    x1 = [x +] Dropout(Out(Attn(LN1(x)))); out = [x1 +] FFN(LN2(x1)), FFN = Linear-GELU-Dropout-Linear-Dropout.
    Only the last ``n_out`` tokens are returned, so only their queries (and FFN) are computed.

    Args:
        dim: token width d.
        heads: attention heads.
        head_dim: width of each head (0 = dim / heads); the attention's inner width is heads x head_dim.
        ffn: hidden width of the feed-forward block.
        dropout: dropout on the attention output and in the FFN (``standard``: on the attention weights too).
        residual: add the residual connections (the authors' code has none).
        layout: ``released`` (bias-free query/key/value projections) or ``standard`` (with biases).
    """

    def __init__(
        self,
        dim: int,
        heads: int = 8,
        head_dim: int = 0,
        ffn: int = 2048,
        dropout: float = 0.1,
        residual: bool = False,
        layout: str = "released",
    ) -> None:
        super().__init__()
        if heads < 1 or (not head_dim and dim % heads):
            raise ConfigError(
                f"VSI layer: heads ({heads}) must be >= 1 and divide the width d = {dim} (or set head_dim)"
            )
        if layout not in ("released", "standard"):
            raise ConfigError(f"cprfl.vsi_layout: {layout!r} is not one of ['released', 'standard']")
        self.heads, self.head_dim, self.residual = heads, head_dim or dim // heads, residual
        self.p_attn = dropout if layout == "standard" else 0.0  # dropout on the attention weights
        inner, bias = self.heads * self.head_dim, layout == "standard"
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.q, self.kv = nn.Linear(dim, inner, bias=bias), nn.Linear(dim, 2 * inner, bias=bias)
        self.out = nn.Linear(inner, dim)
        self.ffn = nn.Sequential(
            nn.Linear(dim, ffn), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn, dim), nn.Dropout(dropout)
        )
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor, n_out: int) -> Tensor:
        """(B, T, d) tokens -> (B, n_out, d), the outputs of the last ``n_out`` tokens."""
        B, T, _ = x.shape
        h = self.norm1(x)
        q = self.q(h[:, T - n_out :]).view(B, n_out, self.heads, self.head_dim).transpose(1, 2)  # (B, H, n, hd)
        k, v = self.kv(h).view(B, T, 2, self.heads, self.head_dim).permute(2, 0, 3, 1, 4)  # (B, H, T, hd) each
        a = F.scaled_dot_product_attention(q, k, v, dropout_p=self.p_attn if self.training else 0.0)
        a = self.drop(self.out(a.transpose(1, 2).reshape(B, n_out, -1)))  # (B, n, d)
        x = x[:, T - n_out :] + a if self.residual else a
        f = self.ffn(self.norm2(x))
        return x + f if self.residual else f


def trainable_text_copy(clip: ClipModel) -> ClipModel:
    """A trainable copy of CLIP's text tower (the image tower is not copied; ``logit_scale``/``logit_bias`` frozen)."""
    visual = clip.model.visual
    text = copy.deepcopy(clip, {id(visual): nn.Identity()})  # the copy's image tower is a stub
    text.requires_grad_(True)
    for name in ("logit_scale", "logit_bias"):
        p = getattr(text.model, name, None)
        if isinstance(p, nn.Parameter):
            p.requires_grad_(False)
    return text


class CPRFL(Method):
    """CPRFL: backbone -> phi, PI prompts, one VSI layer, (diversity), logit_c = p'_c . p_c.

    Attributes:
        clip: the frozen CLIP (text embeddings W; its image tower is only a source for ``backbone=clip``).
        backbone: a :class:`cimlic.models.backbones.Backbone`; trainable, or a frozen part (``freeze_backbone``).
        text_encoder: trainable text-tower copy (``train_text``) or None (W is the buffer ``text_embeddings``).
        phi, pi, vsi, diversity: the trainable head.
    Forward: ``{"logits": (B, C)}`` from ``batch["image"]`` (B, 3, H, W), or cached ``"feat_local"`` (B, v, d0)
    when the backbone is frozen.
    """

    feature_keys = ("global", "local")
    identity_names = {"backbone": "cprfl_backbone"}  # the frozen backbone's name in runs from before 2026-12

    def __init__(
        self,
        clip: ClipModel,
        classnames: Sequence[str],
        cfg: CPRFLConfig | None = None,
        diversity: DiversityConfig | None = None,
    ) -> None:
        super().__init__(len(classnames))
        cfg = cfg or CPRFLConfig()
        if "{}" not in cfg.prompt_template:
            raise ConfigError(
                f"cprfl.prompt_template needs a '{{}}' slot for the class name (got {cfg.prompt_template!r})"
            )
        if min(cfg.dim, cfg.pi_hidden, cfg.head_dim, cfg.image_size) < 0 or cfg.ffn < 1:
            raise ConfigError("cprfl.dim, pi_hidden, head_dim and image_size must be >= 0, ffn >= 1")
        self.freeze("clip", clip, clip.source)
        self.frozen_backbone = cfg.freeze_backbone
        self.vsi_path, self.dot_path = cfg.vsi_path, cfg.dot_path
        backbone = build_backbone(cfg.backbone, cfg.backbone_weights, clip, cfg.image_size).to(clip.device)
        d0 = backbone.width
        d = cfg.dim or d0
        tokens = clip.tokenize([cfg.prompt_template.format(prompt_classname(c)) for c in classnames])  # (C, L)
        if cfg.train_text:
            self.text_encoder: ClipModel | None = trainable_text_copy(clip)
            self.register_buffer("text_tokens", tokens, persistent=False)
        else:
            self.text_encoder = None
            with torch.no_grad():
                self.register_buffer("text_embeddings", clip.encode_text(tokens).float(), persistent=False)  # (C, D)
        self.phi = nn.Linear(d0, d)
        hidden = cfg.pi_hidden or max(d // 2, 1)
        self.pi = nn.Sequential(nn.Linear(clip.embed_dim, hidden), nn.GELU(), nn.Linear(hidden, d))
        self.vsi = VSILayer(d, cfg.heads, cfg.head_dim, cfg.ffn, cfg.vsi_dropout, cfg.vsi_residual, cfg.vsi_layout)
        self.diversity = build_diversity(diversity or DiversityConfig(), d)
        if cfg.freeze_backbone:  # a frozen part: eval mode, never checkpointed, its tokens may be cached
            self.freeze("backbone", backbone, f"{cfg.backbone} ({cfg.backbone_weights or 'random'})")
        else:
            self.backbone = backbone
        logger.info("CPRFL: backbone %s (%d-d tokens) -> d = %d, PI %d -> %d -> %d, VSI %d x %d heads, %s text",
                    cfg.backbone, d0, d, clip.embed_dim, hidden, d, self.vsi.heads, self.vsi.head_dim,
                    "trainable" if cfg.train_text else "frozen")  # fmt: skip

    # ------------------------------------------------------------------------------------ hooks
    def input_spec(self) -> tuple[int, tuple[float, ...], tuple[float, ...]]:
        """(size, mean, std) of the images the backbone expects (the runner's transform)."""
        return self.backbone.input_spec

    @property
    def feature_tower(self) -> nn.Module | None:
        """The frozen backbone (its tokens are cached); None when the backbone trains."""
        return self.backbone if self.frozen_backbone else None

    @torch.no_grad()
    def image_features(self, images: Tensor) -> dict[str, Tensor]:
        """What the feature cache stores: the backbone's tokens ``"local"`` (B, v, d0) and their mean ``"global"``."""
        tokens = self.backbone(images.to(self.phi.weight.device))  # (B, v, d0)
        return {"global": tokens.mean(dim=1), "local": tokens}

    # ---------------------------------------------------------------------------------- pieces
    def text_features(self) -> Tensor:
        """W (C, D_text): CLIP text embeddings of the class prompts (recomputed when the text tower trains)."""
        if self.text_encoder is not None:
            return self.text_encoder.encode_text(self.text_tokens).float()
        return self.text_embeddings

    def prompts(self) -> Tensor:
        """P (C, d) = PI(W)."""
        return self.pi(self.text_features())

    def visual_tokens(self, batch: Mapping[str, Tensor]) -> Tensor:
        """F (B, v, d) = phi(backbone tokens), from the images or from cached ``feat_local`` (frozen backbone)."""
        frozen = self.frozen_backbone
        device = self.phi.weight.device
        if "feat_local" in batch and (frozen or not self.training):
            tokens = batch["feat_local"].to(device, self.phi.weight.dtype)  # (B, v, d0)
        elif "image" in batch:
            with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):
                tokens = self.backbone(batch["image"].to(device))  # (B, v, d0)
        else:
            raise KeyError(
                f"CPRFL: the batch needs 'image' (or 'feat_local' with a frozen backbone); got {sorted(batch)}"
            )
        return self.phi(tokens)

    def parts(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Intermediate tensors: ``visual`` F (B, v, d), ``prompts`` P (C, d), ``refined`` P' (B, C, d), ``logits``."""
        visual = self.visual_tokens(batch)
        prompts = self.prompts()
        B, C = visual.shape[0], prompts.shape[0]
        p_vsi = prompts if self.vsi_path else prompts.detach()  # path 1: P through the VSI layer
        x = torch.cat([visual, p_vsi.to(visual.dtype).unsqueeze(0).expand(B, -1, -1)], dim=1)  # (B, v + C, d)
        refined = self.diversity(self.vsi(x, n_out=C))  # (B, C, d)
        p_dot = prompts if self.dot_path else prompts.detach()  # path 2: P in the dot product
        logits = (refined * p_dot.to(refined.dtype).unsqueeze(0)).sum(dim=-1)  # (B, C): p'_c . p_c
        return {"visual": visual, "prompts": prompts, "refined": refined, "logits": logits}

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {"logits": self.parts(batch)["logits"]}


def build(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> CPRFL:
    """CPRFL from ``cfg.cprfl`` (and ``cfg.diversity``) for these classes on ``clip``."""
    return CPRFL(clip, classnames, cfg.cprfl, cfg.diversity)


SPEC = MethodSpec(build, {"cprfl": CPRFLConfig, "diversity": DiversityConfig},
                  summary="CPRFL: category prompts refined against a pluggable visual backbone")  # fmt: skip
