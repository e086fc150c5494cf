"""Experiment configuration: typed nested dataclasses, YAML files and ``--set a.b=v`` overrides.

Layers: the dataclass defaults, then the experiment's YAML file(s) (merged in order), then ``model.preset``, then
command-line overrides.
Unknown keys are errors that list the valid keys; values are checked against the field types, and against the
allowed ranges a section declares in ``RANGES`` (``">=0"``, ``">0"``, ``"[0, 1)"``, ...) by :func:`validate`, once,
with the key named: every float must be finite.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import re
import types
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from cimlic.errors import ConfigError
from cimlic.io import read_yaml
from cimlic.ranges import check_range, one_slot

logger = logging.getLogger(__name__)


LOG_SINKS = ("jsonl", "tensorboard")  # train.log: where the training scalars are written


# ------------------------------------------------------------------------------------------- schema
@dataclass
class DataConfig:
    name: str = "custom"  # dataset name used in reports (voc_lt, coco_lt, digits, custom)
    classes: str = ""  # class-name file, one per line
    train_labels: str = ""  # training label list (plain format)
    test_labels: str = ""  # test label list
    val_labels: str = ""  # optional validation list; empty = carve val_fraction from training
    val_fraction: float = 0.1  # share of training images held out for model selection when val_labels is empty
    image_root: str = ""  # folder the image paths are relative to
    train_image_root: str = ""  # image folder of the training (and val) list; empty = image_root
    test_image_root: str = ""  # image folder of the test list; empty = image_root
    image_pattern: str = "{id}"  # image path under image_root from the id, e.g. "JPEGImages/{id}.jpg"
    partial_mask: str = ""  # optional unknown-entry list (cimlic split partial output) applied to training
    captions: str = ""  # optional captions file (id<TAB>caption), used by LMPT
    image_size: int = 224  # square input size after transforms
    head_threshold: int = 100  # classes with n_c >= this are head
    tail_threshold: int = 20  # classes with n_c < this are tail

    RANGES = {"val_fraction": "[0, 1)", "image_size": ">=1", "head_threshold": ">=1", "tail_threshold": ">=1"}


@dataclass
class FocalConfig:
    gamma: float = 2.0  # focusing parameter
    alpha: float = -1.0  # positive-class weight alpha_t; < 0 disables it

    RANGES = {"gamma": ">=0", "alpha": "<=1"}


@dataclass
class ASLConfig:
    gamma_neg: float = 4.0  # focusing of negatives
    gamma_pos: float = 0.0  # focusing of positives
    margin: float = 0.05  # probability margin m (clip) of negatives
    eps: float = 1e-8  # log clamp
    detach_focusing: bool = False  # treat the focusing weight as a constant (no gradient through it)
    reduction: Literal["sum", "mean"] = "sum"  # sum as published

    RANGES = {"gamma_neg": ">=0", "gamma_pos": ">=0", "margin": "[0, 1)", "eps": ">0"}


@dataclass
class CBConfig:
    beta: float = 0.9  # class-balanced weight (1-beta)/(1-beta^n_c)
    base: Literal["bce", "focal"] = "bce"  # loss the weight multiplies
    gamma: float = 2.0  # focal gamma when base = focal

    RANGES = {"beta": "[0, 1)", "gamma": ">=0"}


@dataclass
class DBConfig:
    alpha: float = 0.1  # re-balanced weight floor
    beta: float = 10.0  # re-balanced weight slope
    mu: float = 0.3  # re-balanced weight centre (0.3 VOC, 0.2 COCO)
    kappa: float = 0.05  # negative-tolerant bias scale
    lam: float = 5.0  # negative-tolerant lambda (5 VOC, 2 COCO)
    bias_convention: Literal["paper", "released"] = "paper"  # z + kappa*b (paper) or z + kappa*b/lambda
    focal: bool = True  # multiply by 2(1-p_t)^2 computed per element
    reweight: bool = True  # use the re-balanced weight w (False: w = 1)
    neg_tolerant: bool = True  # use the class-specific bias and the lambda-scaled negative term
    pos_scale: float = 1.0  # constant multiplier of the positive logits z' (HP-DVAL's released DB: 10)
    focal_reduction: Literal["element", "batch"] = "element"  # batch: ONE focal factor per batch (a released bug)

    RANGES = {"alpha": ">=0", "beta": ">=0", "kappa": ">=0", "lam": ">0", "pos_scale": ">0"}


@dataclass
class GradBalanceConfig:
    base: Literal["bce", "focal"] = "bce"  # element-wise loss being re-weighted
    gamma: float = 12.0  # slope of the sigmoid mapping of g_c
    mu: float = 0.8  # centre of the sigmoid mapping
    alpha: float = 4.0  # positive up-weighting strength
    focal_gamma: float = 2.0  # focal gamma when base = focal

    RANGES = {"alpha": ">=0", "focal_gamma": ">=0"}


@dataclass
class CSEConfig:
    gamma: float = 2.0  # class re-weighting exponent n_c^-gamma
    margin_scale: float = 0.2  # class-aware margin m_c = margin_scale / n_c^(1/4)
    lam: float = 0.5  # total = lam * L_DB + (1 - lam) * L_CSE

    RANGES = {"gamma": ">=0", "margin_scale": ">=0", "lam": "[0, 1]"}


@dataclass
class LossConfig:
    name: str = "bce"  # one of cimlic.losses.list_losses()
    partial: bool = True  # ignore entries labelled -1 and normalise over known entries
    focal: FocalConfig = field(default_factory=FocalConfig)
    asl: ASLConfig = field(default_factory=ASLConfig)
    cb: CBConfig = field(default_factory=CBConfig)
    db: DBConfig = field(default_factory=DBConfig)
    grad_balance: GradBalanceConfig = field(default_factory=GradBalanceConfig)
    cse: CSEConfig = field(default_factory=CSEConfig)


@dataclass
class SamplerConfig:
    name: Literal["random", "class_aware", "group"] = "random"  # training sampler
    per_class: int = 3  # class-aware: images drawn per visited class
    num_groups: int = 0  # group sampler: 0 = head/medium/tail groups, G > 0 = G quantile groups
    num_samples: int = 0  # draws per epoch; 0 = the sampler's default length

    RANGES = {"per_class": ">=1", "num_groups": ">=0", "num_samples": ">=0"}


@dataclass
class EvalConfig:
    ap: Literal["sklearn", "voc_all_point", "voc07_11pt"] = "sklearn"  # AP variant (sklearn = non-interpolated)
    threshold: float = 0.5  # probability threshold for CP/CR/CF1/OP/OR/OF1
    cf1: Literal["harmonic", "mean"] = "harmonic"  # CF1 = 2 CP CR/(CP+CR), or mean of per-class F1
    top_k: int = 0  # also report top-k threshold metrics when > 0
    select_on: Literal["val", "test"] = "val"  # model selection split; "test" only as a labelled option
    ap_scores: Literal["logits", "class_softmax"] = "logits"  # AP ranking; class_softmax: the released LMPT eval
    calibrate: bool = True  # after training: calibrated probabilities and per-class thresholds chosen on val
    threshold_rule: Literal["f1", "precision"] = "f1"  # per-class thresholds: best F1, or best recall at a precision
    target_precision: float = 0.9  # the precision asked for with threshold_rule: precision

    RANGES = {"threshold": "[0, 1]", "top_k": ">=0", "target_precision": "(0, 1]"}


@dataclass
class ModelCommon:
    """The fields of ``model`` every method shares; ``ModelConfig`` adds one section per method that declares one."""

    name: str = "zeroshot"  # one of cimlic.models.list_models()
    preset: Literal["paper", "released", "released_exact"] = "paper"  # released: the authors' code (cimlic.presets)
    clip_arch: str = "RN50"  # open_clip architecture (OpenAI checkpoints load as "<arch>-quickgelu")
    clip_checkpoint: str = ""  # OpenAI .pt (TorchScript or state dict) or open_clip .bin/.safetensors file
    clip_pretrained: str = ""  # open_clip pretrained tag (needs the network; empty = none)
    clip_allow_torchscript: bool = False  # open TorchScript archives (OpenAI's .pt files run code: trusted files only)
    random_init: bool = False  # allow a randomly initialised CLIP when no checkpoint is given (tests, Digits)
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])  # hand-written prompt templates
    n_ctx: int = 16  # CoOp, DualCoOp (positive prompts), LMPT: number of learnable context vectors
    ctx_init: str = ""  # CoOp family: initialise the context from these words ("a photo of a"); empty = N(0, 0.02)
    csc: bool = False  # CoOp, DualCoOp: class-specific contexts (True) or one shared context (False)
    # prompts of a class-shared context: its positions through the text tower once, not once per class [our design]
    text_pass: Literal["shared_prefix", "plain"] = "shared_prefix"

    RANGES = {"n_ctx": ">=1"}


def _model_config() -> type:
    """``ModelConfig``: the common fields, then the ``model.<key>`` sections the methods declare (their own files)."""
    from cimlic.models import config_sections

    fields = [(key, section, field(default_factory=section)) for key, section in config_sections().items()]
    cls = dataclasses.make_dataclass("ModelConfig", fields, bases=(ModelCommon,))
    cls.__module__, cls.__doc__ = __name__, "The ``model`` section: the common fields plus one section per method."
    return cls


ModelConfig = _model_config()

# keys that moved into a method's own section: (old path, new path), read with a warning
MOVED_KEYS = {
    ("model", "n_ctx_neg"): ("model", "dualcoop", "n_ctx_neg"),
    ("model", "tau_s"): ("model", "dualcoop", "tau_s"),
    ("model", "tau"): ("model", "dualcoop", "tau"),
    ("model", "learn_temps"): ("model", "dualcoop", "learn_temps"),
    ("model", "dropout"): ("model", "linear_probe", "dropout"),
    ("model", "probe_normalize"): ("model", "linear_probe", "normalize"),
    ("model", "probe_init"): ("model", "linear_probe", "init"),
    ("model", "dualcoop_logit"): ("model", "dualcoop", "logit"),
    ("model", "dense_mean_token"): ("model", "dualcoop", "mean_token"),
}


@dataclass
class TrainConfig:
    epochs: int = 10  # training epochs
    max_steps: int = 0  # stop after this many optimiser steps in total (0 = run all epochs)
    batch_size: int = 32  # per process
    optimizer: Literal["adamw", "sgd"] = "adamw"  # optimiser
    lr: float = 2e-3  # peak learning rate
    weight_decay: float = 1e-4  # decoupled weight decay (AdamW) / L2 (SGD)
    momentum: float = 0.9  # SGD momentum
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"  # learning-rate shape over the steps
    warmup_steps: int = 0  # linear warm-up steps (cosine / constant)
    onecycle_pct: float = 0.2  # one-cycle: share of steps spent rising
    grad_clip: float = 0.0  # clip the gradient norm to this (0 = off)
    ema: float = 0.0  # EMA decay of the trainable weights (0 = off; 0.998 in HP-DVAL/CPRFL code)
    amp: bool = True  # bf16 autocast on GPU (ignored on CPU)
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    num_workers: int = 2  # DataLoader workers
    eval_every: int = 1  # evaluate on the validation split every N epochs
    log_every: int = 10  # write a metrics.jsonl line every N steps
    log: list[str] = field(default_factory=lambda: ["jsonl"])  # where scalars go: jsonl (always), tensorboard
    cache_features: bool = True  # frozen image towers: read image features from the on-disk cache
    cache_dir: str = ".cimlic_cache"  # where cached image features live (reused across runs)
    augment: bool = False  # random-resized-crop + flip on training images (disables the feature cache)

    RANGES = {"epochs": ">=0", "max_steps": ">=0", "batch_size": ">=1", "lr": ">0", "weight_decay": ">=0",
              "momentum": "[0, 1)", "warmup_steps": ">=0", "onecycle_pct": "(0, 1]", "grad_clip": ">=0",
              "ema": "[0, 1)", "num_workers": ">=0", "eval_every": ">=1", "log_every": ">=1"}  # fmt: skip


@dataclass
class FewShotConfig:
    base_labels: str = ""  # training images with base labels only (cimlic split fewshot: train_base.txt)
    support_dir: str = (
        ""  # folder with the episodes train_novel_{K}shot_{e}.txt (given or built by cimlic split fewshot)
    )
    test_labels: str = ""  # test images with novel labels only (test_novel.txt); mAP is over the novel classes
    shots: list[int] = field(default_factory=lambda: [1, 5])  # K values
    episodes: int = 10  # episodes per K (mean ± std reported)

    RANGES = {"shots": ">=1", "episodes": ">=1"}


@dataclass
class Config:
    name: str = "experiment"  # run name
    seed: int = 0  # global seed
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    fewshot: FewShotConfig = field(default_factory=FewShotConfig)


# ------------------------------------------------------------------------------------- machinery
def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _check_value(value: Any, tp: Any, where: str) -> Any:
    """Coerce/check ``value`` against the annotation ``tp``; raise ConfigError naming ``where``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _check_value(value, arg, where)
            except ConfigError as err:
                errors.append(str(err))
        raise ConfigError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} {value!r}")
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_check_value(v, item_tp, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            with contextlib.suppress(ValueError):
                value = float(value)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {tp}")


def from_dict(cls: type, data: dict, where: str = "") -> Any:
    """Build dataclass ``cls`` from a nested dict; unknown keys and wrong types raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping, got {type(data).__name__}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(f"{where or 'config'}: unknown key(s) {unknown}; valid keys: {sorted(types_)}")
    kwargs = {}
    for key, value in data.items():
        tp, path = types_[key], f"{where}.{key}" if where else key
        if dataclasses.is_dataclass(tp):
            kwargs[key] = from_dict(tp, value if value is not None else {}, path)
        else:
            kwargs[key] = _check_value(value, tp, path)
    return cls(**kwargs)


def to_dict(cfg: Any) -> dict:
    """Nested plain dict of a config dataclass."""
    return dataclasses.asdict(cfg)


def apply_override(cfg: Any, item: str) -> None:
    """Apply one ``a.b=value`` override in place; ``value`` is parsed as YAML and type-checked."""
    if "=" not in item:
        raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. loss.name=asl")
    key, raw = item.split("=", 1)
    parts = _moved(key.strip().split("."), f"override {key!r}")
    target, where = cfg, ""
    for i, part in enumerate(parts):
        types_ = _field_types(type(target))
        if part not in types_:
            raise ConfigError(
                f"override {key!r}: unknown key {part!r} in {where or 'config'}; valid keys: {sorted(types_)}"
            )
        where = f"{where}.{part}" if where else part
        if i == len(parts) - 1:
            if dataclasses.is_dataclass(types_[part]):
                raise ConfigError(f"override {key!r}: {where} is a section; set one of its keys")
            if types_[part] is str:  # text is taken as written ("name=123", "pattern={id}.png"); quotes optional
                value = raw[1:-1] if len(raw) > 1 and raw[0] == raw[-1] and raw[0] in "'\"" else raw
            else:
                try:
                    value = yaml.safe_load(raw) if raw.strip() else ""
                except yaml.YAMLError as err:
                    reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                    raise ConfigError(f"override {key!r}: cannot parse value {raw!r} ({reason})") from None
            setattr(target, part, _check_value(value, types_[part], where))
        else:
            target = getattr(target, part)
            if not dataclasses.is_dataclass(target):
                raise ConfigError(f"override {key!r}: {where} is not a section")


def validate(cfg: Any, where: str = "") -> None:
    """Check every section's ``RANGES``, that every float is finite, and the settings that need a look across fields.

    Raises:
        ConfigError: naming the first key whose value is not allowed.
    """
    ranges = getattr(type(cfg), "RANGES", {})
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), f"{where}.{f.name}" if where else f.name
        if dataclasses.is_dataclass(value):
            validate(value, key)
        elif isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        elif f.name in ranges:
            check_range(value, ranges[f.name], key)
    if isinstance(cfg, Config):
        _validate_across(cfg)


def _validate_across(cfg: Config) -> None:
    d = cfg.data
    try:
        d.image_pattern.format(id="x")
    except (KeyError, IndexError, ValueError, AttributeError):
        raise ConfigError(f"data.image_pattern: {d.image_pattern!r} may only use the placeholder {{id}}") from None
    bad = [t for t in cfg.model.templates if not one_slot(t)]
    if bad:
        raise ConfigError(f"model.templates: {bad} need exactly one '{{}}' slot for the class name")
    if d.tail_threshold > d.head_threshold:
        raise ConfigError(f"data.tail_threshold ({d.tail_threshold}) must not exceed data.head_threshold "
                          f"({d.head_threshold})")  # fmt: skip
    unknown_sinks = sorted(set(cfg.train.log) - set(LOG_SINKS))
    if unknown_sinks or "jsonl" not in cfg.train.log:
        raise ConfigError(f"train.log: {cfg.train.log} must list jsonl (resume and reports read metrics.jsonl) and "
                          f"may add {[s for s in LOG_SINKS if s != 'jsonl']}")  # fmt: skip
    if cfg.train.device not in ("auto", "cpu", "cuda", "mps") and not re.fullmatch(r"cuda:\d+", cfg.train.device):
        raise ConfigError(f"train.device: {cfg.train.device!r} is not a device (auto, cpu, cuda, cuda:N, mps)")


def _moved(parts: list[str], where: str) -> list[str]:
    """The current path of a key that moved into a method section (with a warning), else ``parts``."""
    for old, new in MOVED_KEYS.items():
        if tuple(parts) == old:
            logger.warning("%s: %s is now %s (read as such)", where, ".".join(old), ".".join(new))
            return list(new)
    return parts


def migrate_moved_keys(data: dict, where: str = "config") -> dict:
    """``data`` (a config as nested dicts) with the keys of ``MOVED_KEYS`` moved to their new place."""
    for old, new in MOVED_KEYS.items():
        parent = data
        for part in old[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if not isinstance(parent, dict) or old[-1] not in parent:
            continue
        value = parent.pop(old[-1])
        target = data
        for part in new[:-1]:
            target = target.setdefault(part, {})
        if new[-1] in target:
            raise ConfigError(f"{where}: both {'.'.join(old)} and {'.'.join(new)} are set; keep {'.'.join(new)}")
        target[new[-1]] = value
        logger.warning("%s: %s is now %s (read as such)", where, ".".join(old), ".".join(new))
    return data


def load_config(
    path: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    overrides: list[str] | None = None,
    cls: type = None,
    apply_preset: bool = True,
) -> Any:
    """Defaults, then the YAML file(s) (if any), then ``model.preset``'s values, then ``a.b=v`` overrides.

    Several files are merged in order, key by key (a later file's value wins; sections merge), e.g. a method's
    config and the ``data.yaml`` that ``cimlic import`` wrote. The preset (``cimlic.presets``; ``paper`` sets
    nothing) is applied after the files and before the overrides, so ``--set`` wins over it. ``apply_preset=False``
    reads a resolved config (a run folder's ``config.yaml``) as is.
    """
    cls = cls or Config
    paths = [] if path is None else [path] if isinstance(path, str | os.PathLike) else list(path)
    merged: dict = {}
    for p in map(Path, paths):
        data = read_yaml(p, ConfigError, "config file") or {}
        try:
            from_dict(cls, migrate_moved_keys(data, str(p)) if isinstance(data, dict) else data)  # this file's keys
        except ConfigError as err:
            raise ConfigError(f"{p}: {err}") from None
        merged = _merge(merged, data)
    path = ", ".join(map(str, paths)) or None
    cfg = from_dict(cls, merged) if paths else cls()
    for item in overrides or []:
        apply_override(cfg, item)
    if apply_preset and isinstance(cfg, Config) and cfg.model.preset != "paper":
        from cimlic.presets import apply_preset as set_preset

        try:
            set_preset(cfg)
        except ValueError as err:
            raise ConfigError(f"{path or 'config'}: {err}") from None
        for item in overrides or []:  # --set wins over the preset
            apply_override(cfg, item)
    if isinstance(cfg, Config):
        validate(cfg)
    return cfg


def _merge(base: dict, update: dict) -> dict:
    """``base`` with ``update``'s keys: nested mappings merged key by key, anything else replaced."""
    out = dict(base)
    for key, value in update.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Write the resolved config as YAML (atomically: temp file + rename)."""
    from cimlic.io import atomic_write_text

    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))
