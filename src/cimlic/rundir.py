"""Run folders: may a run start or resume here, the metrics.jsonl log, log.txt.

Nothing the user had is overwritten: a non-empty folder is only used to resume a run, and only when its saved
config matches the current one outside the keys a resume may change.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cimlic.errors import CimlicError
from cimlic.io import atomic_write_files, jsonable, read_yaml

logger = logging.getLogger(__name__)


class RunDirError(CimlicError, ValueError):
    """A run folder cannot be used as asked (it would overwrite a run, or there is nothing to resume)."""


def run_dir_entries(run_dir: str | os.PathLike, resume: bool) -> list[str]:
    """The names in ``run_dir`` (none when it does not exist) after checking that a run may start or resume there.

    Raises:
        RunDirError: ``run_dir`` is a file; or it is not empty and ``resume`` is False (nothing is ever overwritten).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a folder")
    entries = sorted(p.name for p in run_dir.iterdir()) if run_dir.is_dir() else []
    if not resume and entries:
        raise RunDirError(
            f"{run_dir}: run folder is not empty ({', '.join(entries[:4])}{', ...' if len(entries) > 4 else ''}); "
            "resume it (--resume) or choose another run name"
        )
    return entries


def check_run_dir(run_dir: str | os.PathLike, resume: bool) -> bool:
    """Check that a run may start in ``run_dir``; return True when it holds a ``state.pt`` to resume from.

    Raises:
        RunDirError: see :func:`run_dir_entries`; or ``resume`` is True and the folder holds files but no
            ``config.yaml`` (not a run folder).
    """
    run_dir = Path(run_dir)
    entries = run_dir_entries(run_dir, resume)
    if resume and entries and "config.yaml" not in entries:
        raise RunDirError(f"{run_dir}: cannot resume, no config.yaml (not a cimlic run folder)")
    has_state = (run_dir / "state.pt").is_file()
    if resume and not has_state:
        logger.warning("%s: no state.pt to resume from; starting from the beginning", run_dir)
    return has_state


def trim_jsonl(path: str | os.PathLike, max_step: int) -> None:
    """Keep the lines of a JSONL log whose ``step`` is <= ``max_step`` (drops a torn last line too)."""
    path = Path(path)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= max_step:
            kept.append(line)
    atomic_write_files([(path, "".join(f"{line}\n" for line in kept).encode("utf-8"))])


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        out.update(_flatten(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def check_resume_config(
    path: str | os.PathLike,
    current: dict,
    allowed: Sequence[str] = (),
    normalise: Callable[[dict], dict] | None = None,
) -> None:
    """Refuse to resume a run whose saved config (``path``) differs from ``current`` outside ``allowed`` keys.

    ``normalise`` brings the saved config to the current layout first (keys that moved, fields added since).

    Raises:
        RunDirError: keys (dotted) other than ``allowed`` changed.
    """
    saved = read_yaml(path, RunDirError, "run config") or {}
    if normalise is not None and isinstance(saved, dict):
        try:
            saved = normalise(saved)
        except CimlicError as err:
            raise RunDirError(f"{path}: cannot read the run's config ({err})") from None
    old, new = _flatten(saved), _flatten(current)
    changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    blocked = [k for k in changed if k not in allowed]
    if blocked:
        raise RunDirError(f"{path}: cannot resume with a different config; changed: {blocked[:5]}")
    if changed:
        logger.warning("resuming with changed %s", changed)


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append one JSON line to ``path``."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(record, default=jsonable) + "\n")


@contextlib.contextmanager
def log_to_file(path: str | os.PathLike) -> Iterator[None]:
    """Copy the ``cimlic`` logger's records (INFO and above) to ``path`` while the context is open."""
    pkg = logging.getLogger("cimlic")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    handler.setLevel(logging.INFO)
    old_level = pkg.level
    if pkg.getEffectiveLevel() > logging.INFO:
        pkg.setLevel(logging.INFO)
    pkg.addHandler(handler)
    try:
        yield
    finally:
        pkg.removeHandler(handler)
        handler.close()
        pkg.setLevel(old_level)
