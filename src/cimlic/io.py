"""File I/O shared by every module: atomic writes, JSON / YAML readers, weight files, state-dict fitting.

Every write goes to a temporary file in the target's folder, is flushed to disk and renamed over the target
(``os.replace``), so a reader sees the old file or the new one, never half of one; a failed write leaves no
temporary file behind.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import re
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from cimlic.errors import CimlicError


# ------------------------------------------------------------------------------------------ writes
class WriteError(CimlicError, OSError):
    """A file or folder could not be written (full disk, read-only file system, no permission, a file in the way)."""


def _reason(err: BaseException) -> str:
    if isinstance(err, OSError) and err.strerror:
        return err.strerror
    return f"{type(err).__name__}: {_first_line(err)}"


def _write_failure(err: BaseException, folder: Path) -> str | None:
    """Why a file writer failed when the file system is the cause (full, read-only, ...), else None (a bug).

    torch.save and safetensors raise their own errors for a full disk; the operating system's error is then in the
    exception chain, or the file system itself says it is full or read-only.
    """
    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, OSError):
            return _reason(seen)
        seen = seen.__cause__ or seen.__context__
    try:
        st = os.statvfs(folder)
    except OSError:
        return None
    if st.f_flag & os.ST_RDONLY:
        return os.strerror(errno.EROFS)
    if st.f_bavail * st.f_frsize < 1 << 20:  # under 1 MiB left: the writer ran out of space
        return os.strerror(errno.ENOSPC)
    return None


def ensure_dir(path: str | os.PathLike) -> Path:
    """Create ``path`` (and its parents) if needed; WriteError naming it when that is impossible."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(f"{path}: cannot create the folder ({_reason(err)})") from None
    return path


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


TEMP_SUFFIX = ".tmp"


@contextlib.contextmanager
def _temp_beside(path: Path) -> Iterator[Path]:
    """A temporary file beside ``path`` (its name carries this process's id); removed unless renamed away."""
    ensure_dir(path.parent)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.pid{os.getpid()}.", suffix=TEMP_SUFFIX)
    except OSError as err:
        raise WriteError(f"{path}: cannot write ({_reason(err)})") from None
    os.close(fd)
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)  # gone after a successful rename; removed after a failure


def _finish(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block succeeds, else removed.

    For writers that want a file name (``safetensors.save_file``, ``torch.save``): nothing is held in memory twice.
    A failure of the file system (full disk, read-only, ...) becomes a :class:`WriteError` naming ``path``; the old
    ``path``, if any, is untouched.
    """
    path = Path(path)
    with _temp_beside(path) as tmp:
        try:
            yield tmp
            _finish(tmp, path)
            os.replace(tmp, path)
        except Exception as err:
            reason = None if isinstance(err, WriteError) else _write_failure(err, path.parent)
            if reason is None:
                raise
            raise WriteError(f"{path}: cannot write ({reason})") from None


def atomic_write_files(items: Sequence[tuple[str | os.PathLike, bytes]]) -> None:
    """Write every (path, bytes) pair: all temporary files first, then the renames (none if a write fails)."""
    with contextlib.ExitStack() as stack:
        temps = []
        for path, data in items:
            path = Path(path)
            tmp = stack.enter_context(_temp_beside(path))
            try:
                tmp.write_bytes(data)
                _finish(tmp, path)
            except OSError as err:
                raise WriteError(f"{path}: cannot write ({_reason(err)})") from None
            temps.append((tmp, path))
        for tmp, path in temps:
            try:
                os.replace(tmp, path)
            except OSError as err:
                raise WriteError(f"{path}: cannot write ({_reason(err)})") from None


def append_text(path: str | os.PathLike, text: str) -> None:
    """Append UTF-8 ``text`` to ``path`` (a log; not atomic by nature); WriteError naming it on failure."""
    path = Path(path)
    try:
        with open(path, "a", encoding="utf-8") as fh:
            fh.write(text)
    except OSError as err:
        raise WriteError(f"{path}: cannot write ({_reason(err)})") from None


OUTPUT_MARKER = ".cimlic-output.json"  # in every data folder a cimlic command writes (see claim_output_folder)


def claim_output_folder(folder: str | os.PathLike, command: str) -> Path:
    """Make ``folder`` the output folder of ``command``: it must be new, empty or an earlier output of the same
    command (its first two words: ``cimlic prepare``, ``cimlic import``, ``cimlic export``, ...).

    A folder holding files cimlic did not write (a user's own ``train.txt``, ...) is refused, so nothing the user
    had is overwritten, and so is another command's output (an export into an imported data folder would replace its
    ``classes.txt``); the marker file ``.cimlic-output.json`` says whose folder it is from then on. Left-over
    temporary files of interrupted writes are removed.

    Raises:
        WriteError: the folder holds other files, or another command's output, or cannot be created.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise WriteError(f"{folder}: exists and is not a folder")
    marker = folder / OUTPUT_MARKER
    if folder.is_dir() and not marker.is_file():
        entries = sorted(p.name for p in folder.iterdir())
        if entries:
            raise WriteError(
                f"{folder}: the folder holds files cimlic did not write ({', '.join(entries[:4])}"
                f"{', ...' if len(entries) > 4 else ''}); choose a new or empty folder"
            )
    if marker.is_file():
        owner = read_json(marker, WriteError, "output marker")
        owner = owner.get("command", "") if isinstance(owner, dict) else ""
        if owner.split()[:2] != command.split()[:2]:
            raise WriteError(f"{folder}: the folder holds the output of `{owner or '?'}`, not of `{command}`; "
                             "choose a new or empty folder")  # fmt: skip
    ensure_dir(folder)
    clean_stale_temps(folder)
    write_json(marker, {"command": command})
    return folder


def clean_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of interrupted writes in ``folder``: those of processes no longer running.

    A temporary file is ``.<name>.pid<N>.<random>.tmp`` (see :func:`atomic_path`); one of a live process (a
    concurrent write) is left alone. Temporary files of the earlier naming (no pid) go when older than an hour.
    Returns the files removed.
    """
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for tmp in folder.glob(f".*{TEMP_SUFFIX}"):
        match = re.search(r"\.pid(\d+)\.", tmp.name)
        try:
            stale = not process_alive(int(match.group(1))) if match else time.time() - tmp.stat().st_mtime > 3600
            if stale:
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            continue  # gone already, or not ours to remove
    return removed


def process_alive(pid: int) -> bool:
    """True when a process with this id runs on this machine (or exists but belongs to another user)."""
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    atomic_write_files([(path, data)])


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_files([(path, text.encode("utf-8"))])


def jsonable(x: Any) -> Any:
    """``json.dumps`` default: tensors and arrays as lists, numpy scalars as numbers, paths as text."""
    if isinstance(x, Tensor | np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, Path):
        return str(x)
    raise TypeError(f"cannot write {type(x).__name__} to JSON")


def json_bytes(obj: Any, indent: int | None = 2) -> bytes:
    """UTF-8 JSON of ``obj`` and a newline (numpy values and tensors become numbers and lists)."""
    return (json.dumps(obj, indent=indent, default=jsonable) + "\n").encode("utf-8")


def write_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> None:
    """Write ``obj`` as JSON atomically (``indent=None``: one line)."""
    atomic_write_files([(path, json_bytes(obj, indent))])


def save_safetensors(path: str | os.PathLike, tensors: Mapping[str, Tensor], metadata: dict | None = None) -> None:
    """Write ``tensors`` to a ``.safetensors`` file atomically (straight to the temporary file, no extra copy)."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def save_torch(path: str | os.PathLike, obj: Any) -> None:
    """``torch.save`` ``obj`` atomically (streamed to the temporary file; keep it weights_only-loadable)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as fh:  # a Python file: a full disk raises OSError in the chain
        torch.save(obj, fh)


# ------------------------------------------------------------------------------------------- reads
def read_text(path: str | os.PathLike, error: type[Exception] = CimlicError, what: str = "file") -> str:
    """UTF-8 text of ``path`` (a leading byte-order mark is dropped); ``error`` names the file and the problem."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise error(f"{path}: {what} not found") from None
    except UnicodeDecodeError as err:
        raise error(
            f"{path}: {what} is not UTF-8 text (byte {err.object[err.start]:#04x} at offset {err.start}); "
            "save it as UTF-8"
        ) from None
    except OSError as err:
        raise error(f"{path}: cannot read {what} ({err.strerror or type(err).__name__})") from None


def read_json(path: str | os.PathLike, error: type[Exception] = CimlicError, what: str = "JSON file") -> Any:
    """Parsed JSON of ``path``; ``error`` (one line naming the file) when it is missing, not UTF-8 or malformed."""
    text = read_text(path, error, what)
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise error(f"{path}: malformed JSON in this {what} ({_first_line(err)})") from None


def read_yaml(path: str | os.PathLike, error: type[Exception] = CimlicError, what: str = "YAML file") -> Any:
    """Parsed YAML of ``path``; ``error`` (one line naming the file) when it is missing, not UTF-8 or malformed."""
    text = read_text(path, error, what)
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        raise error(f"{path}: malformed YAML in this {what} ({_yaml_problem(err)})") from None


def _yaml_problem(err: yaml.YAMLError) -> str:
    """'line L, column C: <problem>' of a YAML error (1-based, where the parser stopped), else its first line."""
    mark, problem = getattr(err, "problem_mark", None), getattr(err, "problem", None)
    if mark is None or not problem:
        return f"{type(err).__name__}: {_first_line(err)}"
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return text[0] if text else ""


def load_tensor_file(path: str | os.PathLike, error: type[Exception] = CimlicError, what: str = "weights file") -> Any:
    """The object in a local weights file, read without running code from it.

    ``.safetensors`` files, or anything ``torch.load(weights_only=True)`` accepts (``.pt``, ``.pth``, ``.bin``):
    a file holding a pickle that is not plain tensors is refused, never unpickled.

    Raises:
        error: the file is missing, unreadable or refused (one line naming it).
    """
    path = Path(path)
    if not path.is_file():
        raise error(f"{path}: {what} not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "global" in str(err).lower():  # weights_only refused a pickled object that is not a plain tensor
            raise error(f"{path}: not a plain tensor file (it holds other pickled Python objects): refused, not "
                        "unpickled") from None  # fmt: skip
        raise error(f"{path}: not a readable {what} (damaged, or not a file of tensors)") from None
    except Exception as err:  # corrupt zip, truncated file, ...
        raise error(f"{path}: not a readable {what} ({type(err).__name__}: {_first_line(err)})") from None


def to_state_dict(
    obj: Any, path: str | os.PathLike, error: type[Exception] = CimlicError, wrappers: Sequence[str] = ("state_dict",)
) -> tuple[dict[str, Tensor], bool]:
    """(state dict, whether it was wrapped) of a loaded weights object; DataParallel's ``module.`` prefix removed.

    ``wrappers``: keys of training-checkpoint dicts that hold the state dict (``{"state_dict": ...}``).
    """
    wrapped = False
    for key in wrappers:
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj, wrapped = obj[key], True
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, Tensor) for v in obj.values()):
        raise error(f"{path}: not a state dict of tensors (got {type(obj).__name__})")
    return {k.removeprefix("module."): v for k, v in obj.items()}, wrapped


def read_state_dict(path: str | os.PathLike, error: type[Exception] = CimlicError, what: str = "weights file") -> dict:
    """A state dict of tensors from a local file (:func:`load_tensor_file`, then :func:`to_state_dict`)."""
    return to_state_dict(load_tensor_file(path, error, what), path, error, ("state_dict", "model"))[0]


def state_dict_mismatch(expected: Mapping[str, Tensor], given: Mapping[str, Tensor]) -> list[str]:
    """What keeps ``given`` from loading strictly where ``expected`` lives: missing / unexpected keys, shapes.

    Returns:
        Human-readable parts (empty when the two fit), e.g. ``["2 missing key(s), first ['a', 'b']"]``.
    """
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    shapes = [k for k in expected if k in given and tuple(given[k].shape) != tuple(expected[k].shape)]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing key(s), first {missing[:3]}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s), first {unexpected[:3]}")
    if shapes:
        k = shapes[0]
        first = f"{k}: {tuple(given[k].shape)} vs {tuple(expected[k].shape)}"
        parts.append(f"{len(shapes)} shape mismatch(es), first {first}")
    return parts
