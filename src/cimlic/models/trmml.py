"""TRM-ML (Ma et al., ACM MM 2024): text-region matching for multi-label learning with missing labels (METHODS §5.5).

**[our design from the paper's description]** throughout; the choices the paper leaves open are marked [our design]:

- Frozen CLIP image and text towers. Trainable: C category queries (C, d), one pre-norm cross-attention block
  (queries attend over the dense local tokens; dropout) and a small residual MLP (hidden ``mlp_ratio * d``).
- Region features are visual [our design]: keys come from the layer-normalised tokens, values from the tokens as
  they are, and the residual connections run around the region feature, not around the query, so
  r_c = a + MLP(LN(a)) with a = the attention output. The value and output projections start at the identity and
  the MLP's last layer at zero, so at initialisation r_c is an attention-weighted average of CLIP's local tokens
  (a point of CLIP's joint space: with a mean-pooled tower and near-uniform attention, its global feature) and
  z_c starts close to a zero-shot score; training then learns where each category looks.
- Queries start at the class text features t_c. [our design] When ``dim`` d differs from CLIP's embedding width E, a
  linear map E -> d is applied to the local tokens, the queries start at that (freshly initialised) map applied to
  t_c, and a linear map d -> E brings the region features back to CLIP's space.
- Region features r (B, C, E) pass through the GE/FD diversity module (identity when disabled), then
  z_c = s * cos(r_c, t_c) (one-to-one text-region matching), s = ``logit_scale`` or CLIP's logit scale.
- Multimodal contrastive loss (:func:`multimodal_contrastive_loss`), computed per process on its own batch.
- Prototypes [our design]: v_c is an EMA (momentum m) of the batch mean of the L2-normalised region features of the
  known positives of class c; its first value is the first such batch mean. q_ic = (cos(r_ic, v_c) + cos(r_ic, t_c))/2
  uses the prototypes *before* the batch's update; the q of known positives are collected over the epoch and at its
  end (``epoch_stats``, or ``set_epoch`` when no stats were asked for) give per-class thresholds: the ``pos_quantile``
  and ``neg_quantile`` quantiles (torch.quantile, linear). A class without collected values keeps its thresholds.
- Pseudo-labels from epoch ``warmup_epochs`` on: an unknown entry (-1) with q >= pos threshold becomes 1, with
  q < neg threshold becomes 0, else stays -1; classes without thresholds make none; known labels never change.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cimlic.distributed import all_gather_cat, all_reduce_
from cimlic.errors import ConfigError
from cimlic.models.base import FrozenClipMethod, MethodSpec
from cimlic.models.clip import ClipModel
from cimlic.models.diversity import DiversityConfig, build_diversity
from cimlic.models.text import class_text_features

if TYPE_CHECKING:
    from cimlic.config import ModelConfig

logger = logging.getLogger(__name__)


@dataclass
class TRMMLConfig:
    dim: int = 0  # width of the category queries / attention (0 = CLIP's embedding width)
    heads: int = 4  # heads of the cross-attention block
    mlp_ratio: float = 2.0  # hidden width of the small MLP after the cross-attention, times dim
    dropout: float = 0.1  # dropout in the cross-attention block
    logit_scale: float = 0.0  # s in z_c = s cos(r_c, t_c); 0 = CLIP's logit scale
    contrastive_weight: float = 1.0  # weight of the multimodal contrastive loss
    contrastive_temp: float = 0.07  # InfoNCE temperature
    proto_momentum: float = 0.9  # EMA momentum of the visual prototypes
    pseudo_labels: bool = True  # fill unknown entries with prototype pseudo-labels after the warm-up
    warmup_epochs: int = 1  # epochs before pseudo-labelling starts
    pos_quantile: float = 0.9  # pseudo-positive: q >= this quantile of the class's known-positive q
    neg_quantile: float = 0.1  # pseudo-negative: q < this quantile of the class's known-positive q

    RANGES = {"dim": ">=0", "heads": ">=1", "mlp_ratio": ">0", "dropout": "[0, 1)", "logit_scale": ">=0",
              "contrastive_weight": ">=0", "contrastive_temp": ">0", "proto_momentum": "[0, 1)", "warmup_epochs": ">=0",
              "pos_quantile": "[0, 1]", "neg_quantile": "[0, 1]"}  # fmt: skip


def region_text_nce(regions: Tensor, text: Tensor, targets: Tensor, temp: float) -> Tensor:
    """Region-to-text InfoNCE: mean over known positives (i, c) of -log softmax_k(cos(r_ic, t_k) / temp)[c]."""
    pos = targets == 1  # (B, C)
    anchors = F.normalize(regions[pos].float(), dim=-1)  # (P, D)
    if anchors.shape[0] == 0:
        return regions.sum() * 0.0
    labels = pos.nonzero()[:, 1]  # (P,) class of each anchor
    return F.cross_entropy(anchors @ F.normalize(text.float(), dim=-1).T / temp, labels)


def region_supcon(regions: Tensor, targets: Tensor, temp: float) -> Tensor:
    """Region-to-region supervised contrastive term over the known-positive regions P of the batch.

    For anchor a = (i, c) in P, positives are the other (j, c) in P (j != i), the contrast set is P without a:
    L_a = -mean_{p in pos(a)} log(exp(s_ap / temp) / sum_{n in P, n != a} exp(s_an / temp)), s = cosine;
    the result is the mean of L_a over the anchors with at least one positive (0 when there is none).
    """
    pos = targets == 1  # (B, C)
    feats = F.normalize(regions[pos].float(), dim=-1)  # (P, D)
    labels = pos.nonzero()[:, 1]  # (P,)
    eye = torch.eye(len(labels), dtype=torch.bool, device=feats.device)
    same = (labels[:, None] == labels[None, :]) & ~eye  # (P, P): same class, other image
    valid = same.any(dim=1)  # (P,)
    if not valid.any():
        return regions.sum() * 0.0
    sim = (feats @ feats.T / temp).masked_fill(eye, float("-inf"))  # (P, P); self excluded from the denominator
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    per_anchor = -(log_prob.masked_fill(~same, 0.0)).sum(dim=1) / same.sum(dim=1).clamp(min=1)  # (P,)
    return per_anchor[valid].mean()


def multimodal_contrastive_loss(regions: Tensor, text: Tensor, targets: Tensor, temp: float = 0.07) -> Tensor:
    """[our design] ``region_text_nce + region_supcon`` (unweighted sum) on the known positives of ``targets``.

    Args:
        regions: (B, C, D) region features r. text: (C, D) class text features t. targets: (B, C) in {1, 0, -1}.
        temp: temperature of both terms.
    """
    return region_text_nce(regions, text, targets, temp) + region_supcon(regions, targets, temp)


class TRMML(FrozenClipMethod):
    """TRM-ML on a frozen CLIP (see the module docstring for the method and the [our design] choices).

    In training mode with ``batch["target"]`` the output also holds ``aux_losses["contrastive"]`` (weighted) and
    ``targets`` (the batch targets with pseudo-labels filled in); the prototypes and thresholds are updated.

    Args:
        clip: the frozen CLIP. classnames: C class names. cfg: ``model.trmml``. diversity: ``model.diversity``.
        templates: prompt templates of the class text features t_c.
    """

    feature_keys = ("global", "local")

    def __init__(
        self,
        clip: ClipModel,
        classnames: Sequence[str],
        cfg: TRMMLConfig,
        diversity: DiversityConfig,
        templates: Sequence[str] = ("a photo of a {}.",),
    ) -> None:
        super().__init__(clip, len(classnames))
        _check(cfg)
        embed, dim, n = clip.embed_dim, cfg.dim or clip.embed_dim, len(classnames)
        if dim % cfg.heads:
            raise ConfigError(f"TRM-ML: heads ({cfg.heads}) must divide the query width ({dim})")
        self.cfg = cfg
        self.logit_scale = float(cfg.logit_scale) if cfg.logit_scale > 0 else clip.logit_scale
        text = class_text_features(clip, classnames, templates)  # (C, E), normalised
        self.register_buffer("class_text", text, persistent=False)
        self.token_proj = nn.Linear(embed, dim) if dim != embed else nn.Identity()  # local tokens E -> d
        with torch.no_grad():
            self.queries = nn.Parameter(self.token_proj(text).detach().clone())  # (C, d), start at t_c
        self.q_norm, self.kv_norm, self.mlp_norm = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, cfg.heads, dropout=cfg.dropout, batch_first=True)
        hidden = max(1, round(cfg.mlp_ratio * dim))
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(cfg.dropout), nn.Linear(hidden, dim))
        with torch.no_grad():  # start as attention pooling of CLIP's own tokens (see the module docstring)
            self.attn.in_proj_weight[2 * dim :].copy_(torch.eye(dim))
            self.attn.in_proj_bias[2 * dim :].zero_()
            self.attn.out_proj.weight.copy_(torch.eye(dim))
            self.attn.out_proj.bias.zero_()
            self.mlp[-1].weight.zero_()
            self.mlp[-1].bias.zero_()
        self.drop = nn.Dropout(cfg.dropout)
        self.out_proj = nn.Linear(dim, embed) if dim != embed else nn.Identity()  # region features d -> E
        self.diversity = build_diversity(diversity, embed)
        device = clip.device
        self.register_buffer("visual_proto", torch.zeros(n, embed, device=device))  # (C, E) v_c
        self.register_buffer("proto_seen", torch.zeros(n, dtype=torch.bool, device=device))  # (C,)
        self.register_buffer("pos_threshold", torch.zeros(n, device=device))  # (C,)
        self.register_buffer("neg_threshold", torch.zeros(n, device=device))  # (C,)
        self.register_buffer("threshold_ready", torch.zeros(n, dtype=torch.bool, device=device))  # (C,)
        self.epoch = 0
        self._q: list[Tensor] = []  # known-positive q of this epoch (not saved: resume starts at an epoch boundary)
        self._q_class: list[Tensor] = []
        self._pending = False  # a training batch was seen since the thresholds were last computed
        self._counts: Tensor | None = None  # [pos, neg, pos_right, neg_right, batches with true_target]
        logger.info("TRM-ML: %d classes, query width %d (CLIP %d), scale %.2f", n, dim, embed, self.logit_scale)

    def text_features(self) -> Tensor:
        """The class text features t_c (C, E), normalised (fixed)."""
        return self.class_text

    # ------------------------------------------------------------------------------------ forward
    def regions(self, local: Tensor) -> Tensor:
        """Category-aware region features r (B, C, E) from local tokens (B, N, E)."""
        tokens = self.token_proj(local.to(self.queries.dtype))  # (B, N, d)
        q = self.queries.unsqueeze(0).expand(local.shape[0], -1, -1)  # (B, C, d)
        # keys from the normalised tokens, values from the tokens themselves: r_c stays a mix of visual tokens
        attended, _ = self.attn(self.q_norm(q), self.kv_norm(tokens), tokens, need_weights=False)  # (B, C, d)
        h = attended + self.drop(self.mlp(self.mlp_norm(attended)))  # (B, C, d): residual on the region, not q
        return self.diversity(self.out_proj(h))  # (B, C, E)

    def match(self, regions: Tensor) -> Tensor:
        """One-to-one text-region logits z_c = s * cos(r_c, t_c): (B, C, E) -> (B, C)."""
        text = self.class_text.to(regions.dtype)
        return self.logit_scale * (F.normalize(regions, dim=-1) * text).sum(dim=-1)

    @torch.no_grad()
    def similarity(self, regions: Tensor) -> Tensor:
        """Prototype score q (B, C) = (cos(r, v_c) + cos(r, t_c)) / 2 with the current visual prototypes."""
        r = F.normalize(regions.float(), dim=-1)  # (B, C, E)
        return 0.5 * ((r * F.normalize(self.visual_proto, dim=-1)).sum(-1) + (r * self.class_text).sum(-1))

    def forward(self, batch: Mapping[str, Tensor]) -> dict:
        regions = self.regions(self.batch_features(batch)["local"])  # (B, C, E)
        out: dict = {"logits": self.match(regions)}
        if self.training and "target" in batch:
            targets = batch["target"].to(regions.device, torch.float32)  # (B, C)
            if self.cfg.contrastive_weight > 0:
                loss = multimodal_contrastive_loss(regions, self.class_text, targets, self.cfg.contrastive_temp)
                out["aux_losses"] = {"contrastive": self.cfg.contrastive_weight * loss}
            out["targets"] = self._pseudo_label_step(regions.detach(), targets, batch.get("true_target"))
        return out

    # ------------------------------------------------------------------------ prototypes, labels
    @torch.no_grad()
    def _pseudo_label_step(self, regions: Tensor, targets: Tensor, truth: Tensor | None) -> Tensor:
        """Collect known-positive q, fill unknowns (after the warm-up), update the prototypes; return the targets."""
        q = self.similarity(regions)  # (B, C), prototypes before this batch's update
        known_pos = targets == 1
        collect = known_pos & self.proto_seen  # a class without a prototype has no meaningful q yet
        self._q.append(q[collect])
        self._q_class.append(collect.nonzero()[:, 1])
        self._pending = True
        active = self.cfg.pseudo_labels and self.epoch >= self.cfg.warmup_epochs
        unknown = (targets == -1) & self.threshold_ready & active  # (B, C)
        new_pos, new_neg = unknown & (q >= self.pos_threshold), unknown & (q < self.neg_threshold)
        out = targets.masked_fill(new_pos, 1.0).masked_fill(new_neg, 0.0)
        self._count(new_pos, new_neg, truth)
        self._update_prototypes(F.normalize(regions.float(), dim=-1), known_pos)
        return out

    def _count(self, new_pos: Tensor, new_neg: Tensor, truth: Tensor | None) -> None:
        counts = torch.zeros(5, dtype=torch.float64, device=new_pos.device)
        counts[0], counts[1] = new_pos.sum(), new_neg.sum()
        if truth is not None:
            truth = truth.to(new_pos.device)
            counts[2], counts[3], counts[4] = (new_pos & (truth == 1)).sum(), (new_neg & (truth == 0)).sum(), 1
        self._counts = counts if self._counts is None else self._counts + counts

    def _update_prototypes(self, r: Tensor, known_pos: Tensor) -> None:
        """v_c <- m v_c + (1 - m) mean(r_ic over known positives), summed over ranks; first value = the mean."""
        sums = all_reduce_(torch.einsum("bc,bce->ce", known_pos.float(), r))  # (C, E)
        counts = all_reduce_(known_pos.float().sum(dim=0))  # (C,)
        has = counts > 0
        mean = sums / counts.clamp(min=1.0)[:, None]
        m = self.cfg.proto_momentum
        ema = torch.where(self.proto_seen[:, None], m * self.visual_proto + (1.0 - m) * mean, mean)
        self.visual_proto.copy_(torch.where(has[:, None], ema, self.visual_proto))
        self.proto_seen.logical_or_(has)

    @torch.no_grad()
    def update_thresholds(self) -> None:
        """Per-class quantile thresholds from the q collected since the last call (all ranks); clears them.

        A collective under DDP: every rank must call it (the Trainer does, in ``epoch_stats``).
        """
        device = self.visual_proto.device
        q = torch.cat(self._q) if self._q else torch.zeros(0, device=device)
        cls = torch.cat(self._q_class) if self._q_class else torch.zeros(0, dtype=torch.long, device=device)
        q, cls = all_gather_cat(q), all_gather_cat(cls)  # (M,) each
        levels = torch.tensor([self.cfg.neg_quantile, self.cfg.pos_quantile], device=device)
        for c in cls.unique().tolist():
            neg, pos = torch.quantile(q[cls == c], levels).tolist()
            self.neg_threshold[c], self.pos_threshold[c] = neg, pos
            self.threshold_ready[c] = True
        self._q, self._q_class, self._pending = [], [], False
        logger.debug("TRM-ML thresholds from %d known-positive scores, %d classes ready", len(q),
                     int(self.threshold_ready.sum()))  # fmt: skip

    def set_epoch(self, epoch: int) -> None:
        """Store the epoch (pseudo-labels start at ``warmup_epochs``); turn pending q into thresholds first."""
        if self._pending:
            self.update_thresholds()
        self.epoch = int(epoch)

    def epoch_stats(self) -> dict[str, float]:
        """Pseudo-labels of the epoch (counts over all ranks; ``*_right``/``*_acc`` against true_target); resets.

        Also computes the thresholds for the next epoch (so that they are in the checkpoint saved after it).
        """
        self.update_thresholds()
        zero = torch.zeros(5, dtype=torch.float64, device=self.visual_proto.device)
        counts = all_reduce_(self._counts.clone() if self._counts is not None else zero)
        self._counts = None
        pos, neg, pos_right, neg_right, truth = counts.tolist()
        stats = {"pseudo_pos": pos, "pseudo_neg": neg, "pseudo_classes": float(self.threshold_ready.sum())}
        if truth > 0:
            stats.update(pseudo_pos_right=pos_right, pseudo_neg_right=neg_right)
            if pos > 0:
                stats["pseudo_pos_acc"] = pos_right / pos
            if neg > 0:
                stats["pseudo_neg_acc"] = neg_right / neg
        return stats


def _check(cfg: TRMMLConfig) -> None:
    """Raise ConfigError on settings that cannot work."""
    if not 0.0 <= cfg.neg_quantile <= cfg.pos_quantile <= 1.0:
        raise ConfigError(f"TRM-ML: need 0 <= neg_quantile <= pos_quantile <= 1 (got {cfg.neg_quantile}, "
                         f"{cfg.pos_quantile})")  # fmt: skip
    if not 0.0 <= cfg.proto_momentum < 1.0:
        raise ConfigError(f"TRM-ML: proto_momentum must be in [0, 1) (got {cfg.proto_momentum})")
    if cfg.contrastive_temp <= 0 or cfg.mlp_ratio <= 0 or cfg.dim < 0 or cfg.warmup_epochs < 0:
        raise ConfigError("TRM-ML: contrastive_temp and mlp_ratio must be > 0, dim and warmup_epochs >= 0")


def build(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> TRMML:
    """TRM-ML from ``model.trmml``, ``model.diversity`` and ``model.templates``."""
    return TRMML(clip, classnames, cfg.trmml, cfg.diversity, cfg.templates)


SPEC = MethodSpec(build, {"trmml": TRMMLConfig, "diversity": DiversityConfig},
                  summary="TRM-ML: text-region matching for missing labels")  # fmt: skip
