"""The ``cimlic`` command line; the only module that parses arguments."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from cimlic import __version__
from cimlic.data.labels import read_classes, read_label_list, write_label_list
from cimlic.distributed import close_distributed, rank
from cimlic.errors import CimlicError, ConfigError
from cimlic.io import WriteError, claim_output_folder, jsonable, read_json, write_json
from cimlic.ranges import check_range

logger = logging.getLogger("cimlic")

# what a command reports as one line (exit 2): the project's own errors, and the operating system's (a missing file
# the user named, a full disk, a read-only folder, no permission); anything else is a bug and keeps its traceback
USER_ERRORS = (CimlicError, OSError)


# the allowed values of numeric flags, checked once before a command runs (the flag named)
FLAG_RANGES = {"n_max": ">=0", "n_min": ">=1", "shape": ">0", "shots": ">=1", "episodes": ">=1", "known": "(0, 1]",
               "threshold": "[0, 1]", "max_images": ">=0", "steps": ">=0", "top_k": ">=0", "batch_size": ">=1",
               "target_precision": "(0, 1]", "head": ">=1", "tail": ">=1", "num_classes": ">=1", "n_ctx": ">=1",
               "learners": ">=1", "repeats": ">=1", "generated": ">=0"}  # fmt: skip


def check_flags(args: argparse.Namespace) -> None:
    """ConfigError naming the flag when a numeric flag is out of its range (``FLAG_RANGES``) or not finite."""
    for name, spec in FLAG_RANGES.items():
        value = getattr(args, name, None)
        if value is not None:
            check_range(value, spec, f"--{name.replace('_', '-')}")


def one_line(err: BaseException) -> str:
    """The message of a user error on one line: the file and the problem.

    An error raised in a DataLoader worker arrives wrapped in the worker's traceback (PyTorch re-raises it with the
    same type): only its original last line is kept. An OS error names its file.
    """
    text = str(err).strip()
    if "Original Traceback" in text:  # the worker's last line: "<module>.<Class>: <message>"
        text = text.splitlines()[-1].removeprefix(f"{type(err).__module__}.{type(err).__qualname__}: ")
    elif isinstance(err, OSError) and not isinstance(err, CimlicError) and err.filename is not None:
        text = f"{err.filename}: {err.strerror or text}"
    return " ".join(text.split())


# ------------------------------------------------------------------------------------------ split
def cmd_split_longtail(args: argparse.Namespace) -> int:
    from cimlic.data.prepare import split_stats
    from cimlic.data.splits import build_longtail

    classes = read_classes(args.classes)
    pool = read_label_list(args.labels, classes)
    rows = build_longtail(pool, n_max=args.n_max, n_min=args.n_min, shape=args.shape, seed=args.seed, clamp=args.clamp)
    train = pool.subset(rows)
    write_label_list(
        args.out, train, header=f"long-tailed split of {args.labels} (n_max={args.n_max}, seed={args.seed})"
    )
    stats = split_stats(train, train)
    g = stats["groups"]
    print(f"wrote {args.out}: {len(train)} images; n_c max {stats['max_count']} min {stats['min_count']}; "
          f"head/medium/tail {g['head']}/{g['medium']}/{g['tail']}")  # fmt: skip
    return 0


def cmd_split_fewshot(args: argparse.Namespace) -> int:
    from cimlic.data.splits import FEWSHOT_NOVEL, build_fewshot_episode, resolve_classes, split_base_novel

    classes = read_classes(args.classes)
    names = FEWSHOT_NOVEL[args.novel] if args.novel in FEWSHOT_NOVEL else [s.strip() for s in args.novel.split(",")]
    novel = resolve_classes(names, classes, source=f"--novel {args.novel}")
    out = claim_output_folder(args.out, "cimlic split fewshot")
    for split, path in (("train", args.labels), ("test", args.test)):
        if not path:
            continue
        labels = read_label_list(path, classes)
        base, novel_rows = split_base_novel(labels, novel)
        write_label_list(out / f"{split}_base.txt", labels.subset(base), header=f"{split}: base-only images of {path}")
        write_label_list(out / f"{split}_novel.txt", labels.subset(novel_rows), header=f"{split}: novel-only images")
        if split == "train":
            pool = labels.subset(novel_rows)
    for shots in args.shots:
        for episode in range(1, args.episodes + 1):
            rows = build_fewshot_episode(pool, novel, shots, seed=args.seed * 1000 + episode)
            write_label_list(out / f"train_novel_{shots}shot_{episode}.txt", pool.subset(rows),
                             header=f"{shots}-shot support set, episode {episode}, seed {args.seed}")  # fmt: skip
    print(f"wrote base/novel lists and {len(args.shots) * args.episodes} episodes to {out}")
    return 0


def cmd_split_partial(args: argparse.Namespace) -> int:
    from cimlic.data.splits import partial_labels

    classes = read_classes(args.classes)
    labels = read_label_list(args.labels, classes)
    labels.targets = partial_labels(labels.targets, args.known, args.seed)
    write_label_list(args.out, labels, header=f"partial labels of {args.labels}: known={args.known}, seed={args.seed}; "
                     "third column = unknown classes")  # fmt: skip
    print(f"wrote {args.out}: {len(labels)} images, {100 * labels.known_fraction():.1f}% of entries known")
    return 0


# ---------------------------------------------------------------------------------------- prepare
def cmd_prepare(args: argparse.Namespace) -> int:
    from cimlic.data.prepare import group_table, prepare_coco_full, prepare_coco_lt, prepare_voc07, prepare_voc_lt

    claim_output_folder(args.out, f"cimlic prepare {args.dataset}")  # before the (long) reading: fail first
    if args.dataset == "voc07":
        stats = prepare_voc07(args.voc2007, args.out, args.difficult, not args.no_image_check)
    elif args.dataset == "coco2014":
        classes = read_classes(args.classes) if args.classes else None
        stats = prepare_coco_full(args.coco, args.out, "2014", classes, not args.no_image_check)
    elif args.dataset == "voc-lt":
        stats = prepare_voc_lt(args.voc2012, args.voc2007, args.out, args.split_file, args.n_max or 800, args.seed,
                               args.difficult, not args.no_image_check)  # fmt: skip
    else:
        classes = read_classes(args.classes) if args.classes else None
        stats = prepare_coco_lt(args.coco, args.out, args.split_file, classes, args.n_max or 1200, args.seed,
                                not args.no_image_check)  # fmt: skip
    print(f"wrote {args.out}: {group_table(stats)}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    from cimlic.data.prepare import format_split_table, prepare_tagged

    stats = prepare_tagged(args.source, args.images, args.out, args.format, args.classes, args.sep, args.split,
                           args.seed, args.strict, args.head, args.tail)  # fmt: skip
    print(format_split_table(stats))
    print(f"wrote {args.out}: classes.txt, {', '.join(f'{n}.txt' for n in stats['images'] if n != 'total')}, "
          f"stats.json, data.yaml (train with --config {Path(args.out) / 'data.yaml'})")  # fmt: skip
    return 0


# --------------------------------------------------------------------------------------- evaluate
def cmd_evaluate(args: argparse.Namespace) -> int:
    from cimlic.metrics import evaluate, format_table, read_scores

    classes = read_classes(args.classes)
    test = read_label_list(args.labels, classes)
    group_counts = read_label_list(args.train_labels, classes).class_counts() if args.train_labels else None
    scores = read_scores(args.scores, len(test), len(classes))
    logits = args.scores_kind == "logits" or (args.scores_kind == "auto" and not ((scores >= 0) & (scores <= 1)).all())
    if args.scores_kind == "probs" and not ((scores >= 0) & (scores <= 1)).all():
        raise ConfigError(f"{args.scores}: --scores-kind probs but some scores are outside [0, 1]")
    result = evaluate(scores, test.targets, classes, group_counts=group_counts, ap_variant=args.ap,
                      threshold=args.threshold, scores_are_logits=logits)  # fmt: skip
    print(f"{args.scores}: {len(test)} images x {len(classes)} classes, scores read as "
          f"{'logits (sigmoid for thresholds)' if logits else 'probabilities'}, AP variant {args.ap}")  # fmt: skip
    print(format_table(result))
    if args.json:
        write_json(args.json, result)
        print(f"wrote {args.json}")
    return 0


# ------------------------------------------------------------------------------------ train / eval
def _config_and_run_dir(args: argparse.Namespace):
    """The config (file + --set overrides) and the run folder (--run-dir, default runs/<name>)."""
    from cimlic.config import load_config

    cfg = load_config(args.config, args.set)
    return cfg, Path(args.run_dir or Path("runs") / cfg.name)


def cmd_train(args: argparse.Namespace) -> int:
    from cimlic.apps.runner import train_run
    from cimlic.metrics import format_table

    cfg, run_dir = _config_and_run_dir(args)
    result = train_run(cfg, run_dir, resume=args.resume)
    if rank() == 0:
        print(format_table(result))
        print(f"run folder: {run_dir} (eval.json, config.yaml, metrics.jsonl, best/last checkpoints)")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from cimlic.apps.runner import evaluate_run
    from cimlic.metrics import format_table
    from cimlic.rundir import run_lock

    with run_lock(args.run, "eval", required=False):  # not while another command trains or evaluates there
        result, out = evaluate_run(args.run, args.split, args.ap)
        print(format_table(result))
        try:
            write_json(out, result)
        except WriteError as err:  # the metrics are not lost: they go to stdout
            print(json.dumps(result, default=jsonable))
            raise WriteError(f"{err}; the metrics are printed above as JSON") from None
    print(f"wrote {out}")
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from cimlic.apps.predict import predict_run

    summary = predict_run(args.run, args.inputs, args.out, args.threshold, args.thresholds, args.top_k,
                          args.batch_size, args.html)  # fmt: skip
    print(f"wrote {summary['out']}: {summary['scored']} image(s) scored, {len(summary['failed'])} unreadable; "
          f"{'calibrated probabilities' if summary['calibrated'] else 'sigmoid(logit)'}, thresholds from "
          f"{summary['thresholds']}")  # fmt: skip
    if summary["html"]:
        print(f"wrote {summary['html']}")
    for item in summary["failed"]:
        print(f"  skipped {item['error']}")
    return 0


def cmd_calibrate(args: argparse.Namespace) -> int:
    from cimlic.apps.calibrate import calibrate_run

    result = calibrate_run(args.run, args.rule, args.target_precision)
    tuned = result["tuned_thresholds"]
    print(f"wrote {result['calibration']}" + ("" if tuned is None else
          f"; test at these thresholds: CF1 {tuned['cf1']:.2f}, OF1 {tuned['of1']:.2f} (CP {tuned['cp']:.2f}, "
          f"CR {tuned['cr']:.2f})"))  # fmt: skip
    if result["flagged"]:
        print(f"  {len(result['flagged'])} class(es) flagged in the file: {', '.join(result['flagged'][:8])}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from cimlic.apps.export import export_run

    info = export_run(args.run, args.format, args.out)
    print(f"wrote {info['path']} ({info['format']}, {len(info['classes'])} classes; probabilities equal the run's "
          f"to {info['max_difference']:.1e}) with tagger.json, classes.txt and README.md")  # fmt: skip
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from cimlic.apps.bench import bench_cache
    from cimlic.config import load_config

    result = bench_cache(load_config(args.config, args.set), max_images=args.max_images)
    print(json.dumps(result))
    print(f"{result['model']} on {result['clip_arch']}, {result['images']} images, batch {result['batch_size']}: "
          f"uncached epoch {result['uncached_s']} s ({result['uncached_s_per_step']} s/step), cache build "
          f"{result['cache_build_s']} s, cached epoch {result['cached_s']} s -> ratio {result['ratio']}x")  # fmt: skip
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from cimlic.apps.bench import bench_train
    from cimlic.config import load_config

    result = bench_train(load_config(args.config, args.set), max_images=args.max_images)
    print(json.dumps(result))
    print(f"{result['model']} on {result['clip_arch']}, {result['images']} images, batch {result['batch_size']}: "
          f"{result['epoch_s']} s per epoch, {result['s_per_step']} s/step")  # fmt: skip
    return 0


def cmd_bench_memory(args: argparse.Namespace) -> int:
    import tempfile

    from cimlic.apps.bench import bench_memory
    from cimlic.apps.bench_suite import RANDOM_WEIGHTS, generated_voc
    from cimlic.config import load_config

    with tempfile.TemporaryDirectory() as tmp:
        sets = [*RANDOM_WEIGHTS, *generated_voc(Path(tmp), args.generated)] if args.generated else []
        result = bench_memory(load_config(args.config, [*sets, *args.set]), max_images=args.max_images)
    print(json.dumps(result))
    feats = ", ".join(f"{k} {tuple(v['per_image'])} {v['dtype']}" for k, v in result["features"].items())
    print(f"{result['model']}, {result['images']} images ({feats}): entry {result['entry_mib']} MiB "
          f"({result['mib_per_image']} MiB/image), built in {result['build_s']} s with a peak of "
          f"{result['build_peak_mib']} MiB; one epoch read back: peak {result['read_peak_mib']} MiB resident, "
          f"{result['read_peak_anon_mib']} MiB of it anonymous")  # fmt: skip
    return 0


def cmd_bench_suite(args: argparse.Namespace) -> int:
    from cimlic.apps.bench_suite import bench_suite

    result = bench_suite(args.out, args.device, args.case)
    print((Path(args.out) / "suite.md").read_text(), end="")
    print(f"wrote {Path(args.out) / 'suite.json'} and suite.md ({result['device']}, {result['seconds']} s)")
    return 0


def cmd_bench_text(args: argparse.Namespace) -> int:
    from cimlic.apps.bench import bench_text
    from cimlic.data.labels import read_classes

    classnames = read_classes(args.classes) if args.classes else [f"class {i}" for i in range(args.num_classes)]
    result = bench_text(args.arch, classnames, args.n_ctx, args.learners, args.repeats)
    print(json.dumps(result))
    if result["fits"]:
        print(f"{result['arch']} text tower, C={result['classes']}, M={result['n_ctx']}, {result['learners']} "
              f"learner(s): plain {result['plain_s']} s, shared prefix {result['shared_prefix_s']} s -> ratio "
              f"{result['ratio']}x (features {result['max_rel_diff_features']:.1e}, gradients "
              f"{result['max_rel_diff_grad']:.1e} relative)")  # fmt: skip
    else:
        print(f"{result['arch']}: the text tower does not fit the shared-prefix pass; plain {result['plain_s']} s")
    return 0


def cmd_fewshot(args: argparse.Namespace) -> int:
    from cimlic.apps.fewshot import format_fewshot, run_fewshot

    cfg, run_dir = _config_and_run_dir(args)
    summary = run_fewshot(cfg, run_dir, resume=args.resume)
    if rank() == 0:
        print(format_fewshot(summary))
        print(f"wrote {run_dir / 'fewshot.json'}")
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from cimlic.apps.report import write_report

    out = write_report(args.runs, args.out, title=args.title)
    print(f"wrote {out}")
    return 0


# ------------------------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from cimlic.apps.demo import run_demo, run_seeds

    if args.seeds:
        run_seeds(Path(args.out), args.seeds, quick=args.quick, clip_dir=Path(args.clip_dir), clip_seed=args.clip_seed)
    else:
        run_demo(Path(args.out), args.quick, args.seed, clip_dir=Path(args.clip_dir), clip_seed=args.clip_seed)
    return 0


# ----------------------------------------------------------------------------------------- digits
def cmd_digits(args: argparse.Namespace) -> int:
    from cimlic.data.prepare import group_table
    from cimlic.digits.world import build_digits_world

    stats = build_digits_world(args.out, seed=args.seed, n_max=args.n_max)
    print(f"wrote the Digits world to {args.out}: {group_table(stats)}; val {stats['val_images']} images")
    print(f"data config: {Path(args.out) / 'data.yaml'}")
    return 0


def cmd_pretrain_digits(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from cimlic.digits.pretrain import QUICK_RECIPE, PretrainRecipe, checkpoint_path, pretrain_digits

    recipe = QUICK_RECIPE if args.quick else PretrainRecipe()
    if args.steps:
        recipe = replace(recipe, steps=args.steps)
    command = f"cimlic pretrain-digits --out {args.out} --seed {args.seed} --steps {recipe.steps}"
    command += " --quick" if args.quick else ""
    cached = checkpoint_path(args.out, args.arch, recipe, args.seed).is_file() and not args.force
    path = pretrain_digits(args.out, seed=args.seed, recipe=recipe, arch=args.arch, command=command, force=args.force)
    meta = read_json(path.with_suffix(".json"), ConfigError, "pre-training record")
    print(f"checkpoint: {path}{' (found in the cache)' if cached else ''}")
    print(f"final loss {meta['final_loss']:.4f} (mean of the last 20 steps) after {len(meta['losses'])} steps "
          f"({meta['seconds']} s); "
          f"use model.clip_arch={meta['arch']} model.clip_checkpoint={path}")  # fmt: skip
    return 0


# ----------------------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="cimlic", description="Class-imbalanced multi-label classification toolkit")
    p.add_argument("--version", action="version", version=f"cimlic {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    sp = sub.add_parser("split", help="build benchmark splits").add_subparsers(dest="kind", required=True)
    lt = sp.add_parser("longtail", help="long-tailed subset of a pool (METHODS §1.2)")
    lt.add_argument("--labels", required=True, help="pool label list, in pool order")
    lt.add_argument("--classes", required=True)
    lt.add_argument("--n-max", type=int, required=True, help="800 for VOC-LT, 1200 for COCO-LT")
    lt.add_argument("--n-min", type=int, default=1)
    lt.add_argument("--shape", type=float, default=6.0, help="Pareto shape b")
    lt.add_argument("--clamp", action="store_true", help="clamp to available images (COCO-LT)")
    lt.add_argument("--seed", type=int, default=0)
    lt.add_argument("--out", required=True)
    lt.set_defaults(func=cmd_split_longtail)

    fs = sp.add_parser("fewshot", help="base/novel lists and K-shot episodes (METHODS §1.3)")
    fs.add_argument("--labels", required=True, help="training label list")
    fs.add_argument("--test", help="test label list to split into base/novel too")
    fs.add_argument("--classes", required=True)
    fs.add_argument("--novel", required=True, help="'voc', 'coco', or comma-separated class names")
    fs.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    fs.add_argument("--episodes", type=int, default=10)
    fs.add_argument("--seed", type=int, default=0)
    fs.add_argument("--out", required=True, help="output folder")
    fs.set_defaults(func=cmd_split_fewshot)

    pa = sp.add_parser("partial", help="hide labels at random (METHODS §1.4)")
    pa.add_argument("--labels", required=True)
    pa.add_argument("--classes", required=True)
    pa.add_argument("--known", type=float, required=True, help="known-label proportion p in (0, 1]")
    pa.add_argument("--seed", type=int, default=0)
    pa.add_argument("--out", required=True)
    pa.set_defaults(func=cmd_split_partial)

    pr = sub.add_parser("prepare", help="official dataset folders to label lists")
    pr.add_argument("dataset", choices=["voc-lt", "coco-lt", "voc07", "coco2014"])
    pr.add_argument("--voc2012", help="VOCdevkit/VOC2012 (voc-lt)")
    pr.add_argument("--voc2007", help="VOCdevkit/VOC2007 with test annotations (voc-lt)")
    pr.add_argument("--coco", help="folder with annotations/, train2017/, val2017/ (coco-lt)")
    pr.add_argument("--classes", help="class names for COCO categories in ascending id order")
    pr.add_argument("--split-file", help="published id list to use instead of regenerating the split")
    pr.add_argument("--n-max", type=int, default=0, help="default 800 (VOC) / 1200 (COCO)")
    pr.add_argument("--seed", type=int, default=0)
    pr.add_argument("--difficult", choices=["positive", "negative", "ignore"], default="positive")
    pr.add_argument("--no-image-check", action="store_true", help="do not check that every image file exists")
    pr.add_argument("--out", required=True)
    pr.set_defaults(func=cmd_prepare)

    im = sub.add_parser("import", help="your own tagged images to label lists: CSV, one-hot CSV, metadata.jsonl, "
                        "VOC XML, COCO JSON; checked, split (stratified)")  # fmt: skip
    im.add_argument("source", help="the label file (.csv, .jsonl, .json) or a folder of VOC XML files")
    im.add_argument("--images", required=True, help="the folder the image paths are relative to")
    im.add_argument("--out", required=True, help="output folder (new or empty)")
    im.add_argument("--format", default="auto", choices=["auto", "tags", "onehot", "hf", "voc", "coco"],
                    help="tags: path,tag;tag | onehot: path,class_a,... with 0/1 | hf: metadata.jsonl")  # fmt: skip
    im.add_argument("--classes", help="class list (one per line): fixes the order, needed for class indices")
    im.add_argument("--sep", help="tag separator of a tags CSV (default: ';' if used, else whitespace)")
    im.add_argument("--split", type=float, nargs="+", default=[0.7, 0.1, 0.2], metavar="F",
                    help="train [val] test fractions: 1, 2 or 3 numbers summing to 1 (0.7 0.1 0.2)")  # fmt: skip
    im.add_argument("--seed", type=int, default=0, help="seed of the stratified split")
    im.add_argument("--strict", action="store_true", help="an unreadable image is an error (default: listed, left out)")
    im.add_argument("--head", type=int, default=100, help="head classes: n_c >= this (stats.json)")
    im.add_argument("--tail", type=int, default=20, help="tail classes: n_c < this (stats.json)")
    im.set_defaults(func=cmd_import)

    ev = sub.add_parser("evaluate", help="evaluate a score matrix with the long-tailed protocol")
    ev.add_argument("--scores", required=True, help="(N, C) .npy/.csv, rows in label-list order")
    ev.add_argument("--labels", required=True, help="test label list")
    ev.add_argument("--train-labels", help="training label list (for head/medium/tail groups)")
    ev.add_argument("--classes", required=True)
    ev.add_argument("--ap", default="sklearn", choices=["sklearn", "voc_all_point", "voc07_11pt"],
                    help="AP variant: sklearn = non-interpolated (default)")  # fmt: skip
    ev.add_argument("--threshold", type=float, default=0.5)
    ev.add_argument("--scores-kind", choices=["auto", "logits", "probs"], default="auto",
                    help="auto: probabilities if every score is in [0, 1], else logits")  # fmt: skip
    ev.add_argument("--json", help="write the full result here")
    ev.set_defaults(func=cmd_evaluate)

    tr = sub.add_parser("train", help="train and test a model from a config (torchrun for several GPUs)")
    tr.add_argument("--config", required=True, action="append", help="experiment YAML (see configs/); repeat to "
                    "merge several in order, e.g. a method's config and an import's data.yaml")  # fmt: skip
    tr.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config field")
    tr.add_argument("--run-dir", help="run folder (default runs/<name>)")
    tr.add_argument("--resume", action="store_true", help="continue the run in --run-dir from its last epoch")
    tr.set_defaults(func=cmd_train)

    el = sub.add_parser("eval", help="evaluate a run's selected checkpoint")
    el.add_argument("--run", required=True, help="run folder")
    el.add_argument("--split", default="test", choices=["train", "val", "test"])
    el.add_argument("--ap", choices=["sklearn", "voc_all_point", "voc07_11pt"], help="AP variant (default: the run's)")
    el.set_defaults(func=cmd_eval)

    pd = sub.add_parser("predict", help="labels with scores for new images")
    pd.add_argument("--run", required=True, help="run folder")
    pd.add_argument("inputs", nargs="+", help="image files or folders")
    pd.add_argument("--threshold", type=float, help="one threshold for every class, on the scores predict writes "
                    "(calibrated probabilities; default: the run's per-class thresholds)")  # fmt: skip
    pd.add_argument("--thresholds", help="JSON {class name: threshold} (overrides some classes' thresholds)")
    pd.add_argument("--top-k", type=int, default=0, help="at most the K highest-scoring labels per image (0 = all)")
    pd.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    pd.add_argument("--html", help="also write an HTML gallery (thumbnails, labels, scores) here")
    pd.add_argument("--out", required=True, help="predictions .jsonl or .csv")
    pd.set_defaults(func=cmd_predict)

    ca = sub.add_parser("calibrate", help="choose a run's per-class thresholds on its validation split again")
    ca.add_argument("--run", required=True, help="run folder")
    ca.add_argument("--rule", choices=["f1", "precision"], help="f1: best F1 per class (default: the run's rule)")
    ca.add_argument("--target-precision", type=float, help="the largest recall at this precision (rule precision)")
    ca.set_defaults(func=cmd_calibrate)

    ex = sub.add_parser("export", help="the run as one ONNX or TorchScript model (image -> probabilities)")
    ex.add_argument("--run", required=True, help="run folder")
    ex.add_argument("--format", choices=["onnx", "torchscript"], default="onnx")
    ex.add_argument("--out", required=True, help="new output folder")
    ex.set_defaults(func=cmd_export)

    be = sub.add_parser("bench", help="measurements").add_subparsers(dest="what", required=True)
    bc = be.add_parser("cache", help="one epoch with the image tower recomputed vs cached")
    bc.add_argument("--config", required=True, action="append")
    bc.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    bc.add_argument("--max-images", type=int, default=0, help="use the first N training images (0 = all)")
    bc.set_defaults(func=cmd_bench)
    bt = be.add_parser("train", help="one training epoch on images (seconds per step)")
    bt.add_argument("--config", required=True, action="append")
    bt.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    bt.add_argument("--max-images", type=int, default=0, help="use the first N training images (0 = all)")
    bt.set_defaults(func=cmd_bench_train)
    bm = be.add_parser("memory", help="feature-cache entry size, peak memory to build it and to read it back")
    bm.add_argument("--config", required=True, action="append")
    bm.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    bm.add_argument("--max-images", type=int, default=0, help="use the first N training images (0 = all)")
    bm.add_argument(
        "--generated",
        type=int,
        default=0,
        metavar="N",
        help="train on N generated VOC-size JPEGs with random weights (any shipped config; 0 = its data)",
    )
    bm.set_defaults(func=cmd_bench_memory)
    bs = be.add_parser("suite", help="training steps of the shipped configs per variant, and the data path")
    bs.add_argument("--out", default="runs/bench", help="folder of suite.json and suite.md")
    bs.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    bs.add_argument("--case", action="append", help="only these cases (repeatable; default: all)")
    bs.set_defaults(func=cmd_bench_suite)
    bx = be.add_parser("text", help="prompt text pass, plain vs shared prefix (forward + backward)")
    bx.add_argument("--arch", default="ViT-B-16", help="open_clip architecture (random weights)")
    bx.add_argument("--classes", help="class-list file (default: --num-classes synthetic names)")
    bx.add_argument("--num-classes", type=int, default=20)
    bx.add_argument("--n-ctx", type=int, default=16, help="context vectors M")
    bx.add_argument("--learners", type=int, default=1, help="prompt learners in one pass (HP-DVAL, DualCoOp: 2)")
    bx.add_argument("--repeats", type=int, default=5)
    bx.set_defaults(func=cmd_bench_text)

    fs = sub.add_parser("fewshot", help="the few-shot protocol: K shots x episodes, mean ± std of novel mAP")
    fs.add_argument("--config", required=True, action="append", help="experiment YAML with a fewshot section "
                    "(repeat to merge several)")  # fmt: skip
    fs.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    fs.add_argument("--run-dir", help="run folder (default runs/<name>)")
    fs.add_argument("--resume", action="store_true", help="keep finished episodes, resume the others")
    fs.set_defaults(func=cmd_fewshot)

    rp = sub.add_parser("report", help="one self-contained HTML page of runs with plots and published numbers")
    rp.add_argument("runs", nargs="+", help="run folders")
    rp.add_argument("--out", required=True, help="output .html")
    rp.add_argument("--title")
    rp.set_defaults(func=cmd_report)

    dg = sub.add_parser("digits", help="build the Digits world (images, long-tailed lists, few-shot, partial)")
    dg.add_argument("--out", default="data/digits", help="output folder")
    dg.add_argument("--seed", type=int, default=0)
    dg.add_argument("--n-max", type=int, default=500, help="long-tail builder target of the largest class")
    dg.set_defaults(func=cmd_digits)

    pt = sub.add_parser("pretrain-digits", help="pre-train the tiny CLIP on the digits corpus (cached)")
    pt.add_argument("--out", default="checkpoints/digits", help="checkpoint folder")
    pt.add_argument("--seed", type=int, default=0)
    pt.add_argument("--steps", type=int, default=0, help="optimiser steps (0 = the recipe's)")
    pt.add_argument("--arch", default="cimlic-digits-vit", help="a tiny CLIP architecture of cimlic")
    pt.add_argument("--quick", action="store_true", help="a few small steps (smoke tests)")
    pt.add_argument("--force", action="store_true", help="train even if the cached checkpoint exists")
    pt.set_defaults(func=cmd_pretrain_digits)

    de = sub.add_parser("demo", help="every method on the Digits world, with a report (make demo)")
    de.add_argument("--out", default="runs/demo")
    de.add_argument("--quick", action="store_true", help="a 2-minute version (tiny pre-training, 2 epochs)")
    de.add_argument("--clip-dir", default="checkpoints/digits", help="where the pre-trained tiny CLIP is cached")
    de.add_argument("--seed", type=int, default=0, help="world and training seed")
    de.add_argument("--clip-seed", type=int, default=0, help="pre-training seed of the tiny CLIP (kept fixed: 0)")
    de.add_argument("--seeds", type=int, nargs="+", help="several seeds into OUT/seed_N, then mean ± std (seeds.json)")
    de.set_defaults(func=cmd_demo)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: parse ``argv``, run the command, turn user errors into one-line messages (exit 2)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("cimlic").setLevel(logging.DEBUG if args.verbose else logging.INFO)
    try:
        check_flags(args)
        if args.command == "prepare":
            need = {"voc-lt": ("voc2012", "voc2007"), "voc07": ("voc2007",)}.get(args.dataset, ("coco",))
            missing = [f"--{n}" for n in need if not getattr(args, n)]
            if missing:
                raise ConfigError(f"prepare {args.dataset} needs {' and '.join(missing)}")
        return int(args.func(args) or 0)
    except USER_ERRORS as err:
        if args.verbose:
            raise
        print(f"cimlic: error: {one_line(err)}", file=sys.stderr)
        return 2
    finally:
        close_distributed()


if __name__ == "__main__":
    sys.exit(main())
