"""The HTML results report: one self-contained page comparing run folders with each other and with published numbers.

The page holds the results table (total / head / medium / tail mAP and var per run), the published VOC-LT or
COCO-LT numbers of the HP-DVAL (TIP 2025) and CPRFL (MM 2024) papers when the runs are on those datasets, a scatter
of per-class AP against training count, the class-frequency histogram, training-loss curves and a per-class table.
Everything is inline (CSS and hand-written SVG from ``cimlic.apps.plots``), so the file can be mailed or archived alone.
"""

from __future__ import annotations

import csv
import datetime
import io
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from html import escape
from importlib import resources
from pathlib import Path
from typing import Any

import cimlic
from cimlic.apps import plots
from cimlic.errors import CimlicError
from cimlic.io import atomic_write_files, read_json, read_yaml

logger = logging.getLogger(__name__)

PUBLISHED_DATASETS = {"voc_lt": "VOC-LT", "coco_lt": "COCO-LT"}
SUMMARY = (("map", "mAP"), ("head", "head"), ("medium", "medium"), ("tail", "tail"), ("var", "var"))
EVAL_KEYS = ("map", "head", "medium", "tail", "var", "per_class_ap", "groups", "ap_variant")
__all__ = ["ReportError", "RunResult", "load_published", "read_run", "render_report", "write_report"]


class ReportError(CimlicError, ValueError):
    """A run folder cannot be reported: a missing or malformed file (the message names it, on one line)."""


@dataclass
class RunResult:
    """What the report needs from one run folder."""

    name: str  # shown in tables and legends (the folder name)
    path: Path
    dataset: str  # config data.name
    model: str
    loss: str
    eval: dict[str, Any]  # eval.json
    classnames: list[str]
    counts: list[int]  # training images per class, aligned with classnames
    head_threshold: float | None = None
    tail_threshold: float | None = None
    losses: list[tuple[float, float]] = field(default_factory=list)  # (step, training loss) from metrics.jsonl


# ------------------------------------------------------------------------------------------- reading
def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _read_json(path: Path) -> dict:
    data = read_json(path, ReportError, "JSON file of the run")
    if not isinstance(data, dict):
        raise ReportError(f"{path}: malformed (a JSON object expected, got {type(data).__name__})")
    return data


def _read_config(path: Path) -> dict:
    cfg = read_yaml(path, ReportError, "run config")
    if not isinstance(cfg, dict) or not all(isinstance(cfg.get(s, {}), dict) for s in ("data", "model", "loss")):
        raise ReportError(f"{path}: malformed (a mapping with data/model/loss sections expected)")
    return cfg


def _is_number(v: Any) -> bool:
    return v is None or (isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v))


def _check_eval(path: Path, ev: dict, classnames: list[str]) -> None:
    missing = [k for k in EVAL_KEYS if k not in ev]
    if missing:
        raise ReportError(f"{path}: malformed, missing key(s) {', '.join(missing)}")
    bad = [k for k, _ in SUMMARY if not _is_number(ev[k])]
    aps, groups = ev["per_class_ap"], ev["groups"]
    if not isinstance(aps, dict) or not all(_is_number(v) for v in aps.values()):
        bad.append("per_class_ap")
    if not isinstance(groups, dict):
        bad.append("groups")
    if bad:
        raise ReportError(f"{path}: malformed value(s) for {', '.join(bad)} (numbers or null expected)")
    unknown = sorted(set(aps) - set(classnames))
    if unknown:
        raise ReportError(f"{path}: per_class_ap names classes not in best.json: {', '.join(unknown[:5])}")


def _read_losses(path: Path) -> list[tuple[float, float]]:
    """(step, loss) of the training lines of ``metrics.jsonl``; [] when absent. A torn last line is ignored."""
    if not path.is_file():
        return []
    text = path.read_text(encoding="utf-8", errors="replace")
    lines, out = text.splitlines(), []
    for n, line in enumerate(lines, 1):
        try:
            rec = json.loads(line) if line.strip() else {}
        except json.JSONDecodeError as err:
            if n == len(lines) and not text.endswith("\n"):
                break  # the run is still writing this line
            raise ReportError(f"{path}: malformed JSON on line {n} ({_one_line(err)})") from None
        if not isinstance(rec, dict) or "split" in rec:
            continue  # evaluation lines
        step, loss = rec.get("step"), rec.get("loss")
        if step is not None and loss is not None and _is_number(step) and _is_number(loss):
            out.append((float(step), float(loss)))
    return out


def read_run(run_dir: str | Path) -> RunResult:
    """Read ``config.yaml``, ``eval.json``, ``best.json`` and (optionally) ``metrics.jsonl`` of a run folder.

    Raises:
        ReportError: the folder or one of its files is missing or malformed (the message names the file).
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir}: not a run folder (no such directory)")
    cfg = _read_config(run_dir / "config.yaml")
    ev = _read_json(run_dir / "eval.json")
    meta = _read_json(run_dir / "best.json")
    names, sidecar = meta.get("classnames"), run_dir / "best.json"
    counts = meta.get("group_counts", meta.get("train_counts"))  # train_counts: the name before 2026-12
    if not isinstance(names, list) or not isinstance(counts, list) or len(names) != len(counts):
        raise ReportError(f"{sidecar}: malformed, classnames and group_counts must be lists of equal length")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts):
        raise ReportError(f"{sidecar}: malformed group_counts (non-negative integers expected)")
    _check_eval(run_dir / "eval.json", ev, [str(n) for n in names])
    data = cfg.get("data", {})
    return RunResult(
        name=run_dir.resolve().name, path=run_dir, dataset=str(data.get("name", "custom")),
        model=str(cfg.get("model", {}).get("name", "?")), loss=str(cfg.get("loss", {}).get("name", "?")),
        eval=ev, classnames=[str(n) for n in names], counts=counts,
        head_threshold=_threshold(data.get("head_threshold")), tail_threshold=_threshold(data.get("tail_threshold")),
        losses=_read_losses(run_dir / "metrics.jsonl"),
    )  # fmt: skip


def _threshold(v: Any) -> float | None:
    return float(v) if v is not None and _is_number(v) else None


def _number(text: str) -> float | None:
    return float(text) if text.strip() else None


def load_published(dataset: str) -> list[dict]:
    """Published long-tailed results for ``dataset`` ("voc_lt" or "coco_lt") from the shipped tables.

    Returns:
        One dict per (paper, method): ``method``, ``total``, ``head``, ``medium``, ``tail``, ``var`` (None where the
        paper has no var column), ``group``, ``backbone`` and ``source`` (paper and table); [] for other datasets.
    """
    rows = []
    folder = resources.files("cimlic") / "assets" / "published"
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        if not entry.name.endswith(".csv"):
            continue
        text = entry.read_text(encoding="utf-8")
        comments = [line[1:].strip() for line in text.splitlines() if line.startswith("#")]
        source = next((c.split(":", 1)[1].strip() for c in comments if c.lower().startswith("source:")), entry.name)
        body = "\n".join(line for line in text.splitlines() if not line.startswith("#"))
        for r in csv.DictReader(io.StringIO(body)):
            if r["dataset"] == dataset:
                nums = {k: _number(r[k]) for k in ("total", "head", "medium", "tail", "var")}
                rows.append({"method": r["method"], **nums, "group": r["group"], "backbone": r["backbone"],
                             "source": source})  # fmt: skip
    return rows


# ------------------------------------------------------------------------------------------ rendering
CSS = """
body{font:14px/1.45 system-ui,sans-serif;color:#222;margin:0;background:#fafafa}
main{max-width:1200px;margin:0 auto;padding:16px 24px 48px;background:#fff}
h1{font-size:22px;margin:8px 0 4px}h2{font-size:17px;margin:28px 0 8px;border-bottom:1px solid #ddd}
h3{font-size:14px;margin:16px 0 6px}.meta,.note{color:#666;font-size:12px}.warn{color:#a33;font-weight:600}
table{border-collapse:collapse;margin:6px 0;font-size:13px}th,td{padding:3px 9px;border-bottom:1px solid #e6e6e6}
th{background:#f2f2f2;text-align:left}td.n{text-align:right;font-variant-numeric:tabular-nums}
tr.ours td{background:#f6f9ff}.sw{display:inline-block;width:10px;height:10px;margin-right:6px}
svg{max-width:100%;height:auto;display:block}.grid{display:flex;flex-wrap:wrap;gap:12px}
figure{margin:8px 0}figcaption{font-size:12px;color:#555}details{margin:8px 0}
"""


def _fmt(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _cell(v: Any, numeric: bool = False) -> str:
    return f'<td class="n">{_fmt(v)}</td>' if numeric else f"<td>{escape(str(v))}</td>"


def _table(headers: Sequence[str], rows: Sequence[str], table_id: str = "", cls: str = "") -> str:
    attrs = (f' id="{table_id}"' if table_id else "") + (f' class="{cls}"' if cls else "")
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    return f"<table{attrs}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _results_section(runs: Sequence[RunResult]) -> str:
    rows = []
    for i, r in enumerate(runs):
        e = r.eval
        swatch = f'<span class="sw" style="background:{plots.run_color(i)}"></span>'
        cells = [f"<td>{swatch}{escape(r.name)}</td>", *(_cell(v) for v in (r.dataset, r.model, r.loss))]
        cells += [_cell(e.get(k, "?")) for k in ("ap_variant", "selected_on", "split")]
        cells += [_cell(e[k], numeric=True) for k, _ in SUMMARY]
        rows.append(f'<tr data-run="{escape(r.name)}">{"".join(cells)}</tr>')
    headers = ["run", "dataset", "model", "loss", "AP variant", "selected on", "split"] + [h for _, h in SUMMARY]
    notes = [
        "mAP, head, medium and tail in % (mean AP over the classes of each group, classes without a positive test "
        "image excluded); var = variance of the per-class AP."
    ]
    if len({r.eval["ap_variant"] for r in runs}) > 1:
        notes.append('<span class="warn">The runs use different AP variants: their numbers are not comparable.</span>')
    if len({r.dataset for r in runs}) > 1:
        notes.append('<span class="warn">The runs are on different datasets.</span>')
    if any(r.eval.get("selected_on") == "test" for r in runs):
        notes.append('<span class="warn">Runs selected on the test split report optimistic numbers.</span>')
    body = _table(headers, rows, table_id="results-table")
    return (
        '<section id="results"><h2>Results</h2>'
        + body
        + "".join(f'<p class="note">{n}</p>' for n in notes)
        + ("</section>")
    )


def _published_section(dataset: str, runs: Sequence[RunResult]) -> str:
    merged: dict[tuple, dict] = {}  # the same numbers printed by both papers appear once, with both sources
    for row in load_published(dataset):
        key = (row["method"], row["total"], row["head"], row["medium"], row["tail"])
        if key in merged:
            merged[key]["sources"].append(row["source"])
            merged[key].update({k: row[k] for k in ("var", "group", "backbone") if merged[key][k] in (None, "")})
        else:
            merged[key] = {**row, "sources": [row["source"]]}
    rows = []
    for r in runs:
        if r.dataset == dataset:
            vals = "".join(_cell(r.eval[k], numeric=True) for k, _ in SUMMARY)
            what, where = f"{r.model} + {r.loss}", f"this run ({r.eval['ap_variant']} AP)"
            rows.append(f'<tr class="ours">{_cell(f"this run: {r.name}")}{vals}{_cell(what)}{_cell(where)}</tr>')
    for p in sorted(merged.values(), key=lambda p: -(p["total"] or 0)):
        vals = "".join(_cell(p[k], numeric=True) for k in ("total", "head", "medium", "tail", "var"))
        backbone = p["backbone"] if p["backbone"] and p["backbone"] != "not stated in table" else p["group"]
        short = ", ".join(src.split(" (")[0] for src in p["sources"])  # full citations in the note below
        rows.append(f'<tr data-method="{escape(p["method"])}">{_cell(p["method"])}{vals}'
                    f"{_cell(backbone or '-')}{_cell(short)}</tr>")  # fmt: skip
    sources = sorted({src for p in merged.values() for src in p["sources"]})
    name = PUBLISHED_DATASETS[dataset]
    headers = ["method", "mAP", "head", "medium", "tail", "var", "backbone / family", "source"]
    return (
        f'<section id="published-{dataset}"><h2>Published results on {escape(name)}</h2>'
        + _table(headers, rows, cls="published")
        + f'<p class="note">mAP (%) as printed in the papers, sorted by mAP. Sources: {escape("; ".join(sources))}. '
        "The published numbers use the authors' backbones and training recipes (often selected on the test "
        "set), so they place a run rather than rank it.</p></section>"
    )


def _class_sets(runs: Sequence[RunResult]) -> list[list[int]]:
    """Indices of the runs grouped by (class names, training counts): one set of plots per group."""
    groups: dict[tuple, list[int]] = {}
    for i, r in enumerate(runs):
        groups.setdefault((tuple(r.classnames), tuple(r.counts)), []).append(i)
    return list(groups.values())


def _per_class_section(runs: Sequence[RunResult], idx: list[int], several: bool) -> str:
    first = runs[idx[0]]
    tag = f" ({escape(first.dataset)}: {escape(', '.join(runs[i].name for i in idx))})" if several else ""
    series = []
    for i in idx:
        r, aps = runs[i], runs[i].eval["per_class_ap"]
        pts = [
            plots.Point(n, aps[c], r.eval["groups"].get(c), f"{r.name} | {c}: n_c={n}, AP {aps[c]:.2f}")
            for c, n in zip(r.classnames, r.counts, strict=True)
            if aps.get(c) is not None
        ]
        series.append(plots.Series(r.name, plots.run_color(i), pts, r.eval["map"]))
    ht, tt = first.head_threshold, first.tail_threshold
    scatter = plots.ap_vs_count(series, ht, tt)
    missing = sorted({c for i in idx for c, v in runs[i].eval["per_class_ap"].items() if v is None})
    notes = ["Marker shape = group (circle head, square medium, triangle tail); dashed line = the run's mAP; "
             "hover a marker for the class."]  # fmt: skip
    if missing:
        notes.append(f"No AP (no positive test image), not drawn: {escape(', '.join(missing))}.")
    if any(n == 0 for n in first.counts):
        notes.append("Classes without training images are drawn at n_c = 1.")
    groups = [runs[idx[0]].eval["groups"].get(c) for c in first.classnames]
    bars = plots.count_bars(first.classnames, first.counts, groups, ht, tt)
    bounds = ", ".join(
        f"{name} n_c {op} {t:g}" for name, op, t in (("head", "\u2265", ht), ("tail", "&lt;", tt)) if t is not None
    )
    order = sorted(range(len(first.classnames)), key=lambda k: (-first.counts[k], first.classnames[k]))
    rows = [
        f"<tr>{_cell(first.classnames[k])}<td class='n'>{first.counts[k]}</td>{_cell(groups[k] or '-')}"
        + "".join(_cell(runs[i].eval["per_class_ap"].get(first.classnames[k]), numeric=True) for i in idx)
        + "</tr>"
        for k in order
    ]
    table = _table(["class", "n_c", "group", *(f"AP {runs[i].name}" for i in idx)], rows, cls="per-class")
    return (
        f'<section class="per-class"><h2>Per-class AP against training images{tag}</h2>'
        f"<figure>{scatter}<figcaption>{' '.join(notes)}</figcaption></figure>"
        f"<h2>Class frequency{tag}</h2><figure>{bars}<figcaption>Training images per class, sorted; colour = group "
        f"({bounds}).</figcaption></figure>"
        f"<details><summary>Per-class AP table</summary>{table}</details></section>"
    )


def _loss_section(runs: Sequence[RunResult]) -> str:
    figures = [
        f"<figure>{plots.line_chart(r.losses, plots.run_color(i))}<figcaption>{escape(r.name)}: final loss "
        f"{r.losses[-1][1]:.4g} at step {r.losses[-1][0]:.0f}</figcaption></figure>"
        for i, r in enumerate(runs)
        if r.losses
    ]
    if not figures:
        return ""
    return f'<section id="loss"><h2>Training loss</h2><div class="grid">{"".join(figures)}</div></section>'


def render_report(runs: Sequence[RunResult], title: str | None = None) -> str:
    """The report page of ``runs`` as an HTML string (see the module docstring for its content)."""
    if not runs:
        raise ReportError("no run folder given")
    title = title or "cimlic results: " + ", ".join(dict.fromkeys(r.dataset for r in runs))
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    parts = [
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>',
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>',
        f"<body><main><h1>{escape(title)}</h1>",
        f'<p class="meta">{len(runs)} run(s): {escape(", ".join(str(r.path) for r in runs))}. '
        f"Generated by cimlic {escape(cimlic.__version__)} on {stamp}.</p>",
        _results_section(runs),
    ]
    parts += [_published_section(d, runs) for d in dict.fromkeys(r.dataset for r in runs) if d in PUBLISHED_DATASETS]
    sets = _class_sets(runs)
    parts += [_per_class_section(runs, idx, several=len(sets) > 1) for idx in sets]
    parts += [_loss_section(runs), "</main></body></html>\n"]
    return "".join(parts)


def write_report(run_dirs: Sequence[str | Path], out: str | Path, title: str | None = None) -> Path:
    """Write the HTML report of ``run_dirs`` to ``out`` (atomically: a temporary file, then a rename).

    Args:
        run_dirs: cimlic run folders (each with config.yaml, eval.json, best.json; metrics.jsonl optional).
        out: the HTML file to write (its folder is created).
        title: the page title; default "cimlic results: <datasets>".

    Returns:
        ``out`` as a Path.

    Raises:
        ReportError: no run folder, a missing or malformed file (named in the message), or ``out`` not writable.
    """
    runs = [read_run(d) for d in run_dirs]
    names = [r.name for r in runs]
    for r in runs:
        if names.count(r.name) > 1:  # two folders with one name: show their paths instead
            r.name = str(r.path)
    page = render_report(runs, title)
    out = Path(out)
    try:
        atomic_write_files([(out, page.encode("utf-8"))])
    except OSError as err:
        raise ReportError(f"{out}: cannot write the report ({_one_line(err)})") from None
    logger.info("report of %d run(s) written to %s", len(runs), out)
    return out
