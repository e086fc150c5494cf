"""Pluggable visual backbones for CPRFL: an image batch (B, 3, H, W) -> a token map (B, N, d0).

``build_backbone(name, weights, clip, image_size)`` and ``list_backbones()``:

- ``clip``: a trainable deep copy of the image trunk of the run's CLIP (its weights come from
  ``model.clip_checkpoint``). ViT: the patch tokens after ``ln_post`` and *before* ``proj`` (d0 = the transformer
  width; the class token and CLIP's projection to the joint space are dropped, as the attention pool is for a
  ResNet). ModifiedResNet: the ``layer4`` map before the attention pool (d0 = 32 x width). CLIP's size, mean, std.
- a torchvision classification model (``resnet101``, ``convnext_tiny``, ...; see ``list_backbones()``): the last
  feature map before pooling (ResNet family: ``layer4``; RegNet: ``trunk_output``; ConvNeXt, EfficientNet,
  MobileNet, VGG, DenseNet: ``features``). ImageNet mean/std.
- ``timm:<name>`` (timm installed): ``timm.create_model(name, num_classes=0, global_pool="")``; 4-D maps are
  flattened, the prefix (class) tokens of token models are dropped. The model's own mean/std.

``weights``: "" = random init (``clip``: CLIP's own weights); a local file = a state dict (``torch.load`` with
``weights_only=True``, or ``.safetensors``) of the full torchvision/timm model (classifier keys may be absent or
are ignored); ``imagenet`` = the library's pretrained download (needs the network).
"""

from __future__ import annotations

import copy
import difflib
import logging
import os

import torch
from torch import Tensor, nn

from cimlic.errors import ConfigError
from cimlic.io import read_state_dict, state_dict_mismatch
from cimlic.models.clip import ClipError, ClipModel, make_trunk, trunk_tokens

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_SIZE = 448  # the paper's input size for ImageNet backbones
_TV_FAMILIES = (  # name prefixes of the torchvision families whose trunk we know how to cut (_torchvision_trunk)
    "resnet",
    "resnext",
    "wide_resnet",
    "regnet",
    "convnext",
    "efficientnet",
    "mobilenet",
    "vgg",
    "densenet",
)
_HEAD_KEYS = ("fc.", "classifier.")  # torchvision classifier keys a trunk-only weights file may lack


class Backbone(nn.Module):
    """A visual trunk producing tokens (B, N, width), with the input it expects (``input_spec``).

    Args:
        trunk: the module (a CLIP tower copy, a torchvision trunk or a timm model).
        kind: ``clip_vit``, ``clip_rn``, ``map`` (4-D feature map out) or ``timm``.
        width: token width d0.
        input_spec: (size, mean, std) of the images it was trained on.
        prefix_tokens: leading tokens to drop (timm token models).
    """

    def __init__(self, trunk: nn.Module, kind: str, width: int, input_spec: tuple, prefix_tokens: int = 0) -> None:
        super().__init__()
        self.trunk, self.kind, self.width, self.prefix_tokens = trunk, kind, int(width), int(prefix_tokens)
        self.input_spec: tuple[int, tuple[float, ...], tuple[float, ...]] = input_spec

    def forward(self, images: Tensor) -> Tensor:
        """(B, 3, H, W) -> (B, N, d0)."""
        if self.kind in ("clip_vit", "clip_rn"):
            return trunk_tokens(self.trunk, self.kind, images)  # (B, N, d0)
        x = self.trunk(images)
        if x.ndim == 4:
            return x.flatten(2).transpose(1, 2)  # (B, h*w, d0)
        return x[:, self.prefix_tokens :]  # (B, N, d0): token models


# ------------------------------------------------------------------------------------------ names
def list_backbones() -> list[str]:
    """Backbone names ``build_backbone`` accepts (plus ``timm:<name>`` for any timm model when timm is installed)."""
    import torchvision

    tv = torchvision.models.list_models(module=torchvision.models)
    return ["clip", *(n for n in tv if n.startswith(_TV_FAMILIES))]


# ---------------------------------------------------------------------------------------- weights
def load_weights(model: nn.Module, path: str | os.PathLike, ignore: tuple[str, ...] = ()) -> None:
    """Load a local weights file into ``model``; keys starting with ``ignore`` (the classifier) are left out.

    Raises:
        ConfigError: a missing or unreadable file, or missing, unexpected or mis-shaped keys (the message names the
            file and the first keys).
    """
    sd = read_state_dict(path, ConfigError, "backbone weights file")
    sd = {k: v for k, v in sd.items() if not k.startswith(ignore)}
    own = {k: v for k, v in model.state_dict().items() if not k.startswith(ignore)}
    problems = state_dict_mismatch(own, sd)
    if problems:
        raise ConfigError(f"{path}: weights do not fit backbone {type(model).__name__} ({'; '.join(problems)})")
    model.load_state_dict(sd, strict=False)
    logger.info("backbone weights loaded from %s", path)


def _offline_error(name: str, err: Exception) -> ConfigError:
    return ConfigError(
        f"backbone {name!r}: cannot download ImageNet weights ({type(err).__name__}: {err}); no network? "
        "Pass a local state-dict file as model.cprfl.backbone_weights instead"
    )


# --------------------------------------------------------------------------------------- builders
def _clip_backbone(clip: ClipModel, weights: str, image_size: int) -> Backbone:
    if weights:
        raise ConfigError(
            f"backbone 'clip' starts from the run's CLIP image tower (model.clip_checkpoint); backbone_weights must "
            f"be empty (got {weights!r})"
        )
    visual = copy.deepcopy(clip.model.visual).requires_grad_(True)  # own weights, never CLIP's
    size = image_size or clip.image_size
    spec = (size, tuple(clip.image_mean), tuple(clip.image_std))
    try:
        kind, width = make_trunk(visual)
    except ClipError as err:
        raise ConfigError(f"backbone 'clip': {err}") from None
    if kind == "clip_vit" and size != clip.image_size:
        raise ConfigError(f"backbone 'clip': this ViT takes {clip.image_size} px images (got image_size {size})")
    return Backbone(visual, kind, width, spec)


def _torchvision_trunk(name: str, model: nn.Module) -> nn.Module:
    if name.startswith(("resnet", "resnext", "wide_resnet")):
        keep = ["conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"]
        return nn.Sequential(*(getattr(model, k) for k in keep))
    if name.startswith("regnet"):
        return nn.Sequential(model.stem, model.trunk_output)
    if name.startswith("densenet"):
        return nn.Sequential(model.features, nn.ReLU())  # torchvision applies the ReLU after features
    return model.features  # convnext, efficientnet, mobilenet, vgg


def _torchvision_backbone(name: str, weights: str, image_size: int) -> Backbone:
    import torchvision

    valid = list_backbones()
    if name not in valid[1:]:
        raise ConfigError(f"unknown backbone {name!r}; valid: {valid} or 'timm:<name>' for a timm model")
    if weights == "imagenet":
        try:
            model = torchvision.models.get_model(name, weights="DEFAULT")
        except Exception as err:  # no network, blocked download, ...
            raise _offline_error(name, err) from None
    else:
        model = torchvision.models.get_model(name, weights=None)
        if weights:
            load_weights(model, weights, ignore=_HEAD_KEYS)
    trunk = _torchvision_trunk(name, model)
    width = _probe_width(trunk)
    return Backbone(trunk, "map", width, (image_size or DEFAULT_SIZE, IMAGENET_MEAN, IMAGENET_STD))


def _timm_backbone(name: str, weights: str, image_size: int) -> Backbone:
    try:
        import timm
    except ImportError:
        raise ConfigError(f"backbone 'timm:{name}' needs timm (pip install timm)") from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        raise ConfigError(f"unknown timm backbone {name!r} (close: {close}); valid: timm.list_models()")
    kw = dict(num_classes=0, global_pool="")
    if weights == "imagenet":
        try:
            model = timm.create_model(name, pretrained=True, **kw)
        except Exception as err:  # no network, blocked download, ...
            raise _offline_error(f"timm:{name}", err) from None
    else:
        model = timm.create_model(name, pretrained=False, **kw)
        if weights:
            head = model.pretrained_cfg.get("classifier") or "head"
            heads = (head,) if isinstance(head, str) else tuple(head)
            load_weights(model, weights, ignore=tuple(f"{h}." for h in heads))
    cfg = model.pretrained_cfg
    mean, std = tuple(cfg.get("mean") or IMAGENET_MEAN), tuple(cfg.get("std") or IMAGENET_STD)
    prefix = int(getattr(model, "num_prefix_tokens", 0) or 0)
    return Backbone(model, "timm", int(model.num_features), (image_size or DEFAULT_SIZE, mean, std), prefix)


@torch.no_grad()
def _probe_width(trunk: nn.Module) -> int:
    """Channels of the trunk's output map (one 64 px forward in eval mode)."""
    was = trunk.training
    out = trunk.eval()(torch.zeros(1, 3, 64, 64))
    trunk.train(was)
    return int(out.shape[1])


def build_backbone(name: str, weights: str = "", clip: ClipModel | None = None, image_size: int = 0) -> Backbone:
    """The backbone ``name`` (``clip``, a torchvision name, or ``timm:<name>``) with ``weights``.

    Args:
        name: backbone name; see :func:`list_backbones`.
        weights: "" (random, or CLIP's own for ``clip``), a local state-dict file, or ``imagenet`` (online).
        clip: the run's CLIP (needed for ``clip``).
        image_size: square input size; 0 = CLIP's for ``clip``, 448 (the paper) otherwise.

    Raises:
        ConfigError: unknown name (with the valid list), a weights file that is missing, unreadable or does not fit
            (naming it), or ``imagenet`` weights that could not be downloaded (no network).
    """
    if name == "clip":
        if clip is None:
            raise ConfigError("backbone 'clip' needs the CLIP model")
        backbone = _clip_backbone(clip, weights, image_size)
    elif name.startswith("timm:"):
        backbone = _timm_backbone(name.removeprefix("timm:"), weights, image_size)
    else:
        backbone = _torchvision_backbone(name, weights, image_size)
    logger.info("backbone %s: %d-d tokens, input %s px, weights %s", name, backbone.width, backbone.input_spec[0],
                weights or ("CLIP's" if name == "clip" else "random"))  # fmt: skip
    return backbone
