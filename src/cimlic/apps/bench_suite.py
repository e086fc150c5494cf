"""``cimlic bench suite`` (``make bench``): the Trainer's own training step of HP-DVAL stage 1 and stage 2, CPRFL,
CoOp and DualCoOp at their shipped VOC-LT configs (random weights of the real architectures, generated VOC-size
JPEGs), per variant (float32, bf16 autocast, channels-last, ``torch.compile``, where each applies), and the data
path's images/s with the config's loader workers. One JSON and one markdown table.

On a GPU the configs run at their own batch sizes; on a CPU at reduced sizes (``REDUCED``), so the whole suite
takes a few minutes there too. bf16 autocast is a GPU variant (the Trainer's ``train.amp`` is GPU-only);
channels-last applies where a convolutional image tower runs at every step (CPRFL's ResNet-101); ``torch.compile``
compiles the Trainer's model in place (three untimed warm-up steps include the compilation), except for
CPRFL's ResNet-101 on a CPU (its training step compiles for over five minutes on two cores).
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import logging
import multiprocessing
import queue as queue_module
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from cimlic.apps.bench import PeakMemory
from cimlic.apps.runner import build_datasets, build_model_for, image_dataset, load_splits, model_transform
from cimlic.config import Config, ConfigError, load_config
from cimlic.data.formats import VOC_CLASSES
from cimlic.data.labels import LabelSet, read_label_list, write_classes, write_label_list
from cimlic.distributed import resolve_device
from cimlic.engine import Trainer
from cimlic.io import atomic_write_text, ensure_dir, write_json
from cimlic.losses import build_loss

logger = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[3]
CASES = {  # suite row -> shipped config (its method, tower, image size, loss, optimiser and workers)
    "hpdval_stage1": "configs/voc_lt/hpdval_stage1.yaml",
    "hpdval_stage2": "configs/voc_lt/hpdval_stage2.yaml",
    "cprfl": "configs/voc_lt/cprfl.yaml",
    "coop": "configs/voc_lt/coop.yaml",
    "dualcoop": "configs/voc_lt/dualcoop.yaml",
}
REDUCED = {"batch_size": 4, "steps": 2}  # CPU
FULL = {"steps": 10}  # GPU: the config's batch size
RANDOM_WEIGHTS = [  # the real architectures with random weights: nothing to download, nothing to point at
    "model.clip_checkpoint=",
    "model.random_init=true",
    "model.cprfl.backbone_weights=",
    "model.hpdval.stage1_run=",
    "model.hpdval.load_stage1=false",
]


def generated_voc(folder: Path, n: int, seed: int = 0, extra: int = 0) -> list[str]:
    """``n`` VOC-size (500 x 375) JPEGs with 1-3 of the 20 VOC classes each, as the training list, and ``extra`` more
    in ``pool.txt`` (the data path's); returns the ``--set``s of a data section."""
    rng = np.random.default_rng(seed)
    images = ensure_dir(folder / "images")
    targets = np.zeros((n + extra, len(VOC_CLASSES)), dtype=np.int8)
    for i in range(n + extra):
        targets[i, rng.choice(len(VOC_CLASSES), size=rng.integers(1, 4), replace=False)] = 1
        low = rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)  # smooth content, a photo's JPEG size
        Image.fromarray(low).resize((500, 375), Image.BILINEAR).save(images / f"{i:06d}.jpg", quality=90)
    ids = [f"{i:06d}" for i in range(n + extra)]
    write_classes(folder / "classes.txt", VOC_CLASSES)
    write_label_list(folder / "train.txt", LabelSet(ids[:n], targets[:n], VOC_CLASSES))
    write_label_list(folder / "pool.txt", LabelSet(ids, targets, VOC_CLASSES))
    write_label_list(folder / "test.txt", LabelSet(ids[:4], targets[:4], VOC_CLASSES))
    return [f"data.classes={folder / 'classes.txt'}", f"data.train_labels={folder / 'train.txt'}",
            f"data.test_labels={folder / 'test.txt'}", "data.val_fraction=0", f"data.image_root={images}",
            "data.train_image_root=", "data.test_image_root=", "data.image_pattern={id}.jpg"]  # fmt: skip


def _variants(cfg: Config, model: nn.Module, on_images: bool, device: torch.device) -> list[str]:
    """The variants that apply: float32; bf16 on a GPU; channels-last for a conv tower; compile (last, see above)."""
    out = ["fp32", "bf16"] if device.type == "cuda" else ["fp32"]
    convs = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    conv_tower = on_images and convs >= 10  # a ResNet-like tower sees images at every step (a ViT has one patch conv)
    if conv_tower:
        out.append("channels_last")
    if device.type == "cuda" or not conv_tower:  # on a CPU, compiling ResNet-101's training step takes > 5 minutes
        out.append("compile")  # last: compiling is not undone
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_steps(cfg: Config, model: nn.Module, loss_fn: nn.Module, train_set, variant: str, steps: int) -> dict:
    """Seconds per step and peak memory of ``steps`` Trainer steps after warm-up, in one variant."""
    cfg = copy.deepcopy(cfg)
    cfg.train.amp = variant == "bf16"
    with tempfile.TemporaryDirectory() as run_dir:
        trainer = Trainer(cfg, model, loss_fn, train_set, None, train_set, VOC_CLASSES, None, run_dir)
        if variant == "channels_last":
            trainer.model.to(memory_format=torch.channels_last)
        if variant == "compile":  # in place: the module, its parameter names (EMA, checkpoints) stay
            trainer.model.compile()
        trainer.start_epoch(0)
        device = trainer.device
        batches = (batch for _ in itertools.count() for batch in trainer.train_loader)  # epoch after epoch
        for _ in range(3 if variant == "compile" else 1):  # warm-up: allocations, first calls, compilation
            trainer.train_step(next(batches))
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        with PeakMemory() if device.type == "cpu" else contextlib.nullcontext() as peak:
            tic = time.perf_counter()
            for _ in range(steps):
                trainer.train_step(next(batches))
            _sync(device)
            seconds = (time.perf_counter() - tic) / steps
        if variant == "channels_last":
            model.to(memory_format=torch.contiguous_format)
    memory = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else peak.total
    return {"s_per_step": round(seconds, 4), "peak_mib": round(memory, 1)}


DATA_PATH_IMAGES = 256  # images timed through the loader, after its first batch


def _data_path(cfg: Config, model: nn.Module, pool: LabelSet) -> float:
    """Images/s of one epoch of a training loader over ``pool`` (decode + the run's transform) with the config's
    workers, timed from its first batch (the workers' start-up is not counted) to its end."""
    ds = image_dataset(cfg, pool, "train", model_transform(model, train=cfg.train.augment))
    loader = DataLoader(ds, batch_size=cfg.train.batch_size, shuffle=True, num_workers=cfg.train.num_workers)
    n, tic = 0, None
    for batch in loader:  # the whole epoch: the workers end as they should
        if tic is None:
            tic = time.perf_counter()
            continue
        n += len(batch["image"])
    return n / max(time.perf_counter() - (tic or 0.0), 1e-9)


def run_case(name: str, world: list[str], device: str, sizes: dict, cache_dir: Path) -> list[dict]:
    """The rows of one case: a training step per variant that applies, and the data path."""
    sets = [*RANDOM_WEIGHTS, *world, f"train.device={device}", f"train.cache_dir={cache_dir}"]
    if "batch_size" in sizes:
        sets.append(f"train.batch_size={sizes['batch_size']}")
    path = REPO / CASES[name]
    if not path.is_file():
        raise ConfigError(f"{path}: the suite runs the shipped configs of a cimlic checkout; not found")
    cfg = load_config(path, sets)
    splits = load_splits(cfg)
    model = build_model_for(cfg, splits.classnames)
    dev = resolve_device(cfg.train.device)
    train_set = build_datasets(cfg, splits, model, str(dev), which=("train",))["train"]
    loss_fn = build_loss(cfg.loss, torch.as_tensor(splits.train.class_counts()), len(splits.train))
    on_images = "image" in train_set[0]
    pool = read_label_list(Path(cfg.data.train_labels).with_name("pool.txt"), splits.classnames)
    images_per_s = _data_path(cfg, model, pool)
    rows = []
    for variant in _variants(cfg, model, on_images, dev):
        logger.info("bench suite: %s, %s", name, variant)
        rows.append(
            {
                "case": name,
                "variant": variant,
                "device": str(dev),
                "arch": cfg.model.clip_arch,
                "batch_size": cfg.train.batch_size,
                "steps": sizes["steps"],
                "step_input": "images" if on_images else "cached features",
                "data_images_per_s": round(images_per_s, 1),
                "num_workers": cfg.train.num_workers,
                **_time_steps(cfg, model, loss_fn, train_set, variant, sizes["steps"]),
            }  # fmt: skip
        )
    return rows


def markdown(rows: list[dict]) -> str:
    """The suite's table."""
    lines = ["| case | variant | device | step input | batch | s/step | peak memory MiB | data path img/s (workers) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        cells = [r["case"], r["variant"], r["device"], r["step_input"], r["batch_size"], r["s_per_step"],
                 r["peak_mib"], f"{r['data_images_per_s']} ({r['num_workers']})"]  # fmt: skip
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"


def _child(queue, fn, args) -> None:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("cimlic").setLevel(logging.INFO)
    try:
        queue.put(fn(*args))
    except BaseException as err:  # noqa: BLE001 (handed to the parent, which raises it)
        queue.put(err)


def _in_fresh_process(fn, *args):
    """``fn(*args)`` in a new (spawned) Python process; its result, or its exception raised here."""
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, fn, args))
    proc.start()
    while True:
        try:
            result = queue.get(timeout=5)
            break
        except queue_module.Empty:
            if not proc.is_alive():
                raise RuntimeError(
                    f"bench suite: the process of {args[0]!r} ended (exit code {proc.exitcode})"
                ) from None
    proc.join()
    if isinstance(result, BaseException):
        raise result
    return result


def bench_suite(out: str | Path, device: str = "auto", cases: list[str] | None = None) -> dict:
    """Run the suite into ``out`` (``suite.json``, ``suite.md``); returns the JSON's content."""
    cases = cases or list(CASES)
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        raise ConfigError(f"unknown bench case(s) {unknown}; valid: {list(CASES)}")
    dev = resolve_device(device)
    sizes = FULL if dev.type == "cuda" else REDUCED
    out = ensure_dir(Path(out))
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        batch = sizes.get("batch_size", 32)
        n = batch * (sizes["steps"] + 4)  # warm-up (compile: 3) + timed steps, one epoch without a restart
        world = generated_voc(Path(tmp) / "voc", n, extra=DATA_PATH_IMAGES + 2 * batch)  # + the data path's
        rows = []
        for name in cases:  # each case in a fresh process: its peak memory is its own, not the cases' before it
            rows += _in_fresh_process(run_case, name, world, str(dev), sizes, Path(tmp) / "cache")
    result = {"device": str(dev), "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "sizes": sizes,
              "seconds": round(time.perf_counter() - tic, 1), "rows": rows}  # fmt: skip
    write_json(out / "suite.json", result)
    atomic_write_text(out / "suite.md", markdown(rows))
    return result
