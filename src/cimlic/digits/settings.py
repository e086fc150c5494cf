"""The demo's settings: per method, the config overrides on top of the Digits world and the tiny CLIP.

The runs themselves are made by ``cimlic.apps.demo`` (``cimlic demo``).
"""

from __future__ import annotations

from pathlib import Path

from cimlic.config import Config, apply_override, from_dict
from cimlic.errors import ConfigError
from cimlic.io import read_yaml

# Method name -> config overrides on top of the world's data section and the pre-trained tiny CLIP.
# Optimisation is scaled to the tiny model (AdamW, higher learning rates than the papers' ViT-B/16 settings; more
# epochs for the heads that start from scratch); prompt contexts start from "a photo of a" (CoOp's word init).
# Settings chosen by small sweeps on seed 0's world, by validation mAP (docs/benchmarks.md); "+gefd" adds the three
# GE/FD parts: group sampling, the dynamic gradient-balancing loss and the diversity module.
_GEFD = ["sampler.name=group", "loss.name=grad_balance", "model.diversity.enabled=true"]
_CPRFL = ["model.name=cprfl", "model.cprfl.freeze_backbone=true", "model.cprfl.ffn=256", "loss.name=asl",
          "train.lr=3e-3", "train.epochs=30"]  # fmt: skip
_TRMML = ["model.name=trmml", "loss.name=asl", "train.lr=2e-3", "train.epochs=20"]
METHODS: dict[str, list[str]] = {
    "zeroshot": ["model.name=zeroshot"],
    "linear_probe": ["model.name=linear_probe", "loss.name=asl", "train.lr=5e-2", "train.epochs=30"],
    "coop": ["model.name=coop", "model.ctx_init=a photo of a", "loss.name=asl", "train.lr=5e-3"],
    "coop+db": ["model.name=coop", "model.ctx_init=a photo of a", "loss.name=db", "train.lr=1e-3"],
    "dualcoop": ["model.name=dualcoop", "model.ctx_init=a photo of a", "model.dualcoop.n_ctx_neg=4",
                 "model.dualcoop.tau_s=3", "model.dualcoop.tau=10", "loss.name=asl", "train.lr=2e-2",
                 "train.epochs=40"],
    "lmpt": ["model.name=lmpt", "model.ctx_init=a photo of a", "loss.name=lmpt", "train.lr=1e-3"],
    "hpdval": ["model.name=hpdval", "loss.name=db_star", "train.lr=3e-4", "model.hpdval.alpha=0.7",
               "model.hpdval.topk=16", "model.hpdval.kd_weight=10", "model.hpdval.prompt_init=words",
               "model.hpdval.stage2_lr=5e-3"],
    "cprfl": _CPRFL,
    "cprfl+gefd": _CPRFL + _GEFD,
    "trmml": _TRMML,
    "trmml+gefd": _TRMML + _GEFD,
}  # fmt: skip
SIZES = {  # (epochs, stage-2 epochs) of the full and the quick demo; the quick demo caps every method's epochs
    False: (10, 5),
    True: (2, 1),
}


def demo_config(
    world: Path, clip_checkpoint: Path, arch: str, method: str, quick: bool, seed: int, out: Path
) -> Config:
    """The config of one demo run: the world's ``data.yaml`` section, the tiny CLIP, the method's overrides."""
    data = read_yaml(world / "data.yaml", ConfigError, "world's data config")["data"]
    cfg = from_dict(Config, {"name": f"demo_{method}", "seed": seed, "data": data})
    epochs, stage2 = SIZES[quick]
    common = [
        f"model.clip_arch={arch}", f"model.clip_checkpoint={clip_checkpoint}", f"train.epochs={epochs}",
        "train.batch_size=64", "train.num_workers=0", "train.warmup_steps=10", f"train.cache_dir={out / 'cache'}",
        f"model.hpdval.stage2_epochs={stage2}", f"data.captions={world / 'train_captions.txt'}",
    ]  # fmt: skip
    for item in common + METHODS[method]:
        apply_override(cfg, item)
    if quick:
        cfg.train.epochs = min(cfg.train.epochs, epochs)
    return cfg
