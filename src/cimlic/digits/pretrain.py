"""``cimlic pretrain-digits``: contrastive pre-training of a tiny CLIP on the Digits world's pre-training corpus.

The model is an open_clip CLIP built from a registered JSON config (``cimlic-digits-vit``: ViT image tower, causal
transformer text tower with the real BPE tokenizer). It is trained with CLIP's symmetric InfoNCE loss on captioned
mosaics generated in memory from the pre-training half of the digits (:class:`cimlic.digits.world.DigitCorpus`;
every batch holds distinct captions, so there are no false negatives), seeded, and saved as an open_clip
``.safetensors`` state dict that ``load_clip(arch, checkpoint=path)`` loads like any checkpoint, with a JSON sidecar
(command, seed, config, recipe, loss curve, timing). The file name carries a key of (config + recipe + seed + steps):
a second call with the same key returns the existing file without training.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from cimlic.digits.world import CORPUS_LABEL_COUNTS, CORPUS_STYLE, MAX_CORPUS_BATCH, DigitCorpus, caption
from cimlic.errors import ConfigError
from cimlic.io import ensure_dir, read_json, save_safetensors, write_json
from cimlic.models.clip import TINY_CONFIG_DIR, ClipError, ClipModel, load_clip

logger = logging.getLogger(__name__)

ARCH = "cimlic-digits-vit"
CORPUS_VERSION = 1  # bump when DigitCorpus changes what it draws (invalidates cached checkpoints)


@dataclass(frozen=True)
class PretrainRecipe:
    """Optimisation settings of ``pretrain_digits`` (all of them enter the cache key).

    The defaults take about 2.5 minutes on 2 CPU cores (1,500 steps of ~0.1 s with ``cimlic-digits-vit``).
    """

    steps: int = 1500  # optimiser steps
    batch_size: int = 128  # image-caption pairs per step (distinct captions)
    lr: float = 1e-3  # peak AdamW learning rate
    warmup: int = 50  # linear warm-up steps, then cosine decay to 0
    weight_decay: float = 0.05  # decoupled weight decay of matrices (not of gains, biases, logit scale)
    betas: tuple[float, float] = (0.9, 0.98)  # AdamW betas (CLIP's)
    grad_clip: float = 0.0  # clip the global gradient norm to this (0 = off)


# smoke tests and `--quick`: about a second; the loss already falls below chance level (log 16)
QUICK_RECIPE = PretrainRecipe(steps=40, batch_size=16, lr=2e-3, warmup=5)


def lr_at(step: int, recipe: PretrainRecipe) -> float:
    """Learning rate of optimiser step ``step`` (0-based): linear warm-up, then cosine to 0."""
    if step < recipe.warmup:
        return recipe.lr * (step + 1) / recipe.warmup
    progress = (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)
    return 0.5 * recipe.lr * (1.0 + math.cos(math.pi * progress))


def clip_loss(image_features: Tensor, text_features: Tensor, logit_scale: Tensor) -> Tensor:
    """CLIP's symmetric InfoNCE: pair i is the positive of row i and of column i of the (B, B) similarity."""
    img = F.normalize(image_features, dim=-1)
    txt = F.normalize(text_features, dim=-1)
    logits = logit_scale.exp().clamp(max=100.0) * img @ txt.t()  # (B, B)
    target = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def images_to_tensor(images: np.ndarray, clip: ClipModel) -> Tensor:
    """(B, H, W, 3) uint8 → (B, 3, H, W) float, normalised like the toolkit's transform (CLIP mean/std)."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)
    mean = torch.tensor(clip.image_mean).view(1, 3, 1, 1)
    std = torch.tensor(clip.image_std).view(1, 3, 1, 1)
    return (x - mean) / std


def _param_groups(net: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: matrices decay, gains / biases / the logit scale do not (as in CLIP)."""
    decay = [p for p in net.parameters() if p.ndim >= 2]
    rest = [p for p in net.parameters() if p.ndim < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}]


def model_config(arch: str) -> dict:
    """The JSON config of one of cimlic's tiny architectures (``cimlic/assets/clip_configs``)."""
    path = TINY_CONFIG_DIR / f"{arch}.json"
    if not path.is_file():
        valid = sorted(p.stem for p in TINY_CONFIG_DIR.glob("*.json"))
        raise ClipError(f"pre-training needs one of cimlic's tiny CLIP architectures, not {arch!r}; valid: {valid}")
    return read_json(path, ConfigError, "tiny CLIP config")


def _corpus() -> dict:
    """What the corpus draws (part of the cache key and of the sidecar)."""
    return {"version": CORPUS_VERSION, "style": asdict(CORPUS_STYLE), "label_counts": list(CORPUS_LABEL_COUNTS)}


def cache_key(arch: str, recipe: PretrainRecipe, seed: int) -> str:
    """12 hex digits identifying (arch, its config, the recipe incl. steps, seed, corpus version)."""
    parts = {"arch": arch, "model": model_config(arch), "recipe": asdict(recipe), "seed": seed, "corpus": _corpus()}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:12]


def checkpoint_path(out_dir: str | os.PathLike, arch: str, recipe: PretrainRecipe, seed: int) -> Path:
    """Where ``pretrain_digits`` writes (or finds) the checkpoint of these settings."""
    return Path(out_dir) / f"{arch}_seed{seed}_steps{recipe.steps}_{cache_key(arch, recipe, seed)}.safetensors"


def train_contrastive(clip: ClipModel, recipe: PretrainRecipe, seed: int, progress: bool = True) -> list[float]:
    """Train ``clip``'s inner open_clip model in place on the digits corpus; returns the loss of every step."""
    net = clip.model
    net.requires_grad_(True)
    net.train()
    corpus = DigitCorpus()
    rng = np.random.default_rng(seed)
    token_table: dict[tuple[int, ...], Tensor] = {}  # label set -> (L,) tokens, tokenised once
    groups = _param_groups(net, recipe.weight_decay)
    opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=recipe.betas, eps=1e-6, fused=True)  # fused: 5x faster on CPU
    losses: list[float] = []
    bar = tqdm(range(recipe.steps), desc="pre-training", unit="step", disable=not progress, leave=False)
    for step in bar:
        images, sets, _ = corpus.batch(recipe.batch_size, rng)
        missing = [s for s in sets if s not in token_table]
        if missing:
            token_table.update(zip(missing, clip.tokenize([caption(s) for s in missing]), strict=True))
        tokens = torch.stack([token_table[s] for s in sets])  # (B, L)
        for group in opt.param_groups:
            group["lr"] = lr_at(step, recipe)
        loss = clip_loss(net.encode_image(images_to_tensor(images, clip)), net.encode_text(tokens), net.logit_scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if recipe.grad_clip > 0:
            nn.utils.clip_grad_norm_(net.parameters(), recipe.grad_clip)
        opt.step()
        losses.append(loss.detach().item())
        if step % 10 == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    net.requires_grad_(False)
    net.eval()
    return losses


def pretrain_digits(
    out_dir: str | os.PathLike,
    seed: int = 0,
    steps: int | None = None,
    recipe: PretrainRecipe | None = None,
    arch: str = ARCH,
    command: str = "",
    force: bool = False,
    progress: bool = True,
) -> Path:
    """Pre-train (or find in the cache) a tiny CLIP on the digits corpus; returns the ``.safetensors`` path.

    Args:
        out_dir: folder of the checkpoint and its JSON sidecar.
        seed: seed of the initialisation and of the corpus draws.
        steps: optimiser steps (overrides ``recipe.steps``).
        recipe: optimisation settings (default :class:`PretrainRecipe`).
        arch: a tiny architecture of ``cimlic/assets/clip_configs``.
        command: the command line to record in the sidecar.
        force: train even when the cached file exists.
        progress: show a progress bar.
    """
    recipe = recipe or PretrainRecipe()
    if steps is not None:
        recipe = replace(recipe, steps=steps)
    if recipe.steps < 1 or not 2 <= recipe.batch_size <= MAX_CORPUS_BATCH:
        raise ConfigError(
            f"pre-training needs steps >= 1 and 2 <= batch_size <= {MAX_CORPUS_BATCH} (distinct captions per batch); "
            f"got steps={recipe.steps}, batch_size={recipe.batch_size}"
        )
    command = command or f"cimlic.digits.pretrain.pretrain_digits({str(out_dir)!r}, seed={seed}, recipe={recipe!r})"
    path = checkpoint_path(out_dir, arch, recipe, seed)
    sidecar = path.with_suffix(".json")
    if path.is_file() and sidecar.is_file() and not force:
        logger.info("pre-trained checkpoint found in the cache: %s", path)
        return path
    torch.manual_seed(seed)
    clip = load_clip(arch, random_init=True)
    n_params = sum(p.numel() for p in clip.model.parameters())
    logger.info("pre-training %s (%.2f M parameters) for %d steps, batch %d, seed %d",
                arch, n_params / 1e6, recipe.steps, recipe.batch_size, seed)  # fmt: skip
    start = time.perf_counter()
    losses = train_contrastive(clip, recipe, seed, progress)
    seconds = time.perf_counter() - start
    ensure_dir(path.parent)
    save_safetensors(path, {k: v.detach() for k, v in clip.model.state_dict().items()}, metadata={"format": "pt"})
    meta = {
        "command": command,
        "arch": arch,
        "seed": seed,
        "key": cache_key(arch, recipe, seed),
        "model_config": model_config(arch),
        "recipe": asdict(recipe),
        "corpus": _corpus(),
        "parameters": n_params,
        "seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / recipe.steps, 4),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "machine": platform.machine(),
        "final_loss": round(float(np.mean(losses[-20:])), 5),  # mean of the last 20 steps
        "losses": [round(v, 5) for v in losses],
    }
    write_json(sidecar, meta, indent=1)
    logger.info("pre-training done in %.1f s, loss %.3f -> %.3f: %s", seconds, losses[0], meta["final_loss"], path)
    return path
