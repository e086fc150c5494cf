"""File I/O shared by every module: atomic writes, JSON / YAML readers, weight files, state-dict fitting.

Every write goes to a temporary file in the target's folder, is flushed to disk and renamed over the target
(``os.replace``), so a reader sees the old file or the new one, never half of one; a failed write leaves no
temporary file behind.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml
from torch import Tensor

from cimlic.errors import CimlicError


# ------------------------------------------------------------------------------------------ writes
def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the block succeeds, else removed.

    For writers that want a file name (``safetensors.save_file``, ``torch.save``): nothing is held in memory twice.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # only a failed write leaves it


def atomic_write_files(items: Sequence[tuple[str | os.PathLike, bytes]]) -> None:
    """Write every (path, bytes) pair: all temporary files first, then the renames (none if a write fails)."""
    with contextlib.ExitStack() as stack:
        temps = []
        for path, data in items:
            tmp = stack.enter_context(_held_temp(Path(path)))
            tmp.write_bytes(data)
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            temps.append((tmp, Path(path)))
        for tmp, path in temps:
            os.replace(tmp, path)


@contextlib.contextmanager
def _held_temp(path: Path) -> Iterator[Path]:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())
    try:
        yield Path(name)
    finally:
        Path(name).unlink(missing_ok=True)  # gone after a successful rename; removed after a failure


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
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


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
        raise error(f"{path}: malformed YAML in this {what} ({type(err).__name__}: {_first_line(err)})") from None


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
    except Exception as err:  # corrupt zip, truncated file, a pickle with code (refused by weights_only), ...
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
