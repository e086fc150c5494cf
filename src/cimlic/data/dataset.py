"""A torch Dataset over a LabelSet: image decoding with clear errors, transforms, the item contract."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms import v2

from cimlic.data.labels import LabelSet
from cimlic.errors import CimlicError

logger = logging.getLogger(__name__)

# CLIP's image normalisation (OpenAI), the default of every CLIP-based model here.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ImageFileError(CimlicError, OSError):
    """An image file is missing or cannot be decoded (the message names the file)."""


def load_image(path: str | os.PathLike) -> Image.Image:
    """Open and fully decode an image as 8-bit RGB, or raise ``ImageFileError`` naming the file and the problem.

    Every PIL mode is brought to 8 bits per channel by its own range, not clipped: 16-bit grey (``I;16*``) by
    /257, 32-bit integer (``I``) and float (``F``) images by the range their values use, palette images with
    transparency through RGBA; CMYK, grey and alpha modes through PIL's conversion. An image that claims more
    pixels than PIL's decompression-bomb limit is refused before it is decoded.
    """
    path = Path(path)
    if path.is_dir():
        raise ImageFileError(f"{path}: is a folder, not an image file")
    if not path.is_file():
        raise ImageFileError(f"{path}: image file not found")
    try:
        with Image.open(path) as im:
            return to_rgb(im)  # a full decode, so truncated files fail here
    except Image.DecompressionBombError as err:
        raise ImageFileError(f"{path}: refused, the image claims too many pixels ({err})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ImageFileError(f"{path}: cannot decode image ({err})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """8-bit RGB of any PIL image, scaling high-bit-depth modes by their range (see :func:`load_image`)."""
    if im.mode.startswith("I;16"):
        grey = np.rint(np.asarray(im, dtype=np.float64) / 257.0)  # 65535 -> 255, v * 257 -> v
        return Image.fromarray(grey.astype(np.uint8)).convert("RGB")
    if im.mode in ("I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = float(arr.max()) if arr.size else 0.0
        if im.mode == "F" and top <= 1.0:
            scale = 255.0  # floats in [0, 1]
        elif top <= 255.0:
            scale = 1.0  # already 8-bit values
        elif top <= 65535.0 and im.mode == "I":
            scale = 1.0 / 257.0  # 16-bit values held as 32-bit integers
        else:
            scale = 255.0 / top
        grey = np.clip(np.rint(arr * scale), 0, 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


def default_transform(
    size: int,
    train: bool = False,
    mean: tuple[float, float, float] = CLIP_MEAN,
    std: tuple[float, float, float] = CLIP_STD,
) -> Callable[[Image.Image], torch.Tensor]:
    """Resize to ``size``×``size`` (random crop + flip when ``train``), to float, normalise (CLIP's by default).

    The evaluation resize is PIL's bilinear filter on the decoded image (torchvision hands a PIL image to PIL), so
    any program that resizes with ``Image.resize((size, size), Image.BILINEAR)`` feeds a model exactly what cimlic
    fed it (the exported tagger's snippet does).
    """
    if train:
        steps: list = [v2.PILToTensor(), v2.RandomResizedCrop(size, scale=(0.5, 1.0), antialias=True),
                       v2.RandomHorizontalFlip()]  # fmt: skip
    else:
        steps = [v2.Resize((size, size), interpolation=v2.InterpolationMode.BILINEAR, antialias=True), v2.PILToTensor()]
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std))]
    return v2.Compose(steps)


class MultiLabelDataset(Dataset):
    """Items ``{"image": (3, H, W) float, "target": (C,) float in {1, 0, −1}, "index": int}``.

    Args:
        labels: the label set (ids and targets).
        image_root: folder the image paths are relative to.
        image_pattern: path of an image under ``image_root`` from its id, e.g. ``"JPEGImages/{id}.jpg"``.
        transform: PIL image → tensor.
    """

    def __init__(
        self,
        labels: LabelSet,
        image_root: str | os.PathLike,
        image_pattern: str = "{id}",
        transform: Callable[[Image.Image], torch.Tensor] | None = None,
    ) -> None:
        self.labels = labels
        self.image_root = Path(image_root)
        self.image_pattern = image_pattern
        self.transform = transform or default_transform(224)
        self.targets = torch.from_numpy(labels.targets.astype("float32"))  # (N, C)

    def __len__(self) -> int:
        return len(self.labels)

    def image_path(self, index: int) -> Path:
        return self.image_root / self.image_pattern.format(id=self.labels.ids[index])

    def __getitem__(self, index: int) -> dict:
        image = self.transform(load_image(self.image_path(index)))
        return {"image": image, "target": self.targets[index], "index": index}

    def missing_images(self) -> list[Path]:
        """Paths of the images that do not exist (checked up front so a run fails before training)."""
        return [p for p in map(self.image_path, range(len(self))) if not p.is_file()]


class ExtraInputsDataset(Dataset):
    """Adds per-item tensors to every item of ``base``: ``item | {key: extras[key][index]}``.

    For training inputs beyond images and labels, e.g. LMPT's ``"caption_tokens"`` (N, L) or the hidden unmasked
    labels ``"true_target"`` (N, C) of a partial-label run (for counting pseudo-labels only; nothing trains on them).
    """

    def __init__(self, base: Dataset, extras: dict[str, torch.Tensor]) -> None:
        for key, value in extras.items():
            if value.shape[0] != len(base):
                raise ValueError(f"extra input {key!r} has {value.shape[0]} rows for {len(base)} items")
        self.base, self.extras = base, dict(extras)
        self.targets = getattr(base, "targets", None)  # (N, C), what the samplers read

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, index: int) -> dict:
        return self.base[index] | {key: value[index] for key, value in self.extras.items()}
