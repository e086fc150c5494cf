"""Models: ``build_model(cfg, classnames)`` and ``list_models()``, backed by the plain dict ``_BUILDERS``.

Every model takes its frozen CLIP (attribute ``clip``) from ``cimlic.models.clip.load_clip`` and follows the model
contract of ``cimlic.models.heads`` (``forward(batch) -> {"logits": (B, C), ...}``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from torch import nn

from cimlic.config import ModelConfig
from cimlic.errors import ConfigError
from cimlic.models.clip import ClipError, ClipModel, load_clip
from cimlic.models.cprfl import build_cprfl
from cimlic.models.heads import FrozenClipModel, LinearProbe, ZeroShotCLIP, class_text_features
from cimlic.models.hpdval import HPDVAL
from cimlic.models.prompts import LMPT, CoOp, DualCoOp, PromptLearner
from cimlic.models.trmml import build_trmml

logger = logging.getLogger(__name__)

__all__ = [
    "ClipError",
    "ClipModel",
    "CoOp",
    "DualCoOp",
    "FrozenClipModel",
    "HPDVAL",
    "LMPT",
    "LinearProbe",
    "PromptLearner",
    "ZeroShotCLIP",
    "build_model",
    "list_models",
    "load_clip",
]


def _zeroshot(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> nn.Module:
    return ZeroShotCLIP(clip, classnames, cfg.templates)


def _linear_probe(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> nn.Module:
    probe = LinearProbe(clip, len(classnames), normalize=cfg.probe_normalize, dropout=cfg.dropout)
    if cfg.probe_init == "zeroshot":
        probe.init_from_text(class_text_features(clip, classnames, cfg.templates))
    return probe


def _coop(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> nn.Module:
    return CoOp(clip, classnames, cfg.n_ctx, cfg.ctx_init, cfg.csc)


def _dualcoop(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> nn.Module:
    return DualCoOp(
        clip, classnames, cfg.n_ctx, cfg.n_ctx_neg, cfg.ctx_init, cfg.csc, cfg.tau_s, cfg.tau, cfg.learn_temps,
        released_logit=cfg.dualcoop_logit == "released", mean_token=cfg.dense_mean_token,
    )  # fmt: skip


def _lmpt(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> nn.Module:
    if not cfg.csc:
        logger.info("LMPT uses class-specific prompts (model.csc=false is ignored)")
    return LMPT(clip, classnames, cfg.n_ctx, cfg.ctx_init)


def _hpdval_stage1(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> nn.Module:
    return HPDVAL(clip, classnames, "stage1", cfg.hpdval, cfg.templates)


def _hpdval_stage2(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> nn.Module:
    return HPDVAL(clip, classnames, "stage2", cfg.hpdval, cfg.templates)


def _hpdval_joint(cfg: ModelConfig, classnames: list[str], clip: ClipModel) -> nn.Module:
    return HPDVAL(clip, classnames, "joint", cfg.hpdval, cfg.templates)


_BUILDERS: dict[str, Callable[[ModelConfig, list[str], ClipModel], nn.Module]] = {
    "zeroshot": _zeroshot,
    "linear_probe": _linear_probe,
    "coop": _coop,
    "dualcoop": _dualcoop,
    "lmpt": _lmpt,
    "hpdval_stage1": _hpdval_stage1,
    "hpdval_stage2": _hpdval_stage2,
    "hpdval_joint": _hpdval_joint,
    "cprfl": build_cprfl,
    "trmml": build_trmml,
}


def list_models() -> list[str]:
    """Names ``build_model`` accepts (``model.name``)."""
    return list(_BUILDERS)


def build_model(cfg: ModelConfig, classnames: Sequence[str]) -> nn.Module:
    """Build the model ``cfg.name`` for these classes on the CLIP that ``cfg`` names.

    Raises:
        ValueError: unknown model name (with the valid list), no class names, or a CLIP problem (ClipError).
    """
    if cfg.name == "hpdval":
        raise ConfigError("model 'hpdval' is both HP-DVAL stages in one run: use `cimlic train` (runner.train_run), "
                         "or build 'hpdval_stage1' / 'hpdval_stage2' directly")  # fmt: skip
    if cfg.name not in _BUILDERS:
        raise ConfigError(f"unknown model {cfg.name!r}; valid: {list_models()} (and 'hpdval' for both stages)")
    classnames = [str(c) for c in classnames]
    if not classnames:
        raise ConfigError(f"model {cfg.name!r}: no class names given")
    clip = load_clip(
        cfg.clip_arch,
        cfg.clip_checkpoint,
        cfg.clip_pretrained,
        cfg.random_init,
        allow_torchscript=cfg.clip_allow_torchscript,
    )
    model = _BUILDERS[cfg.name](cfg, classnames, clip)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "model %s on CLIP %s: %d classes, %d trainable parameters", cfg.name, clip.arch, len(classnames), n_train
    )
    return model
