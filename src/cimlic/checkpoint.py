"""Checkpoints and resume state (run-folder checks and logs: ``cimlic.rundir``).

A checkpoint ``<stem>`` is two files: ``<stem>.safetensors`` holds the trainable tensors (parameters with
``requires_grad=True`` and persistent buffers outside the method's frozen parts, ``Method.frozen_prefixes()``;
never CLIP's or any other frozen weights) and ``<stem>.json`` holds the metadata (config, class names, counts,
versions, metrics, the tensor names and the SHA-256 of the tensor file, so that a pair torn by a crash between the
two renames is detected).
Every write goes to a temporary file in the target's folder, is flushed to disk and renamed over the target
(``os.replace``), so a reader sees the old file or the new one, never half of one.

The resume state (``state.pt``) is a plain dict of tensors, numbers, strings, lists and dicts written with
``torch.save`` and read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
from collections.abc import Sequence
from functools import lru_cache
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import safetensors.torch
import torch
from safetensors import SafetensorError
from torch import Tensor, nn

from cimlic.distributed import all_gather_objects
from cimlic.errors import CimlicError
from cimlic.io import atomic_write_files, json_bytes, load_tensor_file, read_json, save_torch, state_dict_mismatch

logger = logging.getLogger(__name__)

FORMAT = "cimlic-checkpoint-1"


class CheckpointError(CimlicError, ValueError):
    """A checkpoint or state file is missing, corrupt or does not fit the model (one-line message)."""


# ---------------------------------------------------------------------------------------- tensors
def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DistributedDataParallel wrapper (the model itself otherwise)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def trainable_tensors(model: nn.Module) -> dict[str, Tensor]:
    """Live trainable tensors by state-dict name: parameters with requires_grad, persistent buffers outside the
    frozen parts of a :class:`cimlic.models.base.Method` (any other module has none); DDP wrappers are unwrapped."""
    from cimlic.models.base import Method  # at call time: the models import this module

    method = unwrap(model)
    frozen = method.frozen_prefixes() if isinstance(method, Method) else ()
    out = {}
    for name, t in method.state_dict(keep_vars=True).items():
        if not isinstance(t, Tensor):
            continue  # extra state
        keep = t.requires_grad if isinstance(t, nn.Parameter) else not name.startswith(frozen)
        if keep:
            out[name] = t
    return out


def trainable_state(model: nn.Module) -> dict[str, Tensor]:
    """Detached CPU copies of ``trainable_tensors(model)`` (what a checkpoint stores)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in trainable_tensors(model).items()}


def load_trainable_state(model: nn.Module, tensors: dict[str, Tensor], strict: bool = True, source: str = "") -> None:
    """Copy ``tensors`` into the model's trainable tensors (in place, on the model's device).

    Raises:
        CheckpointError: missing or unexpected names (``strict``), or a shape mismatch (always).
    """
    live = trainable_tensors(model)
    common = [k for k in live if k in tensors]
    expected = live if strict else {k: live[k] for k in common}
    problems = state_dict_mismatch(expected, tensors if strict else {k: tensors[k] for k in common})
    if problems:
        raise CheckpointError(f"{source}: {'; '.join(problems)}")
    with torch.no_grad():
        for k in common:
            live[k].copy_(tensors[k])


# ------------------------------------------------------------------------------------ checkpoints
@lru_cache(maxsize=1)
def package_versions() -> dict[str, str | None]:
    """Versions of cimlic, torch, open_clip (None when not installed), safetensors and numpy."""
    import cimlic

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    return {
        "cimlic": cimlic.__version__,
        "torch": torch.__version__,
        "open_clip": version("open_clip_torch"),
        "safetensors": version("safetensors"),
        "numpy": np.__version__,
    }


def _paths(path_stem: str | os.PathLike) -> tuple[Path, Path]:
    stem = Path(path_stem)
    return stem.with_name(stem.name + ".safetensors"), stem.with_name(stem.name + ".json")


def save_checkpoint(path_stem: str | os.PathLike, model: nn.Module, meta: dict) -> dict:
    """Save the model's trainable tensors to ``<stem>.safetensors`` and ``meta`` to ``<stem>.json`` (atomically).

    Args:
        path_stem: file name without suffix, e.g. ``runs/x/best``.
        model: the model (a DDP wrapper is unwrapped).
        meta: JSON-able metadata (resolved config, class names, training counts, metrics, step, epoch, ...).

    Returns:
        The sidecar dict written: ``meta`` plus ``format``, ``versions``, ``tensors`` (names) and ``sha256``.
    """
    tensors = trainable_state(model)
    blob = safetensors.torch.save(tensors, metadata={"format": FORMAT})
    sidecar = {
        **meta,
        "format": FORMAT,
        "versions": dict(package_versions()),
        "tensors": sorted(tensors),
        "sha256": hashlib.sha256(blob).hexdigest(),
    }
    tensor_path, json_path = _paths(path_stem)
    atomic_write_files([(tensor_path, blob), (json_path, json_bytes(sidecar))])
    return sidecar


def read_checkpoint(path_stem: str | os.PathLike) -> tuple[dict[str, Tensor], dict]:
    """(tensors on the CPU, sidecar meta) of a checkpoint; CheckpointError when missing, corrupt or torn."""
    tensor_path, json_path = _paths(path_stem)
    for p in (tensor_path, json_path):
        if not p.is_file():
            raise CheckpointError(f"{p}: checkpoint file not found")
    meta = read_json(json_path, CheckpointError, "checkpoint metadata")
    blob = tensor_path.read_bytes()
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{json_path}: not a cimlic checkpoint sidecar (format {FORMAT!r} expected)")
    if meta.get("sha256") != hashlib.sha256(blob).hexdigest():
        raise CheckpointError(f"{tensor_path}: content does not match {json_path.name} (corrupt or torn write)")
    try:
        tensors = safetensors.torch.load(blob)
    except SafetensorError as err:
        raise CheckpointError(f"{tensor_path}: corrupt safetensors file ({err})") from None
    return tensors, meta


def load_checkpoint(
    path_stem: str | os.PathLike, model: nn.Module, strict: bool = True, classnames: Sequence[str] | None = None
) -> dict:
    """Load a checkpoint's tensors into ``model`` (in place) and return its metadata.

    Args:
        path_stem: file name without suffix (``<stem>.safetensors`` and ``<stem>.json`` must exist).
        model: the model to fill (its frozen CLIP weights come from elsewhere and are not touched).
        strict: missing or unexpected tensor names are errors (shape mismatches always are).
        classnames: when given, the checkpoint's class names must equal them.

    Raises:
        CheckpointError: missing/corrupt files, class count or names differ, key or shape mismatch; the
            one-line message names the file and the first offending keys or shapes.
    """
    tensors, meta = read_checkpoint(path_stem)
    tensor_path = _paths(path_stem)[0]
    saved = meta.get("classnames")
    from cimlic.models.base import Method  # at call time: the models import this module

    method = unwrap(model)
    num_classes = method.num_classes if isinstance(method, Method) else None
    if saved is not None and num_classes is not None and len(saved) != num_classes:
        raise CheckpointError(f"{tensor_path}: trained for {len(saved)} classes, the model has {num_classes}")
    if saved is not None and classnames is not None and list(saved) != list(classnames):
        first = next(
            (i for i, (a, b) in enumerate(zip(saved, classnames, strict=False)) if a != b),
            min(len(saved), len(classnames)),
        )
        raise CheckpointError(
            f"{tensor_path}: class names differ ({len(saved)} saved vs {len(classnames)} given; first difference at "
            f"index {first})"
        )
    load_trainable_state(model, tensors, strict=strict, source=str(tensor_path))
    return meta


def check_identity(path: str | os.PathLike, current: dict, what: str = "this run") -> None:
    """The frozen weights recorded in ``path`` (a ``clip.json``) must be ``current`` (``Method.identity()``).

    Nothing to check when the file does not exist (runs from before it was written).

    Raises:
        CheckpointError: a malformed file, or other frozen weights (naming the parts that differ).
    """
    path = Path(path)
    if not path.is_file():
        return
    saved = read_json(path, CheckpointError, "CLIP identity file")
    if not isinstance(saved, dict) or not isinstance(saved.get("digest"), str):
        raise CheckpointError(f"{path}: malformed CLIP identity file (a JSON object with a 'digest' expected)")
    if saved["digest"] == current["digest"]:
        return
    old, new = saved.get("parts") or {}, current.get("parts") or {}
    differ = [name for name in new if isinstance(old, dict) and name in old and old[name] != new[name]]
    which = f" ({', '.join(differ)} differ{'s' if len(differ) == 1 else ''})" if differ else ""
    raise CheckpointError(
        f"{path}: the frozen weights differ from those {what} was trained with{which} "
        f"(trained on {saved.get('source') or saved.get('arch')}, now {current.get('source') or current.get('arch')})"
    )


# ---------------------------------------------------------------------------------- resume state
def get_rng_state() -> dict:
    """RNG states of python, numpy and torch (CPU and CUDA) as tensors and numbers (weights_only-safe)."""
    version, mt, gauss = random.getstate()
    name, keys, pos, has_gauss, cached = np.random.get_state(legacy=True)
    state = {
        "python": {"version": version, "state": torch.tensor(mt, dtype=torch.int64), "gauss": gauss},
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    state["numpy"]["cached"] = float(cached)
    return state


def set_rng_state(state: dict) -> None:
    """Restore the RNG states captured by ``get_rng_state``."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    keys = npy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, npy["pos"], npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(path: str | os.PathLike, state: dict) -> None:
    """``torch.save`` the resume state atomically (keep it to tensors, numbers, strings, lists and dicts)."""
    save_torch(path, state)


def load_state(path: str | os.PathLike) -> dict:
    """Read a resume state with ``torch.load(weights_only=True)``; CheckpointError when missing or corrupt."""
    path = Path(path)
    state = load_tensor_file(path, CheckpointError, "resume state")  # never unpickles code: weights_only
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: resume state is a {type(state).__name__}, not a dict")
    return state


def gather_rng_states() -> list[dict]:
    """``get_rng_state()`` of every rank in rank order (a collective under torch.distributed)."""
    return all_gather_objects(get_rng_state())


def training_state(
    model: nn.Module, optimizer: Any, ema: Any, loss_fn: nn.Module, rng: list[dict], step: int, epoch: int, best: dict
) -> dict:
    """The resume state of a Trainer as a weights_only-loadable dict (``optimizer``/``ema`` may be None)."""
    return {
        "epoch": epoch,  # epochs completed (= the sampler epoch to start from)
        "step": step,  # optimiser steps done
        "best": best,  # {"map", "epoch", "metrics"} of the selected epoch so far
        "model": trainable_state(model),  # raw weights (the checkpoints hold the evaluated, maybe EMA, ones)
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "ema": ema.state_dict() if ema is not None else None,
        "loss": loss_fn.state_dict(),  # e.g. grad_balance's running sums
        "rng": rng,  # one entry per rank
    }


def restore_training_state(
    state: dict, model: nn.Module, optimizer: Any, ema: Any, loss_fn: nn.Module, rank: int = 0, source: str = ""
) -> dict:
    """Load ``training_state`` into the parts (in place); return ``{"step", "epoch", "best"}``.

    Raises:
        CheckpointError: the state does not fit (missing entries, other tensors or shapes).
    """
    try:
        load_trainable_state(model, state["model"], source=source)
        if optimizer is not None:
            optimizer.load_state_dict(state["optimizer"])
        if ema is not None:
            ema.load_state_dict(state["ema"])
        loss_fn.load_state_dict(state["loss"])
        rng = state["rng"]
        set_rng_state(rng[rank] if rank < len(rng) else rng[0])
        return {"step": int(state["step"]), "epoch": int(state["epoch"]), "best": dict(state["best"])}
    except (KeyError, TypeError, RuntimeError, ValueError) as err:
        if isinstance(err, CheckpointError):
            raise
        raise CheckpointError(f"{source}: does not fit this run ({type(err).__name__}: {err})") from None
