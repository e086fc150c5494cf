"""``cimlic demo``: every method of the toolkit on the Digits world, end to end.

1. Build the Digits world (``cimlic.data.digits``) under ``<out>/data`` if it is missing.
2. Pre-train the tiny CLIP on the digits corpus, or reuse the cached checkpoint (``cimlic pretrain-digits``,
   ``checkpoints/digits/`` by default).
3. Train and test every method with the shared Trainer (one run folder each under ``<out>``).
4. Print a total / head / medium / tail table, write ``<out>/summary.json`` and ``<out>/report.html``.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import yaml
from tqdm import tqdm

from cimlic.config import Config, apply_override, from_dict

logger = logging.getLogger(__name__)

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
    data = yaml.safe_load((world / "data.yaml").read_text())["data"]
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


def run_demo(
    out: Path,
    quick: bool = False,
    seed: int = 0,
    clip_dir: Path = Path("checkpoints/digits"),
    clip_seed: int = 0,
) -> dict:
    """Build or reuse the world and the tiny CLIP, train every method, print the table, write the report.

    The tiny CLIP is the one ``cimlic pretrain-digits --seed clip_seed`` writes to ``clip_dir`` (cached by recipe and
    seed). It plays the part of the public CLIP checkpoint of the real benchmarks, so by default it stays the same
    (``clip_seed`` 0) while ``seed`` changes the world (labels, rendering, long tail) and every training run.
    """
    from cimlic.data.digits import build_digits_world
    from cimlic.metrics import format_table
    from cimlic.pretrain import QUICK_RECIPE, PretrainRecipe, pretrain_digits
    from cimlic.report import write_report
    from cimlic.runner import train_run

    start, out = time.time(), Path(out)
    world = out / "data"
    if not (world / "data.yaml").is_file():
        logger.info("building the Digits world in %s", world)
        build_digits_world(world, seed=seed)
    recipe = QUICK_RECIPE if quick else PretrainRecipe()
    command = f"cimlic pretrain-digits --seed {clip_seed}" + (" --quick" if quick else "")
    checkpoint = pretrain_digits(clip_dir, seed=clip_seed, recipe=recipe, command=command)
    arch = json.loads(checkpoint.with_suffix(".json").read_text())["arch"]
    results, runs = {}, []
    for method in tqdm(METHODS, desc="demo methods"):
        run_dir = out / method
        done = run_dir / "eval.json"
        if done.is_file():  # a finished run is reused (delete its folder to train it again)
            results[method] = json.loads(done.read_text())
        else:
            results[method] = train_run(demo_config(world, checkpoint, arch, method, quick, seed, out), run_dir)
        runs.append(run_dir / "stage2" if (run_dir / "stage2").is_dir() else run_dir)
        logger.info("%s\n%s", method, format_table(results[method]))
    table = format_results(results)
    print(table)
    keys = ("map", "head", "medium", "tail", "var")
    summary = {"seed": seed, "clip_seed": clip_seed, "quick": quick, "seconds": round(time.time() - start, 1),
               "clip": str(checkpoint),
               "results": {m: {k: r.get(k) for k in keys} for m, r in results.items()}}  # fmt: skip
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    report = write_report(runs, out / "report.html", title="cimlic demo: the Digits world")
    print(f"wrote {out / 'summary.json'} and {report} ({summary['seconds']} s)")
    return summary


def format_results(results: dict[str, dict]) -> str:
    """A method × (mAP, head, medium, tail) text table."""
    lines = [f"{'method':<16}{'mAP':>8}{'head':>8}{'medium':>8}{'tail':>8}"]
    for name, r in results.items():
        cells = "".join(
            f"{r[k]:>8.2f}" if r.get(k) is not None else f"{'-':>8}" for k in ("map", "head", "medium", "tail")
        )
        lines.append(f"{name:<16}{cells}")
    return "\n".join(lines)


def run_seeds(out: Path, seeds: Sequence[int], quick: bool = False, clip_dir: Path = Path("checkpoints/digits"),
              clip_seed: int = 0) -> dict:  # fmt: skip
    """``run_demo`` for each seed into ``<out>/seed_<s>``, then mean ± std (sample std, n−1) over the seeds.

    Writes ``<out>/seeds.json`` and prints a method × (mAP, head, medium, tail) table of "mean ± std", plus the
    gain of each method over zero-shot per group (the groups hold different classes in different worlds, so the
    gain is the fair measure of how much harder the tail is to learn).
    """
    out = Path(out)
    summaries = [run_demo(out / f"seed_{s}", quick, s, clip_dir, clip_seed) for s in seeds]
    stats = seed_statistics([sm["results"] for sm in summaries])
    record = {"seeds": list(seeds), "clip_seed": clip_seed, "quick": quick, "methods": stats}
    (out / "seeds.json").write_text(json.dumps(record, indent=2) + "\n")
    print(format_seed_table(stats, len(seeds)))
    print(f"wrote {out / 'seeds.json'}")
    return record


def _mean_std(values: Sequence[float]) -> list[float]:
    """[mean, sample std (n−1; 0 for one value)]."""
    v = np.asarray(values, dtype=float)
    return [float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0]


def seed_statistics(per_seed: Sequence[dict[str, dict]]) -> dict[str, dict]:
    """{method: {key: [mean, std], "gain_<key>": [mean, std]}} over seeds; gain = method − zero-shot, same seed."""
    stats: dict[str, dict] = {}
    for method in per_seed[0]:
        entry = {}
        for k in ("map", "head", "medium", "tail"):
            entry[k] = _mean_std([r[method][k] for r in per_seed if r[method].get(k) is not None])
            if "zeroshot" in per_seed[0]:
                entry[f"gain_{k}"] = _mean_std([r[method][k] - r["zeroshot"][k] for r in per_seed])
        stats[method] = entry
    return stats


def format_seed_table(stats: dict[str, dict], n: int) -> str:
    """Markdown table of mean ± std (and the mean gain over zero-shot) per method."""
    lines = [f"| method ({n} seeds) | mAP | head | medium | tail | gain over zero-shot: mAP / head / medium / tail |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for method, e in stats.items():
        cells = " | ".join(f"{e[k][0]:.2f} ± {e[k][1]:.2f}" for k in ("map", "head", "medium", "tail"))
        gains = (
            " / ".join(f"{e[f'gain_{k}'][0]:+.2f}" for k in ("map", "head", "medium", "tail"))
            if "gain_map" in e
            else "-"
        )
        lines.append(f"| {method} | {cells} | {gains} |")
    return "\n".join(lines)
