"""The HTML report: real tiny run folders (trained through main(argv)), published tables, errors, headless Chromium."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import struct
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
import yaml

from cimlic.apps import plots
from cimlic.apps.cli import main
from cimlic.apps.report import ReportError, load_published, read_run, write_report
from glyphs import build_world

LOSSES = ("asl", "bce")
EXTERNAL = re.compile(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//""", re.IGNORECASE)


def _config(path: Path, world: Path, loss: str) -> Path:
    cfg = {
        "name": f"tiny_{loss}",
        "data": {"classes": str(world / "classes.txt"), "train_labels": str(world / "train.txt"),
                 "test_labels": str(world / "test.txt"), "image_root": str(world / "images"),
                 "image_pattern": "{id}.png", "head_threshold": 10, "tail_threshold": 3},
        "model": {"name": "coop", "clip_arch": "cimlic-tiny-vit", "random_init": True, "n_ctx": 4},
        "train": {"epochs": 2, "batch_size": 16, "num_workers": 0, "lr": 0.01, "log_every": 1,
                  "cache_dir": str(path.parent / "cache")},
        "loss": {"name": loss},
    }  # fmt: skip
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """Two real run folders (coop on the tiny random-init CLIP), one per loss."""
    root = tmp_path_factory.mktemp("report")
    build_world(root / "world", n_pool=300, n_test=60, n_max=90, seed=0)
    out = {}
    for loss in LOSSES:
        run = root / f"run_{loss}"
        assert main(["train", "--config", str(_config(root / f"{loss}.yaml", root / "world", loss)),
                     "--run-dir", str(run)]) == 0  # fmt: skip
        out[loss] = run
    return out


def _copy_run(run: Path, dest: Path, dataset: str | None = None) -> Path:
    shutil.copytree(run, dest)
    if dataset is not None:
        cfg = yaml.safe_load((dest / "config.yaml").read_text())
        cfg["data"]["name"] = dataset
        (dest / "config.yaml").write_text(yaml.safe_dump(cfg))
    return dest


class _TableRows(HTMLParser):
    """The cell texts of every body row of the tables with a given id or class."""

    def __init__(self, selector: str) -> None:
        super().__init__()
        self.selector, self.depth, self.rows, self._cell = selector, 0, [], None

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "table":
            hit = a.get("id") == self.selector or self.selector in (a.get("class") or "").split()
            self.depth = self.depth + 1 if (self.depth or hit) else 0
        elif self.depth and tag == "tr":
            self.rows.append([])
        elif self.depth and tag in ("td", "th"):
            self._cell = []

    def handle_endtag(self, tag):
        if tag == "table" and self.depth:
            self.depth -= 1
        elif self.depth and tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)


def table_rows(page: str, selector: str) -> list[list[str]]:
    parser = _TableRows(selector)
    parser.feed(page)
    return [r for r in parser.rows if r and not any(h in ("run", "method", "class") for h in r[:1])]


def expected_row(run: Path) -> list[str]:
    ev = json.loads((run / "eval.json").read_text())
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    nums = ["-" if ev[k] is None else f"{ev[k]:.2f}" for k in ("map", "head", "medium", "tail", "var")]
    meta = [cfg["data"]["name"], cfg["model"]["name"], cfg["loss"]["name"], ev["ap_variant"], ev["selected_on"]]
    return [run.name, *meta, ev["split"], *nums]


def test_report_page(runs, tmp_path):
    out = write_report([runs["asl"], runs["bce"]], tmp_path / "sub" / "report.html", title="two <losses>")
    page = out.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html>") and "<title>two &lt;losses&gt;</title>" in page
    assert "(head n_c \u2265 10, tail n_c &lt; 3)" in page
    assert table_rows(page, "results-table") == [expected_row(runs["asl"]), expected_row(runs["bce"])]
    assert page.count("<svg") == 4  # scatter, histogram, two loss curves
    assert not EXTERNAL.search(page) and "http://" not in page and "https://" not in page
    assert not re.search(r"<(script|link|img|iframe)\b", page)
    assert "Published results" not in page  # data.name is custom: nothing to compare with
    run = read_run(runs["asl"])
    assert len(run.losses) >= 2 and all(s > 0 for s, _ in run.losses)  # both epochs' training lines
    per_class = table_rows(page, "per-class")
    assert sorted(r[0] for r in per_class) == sorted(run.classnames)
    counts = [int(r[1]) for r in per_class]
    assert counts == sorted(counts, reverse=True)  # sorted by training count, like the histogram
    for name, n, group, *aps in per_class:
        assert group == run.eval["groups"][name] and int(n) == run.counts[run.classnames.index(name)]
        assert aps == [f"{read_run(r).eval['per_class_ap'][name]:.2f}" for r in runs.values()]
    groups = set(run.eval["groups"].values())
    assert len(groups) >= 2, "the test thresholds should give several groups"
    for group in groups:  # each group's marker shape appears with a class tooltip
        shape = {"head": "<circle", "medium": "<rect", "tail": "<polygon"}[group]
        name = next(c for c, g in run.eval["groups"].items() if g == group and run.eval["per_class_ap"][c] is not None)
        assert re.search(rf"{shape}[^>]*><title>run_asl \| {name}: n_c=", page), group
    assert not [p for p in out.parent.iterdir() if p.name != "report.html"]  # no temporary file left


def test_published_numbers_beside_voc_lt_run(runs, tmp_path):
    voc = _copy_run(runs["asl"], tmp_path / "voc_run", dataset="voc_lt")
    page = write_report([voc, runs["bce"]], tmp_path / "r.html").read_text()
    assert "Published results on VOC-LT" in page and "COCO-LT" not in page
    rows = {r[0]: r for r in table_rows(page, "published")}
    assert rows["HP-DVAL"][1:6] == ["93.06", "86.36", "92.83", "98.58", "44.37"]
    assert rows["LMPT"][1:5] == ["87.88", "72.10", "89.26", "98.49"]
    assert rows["CPRFL-CLIP"][1:6] == ["86.28", "81.84", "90.51", "86.43", "-"]
    assert rows["HP-DVAL"][-1] == "HP-DVAL" and rows["CPRFL-CLIP"][-1] == "CPRFL"
    assert rows["ERM"][-3:] == ["51.72", "non-CLIP", "CPRFL, HP-DVAL"]  # the same numbers, printed by both papers
    assert "CPRFL (ACM MM 2024), Table 1; HP-DVAL (IEEE TIP 2025), Table I" in page
    ours = rows[f"this run: {voc.name}"]
    assert ours[1] == expected_row(voc)[7] and ours[1] != "-"
    assert "this run: run_bce" not in rows  # the custom-data run is not placed among VOC-LT numbers
    assert "different datasets" in page


def test_load_published():
    voc, coco = load_published("voc_lt"), load_published("coco_lt")
    hp = next(r for r in voc if r["method"] == "HP-DVAL")
    assert (hp["total"], hp["head"], hp["medium"], hp["tail"], hp["var"]) == (93.06, 86.36, 92.83, 98.58, 44.37)
    cp = next(r for r in coco if r["method"] == "CPRFL-CLIP")
    assert (cp["total"], cp["head"], cp["medium"], cp["tail"], cp["var"]) == (66.69, 66.35, 70.99, 61.33, None)
    assert cp["source"] == "CPRFL (ACM MM 2024), Table 1"
    assert len(voc) == len(coco) == 21 + 17 and load_published("digits") == []


def test_published_tables_match_shared_transcription(shared_data):
    """Every shipped number equals the transcription in ../shared/data/published."""
    files = {"hpdval_tip2025_table1_longtail.csv": "HP-DVAL", "cprfl_mm2024_table1_longtail.csv": "CPRFL"}
    for name, paper in files.items():
        rows = list(csv.DictReader((shared_data / "published" / name).open()))
        for dataset, p in (("voc_lt", "voc"), ("coco_lt", "coco")):
            shipped = [r for r in load_published(dataset) if r["source"].startswith(paper)]
            assert len(shipped) == len(rows)
            for got, want in zip(shipped, rows, strict=True):
                assert want["method"].startswith(got["method"])
                for k in ("total", "head", "medium", "tail", "var"):
                    ref = want.get(f"{p}_{k}")
                    assert got[k] == (float(ref) if ref else None), (name, got["method"], k)


def _break(run: Path, case: str) -> str:
    """Damage one file of ``run``; return the file name the error must name."""
    if case == "missing eval":
        (run / "eval.json").unlink()
        return "eval.json"
    if case == "truncated eval":
        (run / "eval.json").write_text((run / "eval.json").read_text()[:50])
        return "eval.json"
    if case == "eval without per_class_ap":
        ev = json.loads((run / "eval.json").read_text())
        del ev["per_class_ap"]
        (run / "eval.json").write_text(json.dumps(ev))
        return "eval.json"
    if case == "missing best.json":
        (run / "best.json").unlink()
        return "best.json"
    if case == "bad config":
        (run / "config.yaml").write_text("data: [unclosed\n  model: x\n")
        return "config.yaml"
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"step": 2, "lo\n{"step": 3, "loss": 0.5}\n')
    return "metrics.jsonl"


@pytest.mark.parametrize(
    "case",
    ["missing eval", "truncated eval", "eval without per_class_ap", "missing best.json", "bad config", "bad jsonl"],
)
def test_errors_name_the_file(runs, tmp_path, case):
    run = _copy_run(runs["asl"], tmp_path / "broken")
    name = _break(run, case)
    out = tmp_path / "report.html"
    out.write_text("old report")
    with pytest.raises(ReportError) as info:
        write_report([runs["bce"], run], out)
    message = str(info.value)
    assert str(run / name) in message and "\n" not in message
    assert out.read_text() == "old report"  # nothing written when a run cannot be read


def test_errors_and_tolerated_input(runs, tmp_path):
    with pytest.raises(ReportError, match="no run folder"):
        write_report([], tmp_path / "r.html")
    with pytest.raises(ReportError, match="not a run folder"):
        write_report([tmp_path / "nowhere"], tmp_path / "r.html")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ReportError, match="taken: cannot write the report"):
        write_report([runs["asl"]], tmp_path / "taken")
    run = _copy_run(runs["asl"], tmp_path / "torn")
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"step": 99, "lo')  # a run still writing its log: the torn last line is skipped
    (run / "eval.json").write_text(
        json.dumps({**json.loads((run / "eval.json").read_text()), "head": None, "selected_on": "test"})
    )
    page = write_report([run], tmp_path / "r.html").read_text()
    assert table_rows(page, "results-table")[0][8] == "-" and "optimistic" in page
    assert read_run(run).losses == read_run(runs["asl"]).losses


def test_plot_helpers():
    assert plots.nice_ticks(0, 100) == [0, 20, 40, 60, 80, 100]
    assert plots.nice_ticks(0.31, 0.74, 4) == [0.2, 0.4, 0.6, 0.8]
    assert plots.nice_ticks(5, 5)[0] <= 5 <= plots.nice_ticks(5, 5)[-1]
    pts = [plots.Point(0, 50.0, "tail", "a<b"), plots.Point(1000, 90.0, "head", "c")]
    svg = plots.ap_vs_count([plots.Series("run & co", "#123456", pts, 70.0)], 100, 20)
    assert svg.startswith("<svg") and "a&lt;b" in svg and "run &amp; co" in svg and "a<b" not in svg
    assert "<polygon" in svg and "<circle" in svg and ">1000<" in svg  # decades labelled up to 10^3
    bars = plots.count_bars(["x" * 30, "y"], [3, 40], ["tail", "medium"], 100, 20)
    assert bars.count("<title>") == 2 and "x" * 17 + "\u2026" in bars and "tail: n_c &lt; 20" in bars
    assert plots.line_chart([(1, 2.0)], "#000").count("<circle") == 1  # a single logged step still shows


# ------------------------------------------------------------------------------------ headless Chromium
CHROMIUM = Path("/usr/bin/chromium")
INSTALL_KEY = "cimlic/chromium_install_failed"


def _install_chromium() -> str | None:
    """Try ``apt-get install -y chromium`` once; return None on success, else why it could not be installed."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return "not running as root"
    if shutil.which("apt-get") is None:
        return "apt-get is not available"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        proc = subprocess.run(["apt-get", "install", "-y", "chromium"], capture_output=True, text=True, env=env,
                              timeout=900)  # fmt: skip
    except subprocess.TimeoutExpired:
        return "apt-get install -y chromium timed out"
    if proc.returncode != 0 or not CHROMIUM.is_file():
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return f"apt-get install -y chromium failed (exit {proc.returncode}): {tail}"
    return None


@pytest.fixture(scope="session")
def chromium(pytestconfig) -> Path:
    """Debian's chromium, installed with apt-get when missing (tried once; a failure is cached by pytest)."""
    if CHROMIUM.is_file():
        return CHROMIUM
    cache = getattr(pytestconfig, "cache", None)
    failed = cache.get(INSTALL_KEY, None) if cache is not None else None
    if failed:
        pytest.skip(f"{CHROMIUM} missing; an earlier install attempt failed ({failed}); retry with --cache-clear")
    failed = _install_chromium()
    if failed:
        if cache is not None:
            cache.set(INSTALL_KEY, failed)
        pytest.skip(f"{CHROMIUM} missing and not installable here: {failed}")
    return CHROMIUM


def _headless(chromium: Path, profile: Path, *args: str) -> subprocess.CompletedProcess:
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}"]  # fmt: skip
    try:
        proc = subprocess.run([str(chromium), *flags, *args], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"headless chromium did not finish within 30 s: {args}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.mark.slow
def test_page_renders_in_headless_chromium(chromium, runs, tmp_path):
    from PIL import Image

    voc = _copy_run(runs["bce"], tmp_path / "voc_run", dataset="voc_lt")
    out = write_report([runs["asl"], voc], tmp_path / "report.html")
    dom = _headless(chromium, tmp_path / "profile1", "--dump-dom", out.as_uri()).stdout
    assert table_rows(dom, "results-table") == [expected_row(runs["asl"]), expected_row(voc)]
    assert "HP-DVAL" in {r[0] for r in table_rows(dom, "published")}
    assert dom.count("<svg") == 4
    png = tmp_path / "page.png"
    _headless(chromium, tmp_path / "profile2", f"--screenshot={png}", "--window-size=1200,1600", "--hide-scrollbars",
              out.as_uri())  # fmt: skip
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 30_000
    assert struct.unpack(">II", data[16:24]) == (1200, 1600)
    with Image.open(png) as image:
        colours = image.convert("RGB").getcolors(maxcolors=1 << 20)
    assert colours is not None and len(colours) > 50  # text, table shading, coloured markers: not a blank page
