"""``cimlic demo``: every method of the toolkit on the Digits world, end to end.

1. Build the Digits world (``cimlic.digits.world``) under ``<out>/data`` if it is missing.
2. Pre-train the tiny CLIP on the digits corpus, or reuse the cached checkpoint (``cimlic pretrain-digits``,
   ``checkpoints/digits/`` by default).
3. Train and test every method with the shared Trainer (one run folder each under ``<out>``).
4. Print a total / head / medium / tail table, write ``<out>/summary.json`` and ``<out>/report.html``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from tqdm import tqdm

from cimlic.digits.settings import METHODS, demo_config
from cimlic.errors import ConfigError
from cimlic.io import read_json, write_json

logger = logging.getLogger(__name__)


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
    from cimlic.apps.report import write_report
    from cimlic.apps.runner import train_run
    from cimlic.digits.pretrain import QUICK_RECIPE, PretrainRecipe, pretrain_digits
    from cimlic.digits.world import build_digits_world
    from cimlic.metrics import format_table

    start, out = time.time(), Path(out)
    world = out / "data"
    if not (world / "data.yaml").is_file():
        logger.info("building the Digits world in %s", world)
        build_digits_world(world, seed=seed)
    recipe = QUICK_RECIPE if quick else PretrainRecipe()
    command = f"cimlic pretrain-digits --seed {clip_seed}" + (" --quick" if quick else "")
    checkpoint = pretrain_digits(clip_dir, seed=clip_seed, recipe=recipe, command=command)
    arch = read_json(checkpoint.with_suffix(".json"), ConfigError, "pre-training record")["arch"]
    results, runs = {}, []
    for method in tqdm(METHODS, desc="demo methods"):
        run_dir = out / method
        done = run_dir / "eval.json"
        if done.is_file():  # a finished run is reused (delete its folder to train it again)
            results[method] = read_json(done, ConfigError, "run result")
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
    write_json(out / "summary.json", summary)
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
    write_json(out / "seeds.json", record)
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
