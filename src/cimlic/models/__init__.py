"""Methods: the method table ``METHODS``, ``build_model(cfg, classnames)`` and ``list_models()``.

A method is one file in this package (its config section, its model, its builder) and one line below; its model
follows the contract of :mod:`cimlic.models.base`. Adding one is described in docs/adding-a-method.md.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING

from cimlic.errors import ConfigError
from cimlic.models import coop, cprfl, dualcoop, hpdval, linear_probe, lmpt, trmml, zeroshot
from cimlic.models.base import FrozenClipMethod, Method, MethodSpec
from cimlic.models.clip import ClipError, ClipModel, load_clip

if TYPE_CHECKING:
    from cimlic.config import ModelConfig

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "ClipError", "ClipModel", "FrozenClipMethod", "Method", "MethodSpec", "build_model",
           "config_sections", "list_models", "load_clip"]  # fmt: skip

# model.name -> its MethodSpec (one line per method)
METHODS: dict[str, MethodSpec] = {
    "zeroshot": zeroshot.SPEC,
    "linear_probe": linear_probe.SPEC,
    "coop": coop.SPEC,
    "dualcoop": dualcoop.SPEC,
    "lmpt": lmpt.SPEC,
    **hpdval.SPECS,  # hpdval_stage1, hpdval_stage2, hpdval_joint, and hpdval (both stages in one run)
    "cprfl": cprfl.SPEC,
    "trmml": trmml.SPEC,
}


def list_models() -> list[str]:
    """Names ``model.name`` accepts."""
    return list(METHODS)


def config_sections() -> dict[str, type]:
    """The ``model.<key>`` sections the methods declare (a section shared by several methods appears once)."""
    sections: dict[str, type] = {}
    for name, spec in METHODS.items():
        for key, section in spec.sections.items():
            if sections.setdefault(key, section) is not section:
                raise TypeError(f"model.{key}: method {name!r} declares another section type than an earlier method")
    return sections


def build_model(cfg: ModelConfig, classnames: Sequence[str]) -> Method:
    """Build the model ``cfg.name`` for these classes on the CLIP that ``cfg`` names.

    Raises:
        ConfigError: unknown model name (with the valid list), a method trained in stages, no class names.
        ClipError: the CLIP weights cannot be loaded.
    """
    spec = METHODS.get(cfg.name)
    if spec is None:
        raise ConfigError(f"unknown model {cfg.name!r}; valid: {list_models()}")
    if spec.build is None:
        raise ConfigError(f"model {cfg.name!r} is trained in stages ({spec.summary}): use `cimlic train` "
                          "(runner.train_run), or build one of its stages")  # fmt: skip
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
    clip.text_pass = cfg.text_pass
    model = spec.build(cfg, classnames, clip)
    n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    logger.info(
        "model %s on CLIP %s: %d classes, %d trainable parameters", cfg.name, clip.arch, len(classnames), n_train
    )
    return model
