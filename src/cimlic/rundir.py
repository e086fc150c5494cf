"""Run folders: may a run start or resume here, the metrics.jsonl log, log.txt.

Nothing the user had is overwritten: a non-empty folder is only used to resume a run, and only when its saved
config matches the current one outside the keys a resume may change.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

from cimlic.distributed import all_gather_objects, rank
from cimlic.errors import CimlicError
from cimlic.io import (
    WriteError,
    append_text,
    atomic_write_files,
    clean_stale_temps,
    ensure_dir,
    jsonable,
    process_alive,
    read_yaml,
)

logger = logging.getLogger(__name__)


class RunDirError(CimlicError, ValueError):
    """A run folder cannot be used as asked (it would overwrite a run, or there is nothing to resume)."""


LOCK_FILE = ".lock"  # in a run folder while a command uses it (see run_lock)


@contextlib.contextmanager
def run_lock(run_dir: str | os.PathLike, command: str, required: bool = True) -> Iterator[None]:
    """Hold ``run_dir``'s lock for the block: a second command on the same run folder is refused meanwhile.

    The lock is the file ``.lock`` with the owner's pid, host and command, created atomically (O_EXCL). A lock whose
    process is gone (on this host) is stale and taken over, with a warning. Under torch.distributed rank 0 holds it
    and every rank gets the same answer (a collective: every rank must enter). ``required=False`` (a command that
    only reads, like ``eval``) goes on without the lock where the folder cannot be written at all.

    Raises:
        RunDirError: the folder is in use by another live process.
        WriteError: the lock cannot be created (a read-only folder, a full disk) and ``required``.
    """
    run_dir = Path(run_dir)
    held, problem, created = False, None, not run_dir.exists()
    if rank() == 0:
        try:
            held = _acquire(run_dir, command)
        except RunDirError as err:
            problem = str(err)
        except WriteError as err:
            if required:
                problem = str(err)
            else:
                logger.warning("%s; going on without the lock (nothing can be written there)", err)
    problems = [p for p in all_gather_objects(problem) if p]
    if problems:
        raise RunDirError(problems[0])
    try:
        yield
    finally:
        if held:
            (run_dir / LOCK_FILE).unlink(missing_ok=True)
            if created and not any(run_dir.iterdir()):
                run_dir.rmdir()  # a command that failed before writing anything leaves no empty folder behind


def _acquire(run_dir: Path, command: str) -> bool:
    ensure_dir(run_dir)
    path = run_dir / LOCK_FILE
    me = {"pid": os.getpid(), "host": socket.gethostname(), "command": command, "since": time.strftime("%c")}
    for _ in range(3):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner is None:
                continue  # released meanwhile, or unreadable and removed: try again
            pid, host = owner.get("pid"), owner.get("host")
            if host != me["host"] or (isinstance(pid, int) and process_alive(pid)):
                raise RunDirError(
                    f"{run_dir}: in use by process {pid} on {host} ({owner.get('command')}, since "
                    f"{owner.get('since')}); wait for it, or remove {path} if that process is gone"
                ) from None
            logger.warning("%s: taking over the lock of process %s, which is gone", run_dir, pid)
            path.unlink(missing_ok=True)
            continue
        except OSError as err:
            raise WriteError(f"{path}: cannot create the run folder's lock ({err.strerror or err})") from None
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                fh.write(json.dumps(me) + "\n")
        except OSError as err:
            path.unlink(missing_ok=True)
            raise WriteError(f"{path}: cannot write the run folder's lock ({err.strerror or err})") from None
        return True
    raise RunDirError(f"{run_dir}: could not take the lock {path}; is another command starting on this folder?")


def _lock_owner(path: Path) -> dict | None:
    """The owner record of a lock file; None when it is gone (a malformed one is removed as stale)."""
    try:
        owner = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError):
        owner = None
    if not isinstance(owner, dict):
        path.unlink(missing_ok=True)
        return None
    return owner


def run_dir_entries(run_dir: str | os.PathLike, resume: bool) -> list[str]:
    """The names in ``run_dir`` (none when it does not exist) after checking that a run may start or resume there.

    Raises:
        RunDirError: ``run_dir`` is a file; or it is not empty and ``resume`` is False (nothing is ever overwritten).
    """
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: exists and is not a folder")
    clean_stale_temps(run_dir)  # left by an interrupted write (the lock makes the folder ours)
    entries = sorted(p.name for p in run_dir.iterdir() if p.name != LOCK_FILE) if run_dir.is_dir() else []
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
    append_text(path, json.dumps(record, default=jsonable) + "\n")


class _LogFile(logging.FileHandler):
    """log.txt: a record that cannot be written (full disk) is dropped without a traceback on stderr; the run's
    next checkpoint write then fails with a one-line error naming the file."""

    def handleError(self, record: logging.LogRecord) -> None:  # noqa: N802 (logging.Handler API)
        self.failed = True


@contextlib.contextmanager
def log_to_file(path: str | os.PathLike) -> Iterator[None]:
    """Copy the ``cimlic`` logger's records (INFO and above) to ``path`` while the context is open."""
    pkg = logging.getLogger("cimlic")
    ensure_dir(Path(path).parent)
    try:
        handler = _LogFile(path, encoding="utf-8")
    except OSError as err:
        raise WriteError(f"{path}: cannot write ({err.strerror or err})") from None
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


class ScalarLog:
    """Where a run's scalars go (``train.log``): ``metrics.jsonl`` always, and with ``tensorboard`` the same scalars
    through TensorBoard's writer into ``<run>/tensorboard`` (tags ``train/<key>`` for the logged steps and epoch
    counters, ``<split>/<key>`` for evaluations, at the optimiser step).

    Args:
        run_dir: the run folder.
        sinks: ``train.log``; ``tensorboard`` needs the ``tensorboard`` package (``pip install 'cimlic[tensorboard]'``).

    Attributes:
        purge_step: set when a run resumes (the step after its ``state.pt``): TensorBoard then drops the events an
            interrupted run had written at or after it, as ``metrics.jsonl`` is trimmed to the steps up to state.pt.
    """

    def __init__(self, run_dir: str | os.PathLike, sinks: Sequence[str] = ("jsonl",)) -> None:
        self.path, self.purge_step = Path(run_dir) / "metrics.jsonl", None
        self.tensorboard, self._writer = "tensorboard" in sinks, None
        if self.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: F401 (needs the tensorboard package)
            except ImportError:
                raise RunDirError("train.log lists tensorboard, but the tensorboard package is not installed: "
                                  "pip install 'cimlic[tensorboard]'") from None  # fmt: skip

    def write(self, record: dict) -> None:
        """Append ``record`` (``step``, ``epoch``, optional ``split``, numbers) to every sink."""
        append_jsonl(self.path, record)
        if not self.tensorboard:
            return
        if self._writer is None:
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(str(self.path.parent / "tensorboard"), purge_step=self.purge_step)
        prefix = record.get("split", "train")
        for key, value in record.items():
            if key not in ("step", "split") and isinstance(value, int | float) and not isinstance(value, bool):
                self._writer.add_scalar(f"{prefix}/{key}", value, global_step=int(record["step"]))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
