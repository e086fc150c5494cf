"""Multi-label losses of METHODS §3, one ``nn.Module`` each, and ``build_loss`` / ``list_losses``.

Contract (DESIGN.md): ``forward(logits [B, C], targets [B, C], **extra) -> scalar``. Targets are in {1, 0, -1};
-1 = unknown. With ``partial=True`` unknown entries contribute nothing and mean-type losses are divided by the
number of known entries; with ``partial=False`` -1 entries are treated as negatives (the "assume negative"
baseline). Logits are computed in float32 whatever the autocast dtype. Statistics (class counts n_c, number of
training images N) arrive in ``__init__`` and live in buffers; counts below 1 are clamped to 1 with a warning.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cimlic.config import LossConfig
from cimlic.distributed import all_reduce_
from cimlic.errors import ConfigError

logger = logging.getLogger(__name__)

Counts = Tensor | Sequence[float]

DB_FOCAL_SCALE = 2.0  # DB's focal factor is 2·(1 − p_t)^2 (balance 2, gamma 2)
DB_FOCAL_GAMMA = 2.0


# ------------------------------------------------------------------------------------------- helpers
def _as_counts(class_counts: Counts | None) -> Tensor:
    """(C,) float32 copy of the class counts; counts below 1 are clamped to 1 (with a warning)."""
    if class_counts is None:
        raise ValueError("this loss needs class_counts (number of training images per class)")
    counts = torch.as_tensor(class_counts).detach().to(dtype=torch.float32).flatten().clone()
    if counts.numel() == 0:
        raise ValueError("class_counts is empty")
    if (counts < 1).any():
        bad = torch.nonzero(counts < 1).flatten().tolist()
        logger.warning("classes %s have no positive training image: their count is clamped to 1", bad)
        counts = counts.clamp(min=1.0)
    return counts


def _split_targets(targets: Tensor, partial: bool) -> tuple[Tensor, Tensor]:
    """(y, known), both float (B, C): y = 1 on positives; known = 1 where the entry counts in the loss."""
    y = (targets == 1).float()
    known = (targets >= 0).float() if partial else torch.ones_like(y)
    return y, known


def _masked_sum(elem: Tensor, known: Tensor) -> Tensor:
    """Sum of ``elem`` over known entries (``where``, so values at unknown entries never leak in)."""
    return torch.where(known > 0, elem, torch.zeros_like(elem)).sum()


def _masked_mean(elem: Tensor, known: Tensor) -> Tensor:
    """Sum over known entries / number of known entries (0 when nothing is known)."""
    return _masked_sum(elem, known) / known.sum().clamp(min=1.0)


def _log_pt(z: Tensor, y: Tensor) -> Tensor:
    """log p_t with p_t = σ(z) on positives and 1 − σ(z) on negatives (numerically stable)."""
    return torch.where(y > 0, F.logsigmoid(z), F.logsigmoid(-z))


def _focal_elem(z: Tensor, y: Tensor, gamma: float, alpha: float = -1.0) -> Tensor:
    """(B, C) focal loss −α_t (1 − p_t)^γ log p_t; ``alpha < 0`` disables α_t (γ = 0, no α: BCE)."""
    log_pt = _log_pt(z, y)
    loss = -(1.0 - log_pt.exp()).pow(gamma) * log_pt
    if alpha >= 0:
        loss = loss * torch.where(y > 0, alpha, 1.0 - alpha)
    return loss


def _check_choice(value: str, choices: tuple[str, ...], what: str) -> None:
    if value not in choices:
        raise ConfigError(f"{what}: {value!r} is not one of {list(choices)}")


class Loss(nn.Module):
    """Base of every loss: ``forward(logits, targets, **extra) -> scalar``; ``last_parts`` holds the named, detached
    parts of the latest call for logging (``{}`` for a loss of one part; LMPT's ``{"db", "cse"}``)."""

    def __init__(self) -> None:
        super().__init__()
        self.last_parts: dict[str, Tensor] = {}


# -------------------------------------------------------------------------------------- simple losses
class _MeanLoss(Loss):
    """Element-wise loss reduced as (sum over known entries) / (number of known entries)."""

    def __init__(self, partial: bool = True) -> None:
        super().__init__()
        self.partial = partial

    def elementwise(self, z: Tensor, y: Tensor) -> Tensor:  # (B, C) -> (B, C)
        raise NotImplementedError

    def forward(self, logits: Tensor, targets: Tensor, **extra: Tensor) -> Tensor:
        """Mean of the element-wise loss over known entries (a scalar)."""
        y, known = _split_targets(targets, self.partial)
        return _masked_mean(self.elementwise(logits.float(), y), known)


class BCELoss(_MeanLoss):
    """Binary cross-entropy on logits; mean over known entries (= torch's BCE-with-logits mean when all known)."""

    def elementwise(self, z: Tensor, y: Tensor) -> Tensor:
        return F.binary_cross_entropy_with_logits(z, y, reduction="none")


class FocalLoss(_MeanLoss):
    """Focal loss −α_t (1 − p_t)^γ log p_t (Lin et al.); mean over known entries.

    Args:
        gamma: focusing parameter γ.
        alpha: weight of positives (negatives get 1 − α); a negative value disables α_t.
        partial: ignore entries labelled -1.
    """

    def __init__(self, gamma: float = 2.0, alpha: float = -1.0, partial: bool = True) -> None:
        super().__init__(partial)
        self.gamma, self.alpha = gamma, alpha

    def elementwise(self, z: Tensor, y: Tensor) -> Tensor:
        return _focal_elem(z, y, self.gamma, self.alpha)


class AsymmetricLoss(Loss):
    """ASL (Ridnik et al.): −[y (1−p)^γ+ log p + (1−y) p_m^γ− log(1 − p_m)], p_m = max(p − m, 0).

    Logs are clamped at ``eps``. ``reduction="sum"`` (published) returns the sum over known entries,
    ``"mean"`` that sum divided by the number of known entries. With ``detach_focusing`` the focusing weight
    is a constant (``detach``): same value, no gradient through the weight.
    """

    def __init__(
        self,
        gamma_neg: float = 4.0,
        gamma_pos: float = 0.0,
        margin: float = 0.05,
        eps: float = 1e-8,
        detach_focusing: bool = False,
        reduction: str = "sum",
        partial: bool = True,
    ) -> None:
        super().__init__()
        _check_choice(reduction, ("sum", "mean"), "ASL reduction")
        self.gamma_neg, self.gamma_pos, self.margin, self.eps = gamma_neg, gamma_pos, margin, eps
        self.detach_focusing, self.reduction, self.partial = detach_focusing, reduction, partial

    def forward(self, logits: Tensor, targets: Tensor, **extra: Tensor) -> Tensor:
        """Scalar: sum (or mean) over known entries."""
        y, known = _split_targets(targets, self.partial)
        p = torch.sigmoid(logits.float())
        p_m = (p - self.margin).clamp(min=0.0) if self.margin > 0 else p
        log_pos = p.clamp(min=self.eps).log()
        log_neg = (1.0 - p_m).clamp(min=self.eps).log()
        weight = torch.where(y > 0, (1.0 - p).pow(self.gamma_pos), p_m.pow(self.gamma_neg))
        if self.detach_focusing:
            weight = weight.detach()
        elem = -weight * torch.where(y > 0, log_pos, log_neg)  # (B, C)
        return _masked_sum(elem, known) if self.reduction == "sum" else _masked_mean(elem, known)


class ClassBalancedLoss(_MeanLoss):
    """Class-balanced weighting (Cui et al.) w_c ∝ (1 − β)/(1 − β^n_c) over BCE or focal; mean over known entries.

    The weights are normalised to sum to C (so the loss scale matches the unweighted base loss).
    """

    def __init__(
        self, class_counts: Counts, beta: float = 0.9, base: str = "bce", gamma: float = 2.0, partial: bool = True
    ) -> None:
        super().__init__(partial)
        _check_choice(base, ("bce", "focal"), "CB base")
        if not 0.0 <= beta < 1.0:
            raise ConfigError(f"CB beta must be in [0, 1), got {beta}")
        counts = _as_counts(class_counts)
        weight = (1.0 - beta) / (1.0 - beta**counts)  # (C,)
        self.register_buffer("class_weight", weight * weight.numel() / weight.sum())
        self.base, self.gamma = base, gamma

    def elementwise(self, z: Tensor, y: Tensor) -> Tensor:
        loss = _focal_elem(z, y, self.gamma) if self.base == "focal" else _focal_elem(z, y, 0.0)
        return loss * self.class_weight


# ------------------------------------------------------------------------------ distribution-balanced
class DistributionBalancedLoss(Loss):
    """Distribution-Balanced loss (Wu et al., ECCV 2020); mean over known entries.

    Per element: y·w·[2(1−p_t)^2]·log(1+e^{−z'}) + (1−y)·(w/λ)·[2(1−p_t)^2]·log(1+e^{λz'}), with
    w = α + σ(β(r − μ)), r_ic = (1/n_c) / Σ_{k: y_ik=1} 1/n_k (known positives only; an image without a known
    positive takes the limit r → ∞, i.e. w = α + 1), z' = z + κ·b_c ('paper') or z + κ·b_c/λ ('released'),
    b_c = −log(N/n_c − 1) = log n_c − log(N − n_c), with N − n_c clamped at 1/2 so a class present in every
    image keeps a finite bias (b_c = log 2N there; n_c = N/2 gives b_c = 0). p_t = σ(z') on positives,
    σ(−λz') on negatives, per element. The shift is applied only in training mode (``self.training``).
    Switches: ``reweight=False`` → w = 1; ``neg_tolerant=False`` → no shift and λ = 1; ``focal=False`` → no
    focal factor; all three off gives BCE. ``pos_scale`` s multiplies the positive logit: the positive term becomes
    w·log(1+e^{−s·z'}) with p_t = σ(s·z') (HP-DVAL's released DB: s = 10). ``focal_reduction="batch"`` reproduces a
    bug of the released DB copies (LMPT, HP-DVAL): ONE focal factor per batch, 2·(1 − exp(−L̄))^2 with L̄ the
    unweighted BCE of the regularised logits averaged over the batch, times the mean of the weighted BCE terms.
    """

    def __init__(
        self,
        class_counts: Counts,
        num_images: int,
        alpha: float = 0.1,
        beta: float = 10.0,
        mu: float = 0.3,
        kappa: float = 0.05,
        lam: float = 5.0,
        bias_convention: str = "paper",
        focal: bool = True,
        reweight: bool = True,
        neg_tolerant: bool = True,
        partial: bool = True,
        pos_scale: float = 1.0,
        focal_reduction: str = "element",
    ) -> None:
        super().__init__()
        _check_choice(bias_convention, ("paper", "released"), "DB bias_convention")
        _check_choice(focal_reduction, ("element", "batch"), "DB focal_reduction")
        if not pos_scale > 0:
            raise ConfigError(f"DB pos_scale must be > 0, got {pos_scale}")
        if focal_reduction == "batch" and focal:
            logger.warning("DB focal_reduction=batch: one focal factor per batch, a bug of the released DB code "
                           "(reproduced on request; the per-element factor is the DB paper's)")  # fmt: skip
        if lam <= 0:
            raise ConfigError(f"DB lam must be > 0, got {lam}")
        if num_images is None or num_images <= 0:
            raise ValueError(f"DB needs the number of training images (num_images > 0), got {num_images}")
        counts = _as_counts(class_counts)
        if (counts > num_images).any():
            logger.warning("some class counts exceed num_images=%d; DB's bias is clamped", num_images)
        bias = counts.log() - (num_images - counts).clamp(min=0.5).log()  # (C,) b_c = −log(N/n_c − 1)
        if bias_convention == "released":
            bias = bias / lam
        self.register_buffer("class_counts", counts)
        self.register_buffer("logit_shift", kappa * bias)  # (C,) added to z in training
        self.register_buffer("pos_scale", torch.full_like(counts, pos_scale))  # (C,) s (DB*: s·n_c / max_k n_k)
        self.alpha, self.beta, self.mu, self.lam = alpha, beta, mu, lam
        self.focal_reduction = focal_reduction
        self.focal, self.reweight, self.neg_tolerant, self.partial = focal, reweight, neg_tolerant, partial

    def rebalance_weight(self, y: Tensor, known: Tensor) -> Tensor:
        """(B, C) smoothed re-balancing weight w = α + σ(β(r − μ))."""
        inv = 1.0 / self.class_counts  # (C,)
        denom = (y * known * inv).sum(dim=1, keepdim=True)  # (B, 1) Σ over known positives of 1/n_k
        r = inv / denom.clamp(min=1e-12)  # no known positive: r huge, so σ(·) = 1 (the r → ∞ limit)
        return self.alpha + torch.sigmoid(self.beta * (r - self.mu))

    def forward(self, logits: Tensor, targets: Tensor, **extra: Tensor) -> Tensor:
        """Scalar: mean of the element-wise loss over known entries."""
        y, known = _split_targets(targets, self.partial)
        z = logits.float()
        lam = self.lam if self.neg_tolerant else 1.0
        if self.neg_tolerant and self.training:
            z = z + self.logit_shift
        pos_arg, neg_arg = self.pos_scale * z, lam * z  # (B, C): −log p_t = softplus(−pos_arg) / softplus(neg_arg)
        pos, neg = F.softplus(-pos_arg), F.softplus(neg_arg) / lam
        batch_focal = self.focal and self.focal_reduction == "batch"
        if batch_focal:  # the released bug: p_t of the whole batch, exp(−mean unweighted BCE), one scalar
            pt = torch.exp(-_masked_mean(torch.where(y > 0, pos, F.softplus(neg_arg)), known))
            factor = DB_FOCAL_SCALE * (1.0 - pt).pow(DB_FOCAL_GAMMA)
        elif self.focal:  # 1 − p_t = σ(−pos_arg) on positives, σ(neg_arg) on negatives
            pos = pos * DB_FOCAL_SCALE * torch.sigmoid(-pos_arg).pow(DB_FOCAL_GAMMA)
            neg = neg * DB_FOCAL_SCALE * torch.sigmoid(neg_arg).pow(DB_FOCAL_GAMMA)
        elem = torch.where(y > 0, pos, neg)
        if self.reweight:
            elem = elem * self.rebalance_weight(y, known)
        loss = _masked_mean(elem, known)
        return factor * loss if batch_focal else loss


class DBStarLoss(DistributionBalancedLoss):
    """DB* (HP-DVAL Eqs. 11–15): DB whose positive term is w·log(1 + e^{−s_c·z'}), s_c = n_c / max_k n_k.

    Negatives are unchanged. The focal factor of a positive uses p_t = σ(s_c·z') (the probability whose
    −log is the term), so DB* equals DB when all n_c are equal.
    """

    def __init__(self, class_counts: Counts, num_images: int, **kwargs) -> None:
        super().__init__(class_counts, num_images, **kwargs)
        self.pos_scale = self.pos_scale * self.class_counts / self.class_counts.max()


# ---------------------------------------------------------------------------------- gradient balance
class GradBalanceLoss(_MeanLoss):
    """Dynamic gradient balancing (GE/FD, Chen et al. TMM 2025) **[our design]**; mean over known entries.

    Buffers G⁺_c, G⁻_c accumulate |∂(weighted loss)/∂z| of each class's positive and negative known entries
    (updated in training mode only; all-reduced across ranks when torch.distributed is initialised).
    g_c = G⁺_c / G⁻_c (1 before any negative gradient was seen), f(g) = σ(γ(g − μ)); negatives of class c are
    weighted by f(g_c), positives by 1 + α(1 − f(g_c)) (the reweighting of Equalization Loss v2). The weights
    used in a step come from the sums before that step. Base element loss: BCE or focal (γ = focal_gamma).
    """

    def __init__(
        self,
        num_classes: int,
        base: str = "bce",
        gamma: float = 12.0,
        mu: float = 0.8,
        alpha: float = 4.0,
        focal_gamma: float = 2.0,
        partial: bool = True,
    ) -> None:
        super().__init__(partial)
        _check_choice(base, ("bce", "focal"), "grad_balance base")
        self.base, self.gamma, self.mu, self.alpha = base, gamma, mu, alpha
        self.focal_gamma = focal_gamma if base == "focal" else 0.0
        self.register_buffer("pos_grad", torch.zeros(num_classes))  # (C,) G⁺
        self.register_buffer("neg_grad", torch.zeros(num_classes))  # (C,) G⁻

    def class_weights(self) -> tuple[Tensor, Tensor]:
        """(positive weights (C,), negative weights (C,)) from the current running sums."""
        seen = self.neg_grad > 0
        g = torch.where(seen, self.pos_grad / self.neg_grad.clamp(min=1e-12), torch.ones_like(self.pos_grad))
        f = torch.sigmoid(self.gamma * (g - self.mu))
        return 1.0 + self.alpha * (1.0 - f), f

    def _abs_grad(self, z: Tensor, y: Tensor) -> Tensor:
        """(B, C) |∂ℓ/∂z| of the focal/BCE element: (1 − p_t)^γ [(1 − p_t) − γ p_t log p_t]."""
        log_pt = _log_pt(z, y)
        pt = log_pt.exp()
        return (1.0 - pt).pow(self.focal_gamma) * ((1.0 - pt) - self.focal_gamma * pt * log_pt)

    def _accumulate(self, z: Tensor, y: Tensor, known: Tensor, weight: Tensor) -> None:
        grad = weight * self._abs_grad(z, y) * known  # (B, C); z is detached and the weights are buffers
        inc = torch.stack([(grad * y).sum(dim=0), (grad * (1.0 - y)).sum(dim=0)])  # (2, C)
        all_reduce_(inc)  # every rank adds the same global increment
        self.pos_grad += inc[0]
        self.neg_grad += inc[1]

    def forward(self, logits: Tensor, targets: Tensor, **extra: Tensor) -> Tensor:
        """Scalar: mean of the re-weighted element loss over known entries; updates the sums in training."""
        y, known = _split_targets(targets, self.partial)
        z = logits.float()
        pos_w, neg_w = self.class_weights()
        weight = torch.where(y > 0, pos_w, neg_w)  # (B, C)
        elem = weight * _focal_elem(z, y, self.focal_gamma)
        if self.training:
            self._accumulate(z.detach(), y, known, weight)
        return _masked_mean(elem, known)


# ------------------------------------------------------------------------------------------------- LMPT
class ClassSpecificEmbeddingLoss(Loss):
    """LMPT's class-specific embedding loss **[our design from the paper's intent]**.

    d_ic = 1 − cos(e_i, t_c); positives pay d_ic, negatives relu(m_c − d_ic) with m_c = margin_scale / n_c^{1/4};
    class weights ω_c = n_c^{−γ} / Σ_k n_k^{−γ}. Returns Σ_known C·ω_c·ℓ_ic / #known, which for complete labels is
    the mean over images of Σ_c ω_c ℓ_ic.
    """

    def __init__(
        self, class_counts: Counts, gamma: float = 2.0, margin_scale: float = 0.2, partial: bool = True
    ) -> None:
        super().__init__()
        counts = _as_counts(class_counts)
        weight = counts.pow(-gamma)
        self.register_buffer("class_weight", weight / weight.sum())  # (C,) ω_c
        self.register_buffer("margin", margin_scale * counts.pow(-0.25))  # (C,) m_c
        self.partial = partial

    def forward(self, logits: Tensor, targets: Tensor, caption_emb: Tensor, prompt_emb: Tensor, **extra) -> Tensor:
        """Scalar CSE loss; ``caption_emb`` (B, D), ``prompt_emb`` (C, D); ``logits`` is not used."""
        y, known = _split_targets(targets, self.partial)
        if caption_emb.shape[0] != y.shape[0] or prompt_emb.shape[0] != y.shape[1]:
            raise ValueError(
                f"caption_emb {tuple(caption_emb.shape)} / prompt_emb {tuple(prompt_emb.shape)} do not match "
                f"targets {tuple(y.shape)} (expected (B, D) and (C, D))"
            )
        cos = F.normalize(caption_emb.float(), dim=-1) @ F.normalize(prompt_emb.float(), dim=-1).T  # (B, C)
        dist_ = 1.0 - cos
        elem = torch.where(y > 0, dist_, F.relu(self.margin - dist_))
        return _masked_mean(elem * self.class_weight * self.class_weight.numel(), known)


class LMPTLoss(Loss):
    """LMPT objective λ·L_DB + (1 − λ)·L_CSE; extra inputs ``caption_emb`` (B, D) and ``prompt_emb`` (C, D).

    ``last_parts`` holds the detached parts {"db", "cse"} of the latest call, for logging.
    """

    def __init__(self, db: DistributionBalancedLoss, cse: ClassSpecificEmbeddingLoss, lam: float = 0.5) -> None:
        super().__init__()
        self.db, self.cse, self.lam = db, cse, lam

    def forward(
        self,
        logits: Tensor,
        targets: Tensor,
        caption_emb: Tensor | None = None,
        prompt_emb: Tensor | None = None,
        **extra: Tensor,
    ) -> Tensor:
        """Scalar λ·L_DB + (1 − λ)·L_CSE; raises ConfigError when the embeddings are missing."""
        if caption_emb is None or prompt_emb is None:
            raise ConfigError(
                "loss.name=lmpt needs caption_emb (B, D) and prompt_emb (C, D) as extra inputs: train model.name=lmpt "
                "with data.captions (an id<TAB>caption file)"
            )
        db = self.db(logits, targets)
        cse = self.cse(logits, targets, caption_emb=caption_emb, prompt_emb=prompt_emb)
        self.last_parts = {"db": db.detach(), "cse": cse.detach()}
        return self.lam * db + (1.0 - self.lam) * cse


# ------------------------------------------------------------------------------------------ building
def _db_kwargs(cfg: LossConfig) -> dict:
    d = cfg.db
    return dict(
        alpha=d.alpha, beta=d.beta, mu=d.mu, kappa=d.kappa, lam=d.lam, bias_convention=d.bias_convention,
        focal=d.focal, reweight=d.reweight, neg_tolerant=d.neg_tolerant, partial=cfg.partial,
        pos_scale=d.pos_scale, focal_reduction=d.focal_reduction,
    )  # fmt: skip


def _build_asl(cfg: LossConfig, counts: Counts | None, n: int | None) -> nn.Module:
    a = cfg.asl
    return AsymmetricLoss(
        gamma_neg=a.gamma_neg, gamma_pos=a.gamma_pos, margin=a.margin, eps=a.eps,
        detach_focusing=a.detach_focusing, reduction=a.reduction, partial=cfg.partial,
    )  # fmt: skip


def _build_grad_balance(cfg: LossConfig, counts: Counts | None, n: int | None) -> nn.Module:
    g = cfg.grad_balance
    num_classes = _as_counts(counts).numel()
    return GradBalanceLoss(num_classes, g.base, g.gamma, g.mu, g.alpha, g.focal_gamma, partial=cfg.partial)


def _build_lmpt(cfg: LossConfig, counts: Counts | None, n: int | None) -> nn.Module:
    cse = ClassSpecificEmbeddingLoss(counts, cfg.cse.gamma, cfg.cse.margin_scale, partial=cfg.partial)
    return LMPTLoss(DistributionBalancedLoss(counts, n, **_db_kwargs(cfg)), cse, lam=cfg.cse.lam)


_LOSSES: dict[str, Callable[[LossConfig, Counts | None, int | None], nn.Module]] = {
    "bce": lambda cfg, counts, n: BCELoss(partial=cfg.partial),
    "focal": lambda cfg, counts, n: FocalLoss(cfg.focal.gamma, cfg.focal.alpha, partial=cfg.partial),
    "asl": _build_asl,
    "cb": lambda cfg, counts, n: ClassBalancedLoss(counts, cfg.cb.beta, cfg.cb.base, cfg.cb.gamma, cfg.partial),
    "db": lambda cfg, counts, n: DistributionBalancedLoss(counts, n, **_db_kwargs(cfg)),
    "db_star": lambda cfg, counts, n: DBStarLoss(counts, n, **_db_kwargs(cfg)),
    "grad_balance": _build_grad_balance,
    "lmpt": _build_lmpt,
}


# loss name -> the extra inputs it needs from the model's forward (``out["loss_inputs"]``)
LOSS_INPUTS: dict[str, tuple[str, ...]] = {"lmpt": ("caption_emb", "prompt_emb")}


def list_losses() -> list[str]:
    """Names accepted by ``build_loss``."""
    return list(_LOSSES)


def build_loss(cfg: LossConfig, class_counts: Counts | None = None, num_images: int | None = None) -> nn.Module:
    """Build the loss ``cfg.name`` with training statistics.

    Args:
        cfg: the loss section of the experiment config.
        class_counts: (C,) training images per class (needed by cb, db, db_star, grad_balance, lmpt).
        num_images: number of training images N (needed by db, db_star, lmpt).

    Returns:
        An ``nn.Module`` with ``forward(logits [B, C], targets [B, C], **extra) -> scalar``.
    """
    if cfg.name not in _LOSSES:
        raise ConfigError(f"unknown loss {cfg.name!r}; valid names: {list_losses()}")
    return _LOSSES[cfg.name](cfg, class_counts, num_images)
