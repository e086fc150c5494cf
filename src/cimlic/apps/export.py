"""``cimlic export``: a run as one self-contained model file, from an image tensor to per-class probabilities.

The exported model is the whole scoring path of the run's selected checkpoint: CLIP's normalisation, the frozen
towers, the trained parts and the method's fused score, then the run's calibration (``calibration.json``). Beside it:
``classes.txt``, ``tagger.json`` (input layout, the preprocessing, the per-class thresholds, where it came from) and a
README with a ten-line inference snippet that needs neither cimlic nor its config. ONNX (``onnx``, run with
onnxruntime) or TorchScript (``torchscript``, run with ``torch.jit.load``). Every export is checked: the file is
loaded back and must give the same probabilities as the run's model on a random batch (max difference 1e-4).
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from cimlic import __version__
from cimlic.errors import CimlicError
from cimlic.io import atomic_path, atomic_write_text, claim_output_folder, write_json

logger = logging.getLogger(__name__)

FORMATS = {"onnx": "tagger.onnx", "torchscript": "tagger.pt"}
TOLERANCE = 1e-4  # the largest probability difference an export may show against the run's model


class ExportError(CimlicError, ValueError):
    """An export cannot be written or does not reproduce the run's model."""


class Tagger(nn.Module):
    """(B, 3, S, S) RGB float images in [0, 1] -> (B, C) calibrated probabilities sigmoid(scale * logit + bias)."""

    def __init__(self, model: nn.Module, mean, std, scale: float, bias) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("bias", torch.tensor(bias, dtype=torch.float32).view(1, -1))  # (1, C)

    def forward(self, image: Tensor) -> Tensor:
        logits = self.model({"image": (image - self.mean) / self.std})["logits"].float()  # (B, C)
        return torch.sigmoid(self.scale * logits + self.bias)


SNIPPET = """\
import json, numpy as np, onnxruntime as ort
from PIL import Image

info = json.load(open("{dir}/tagger.json"))
session = ort.InferenceSession("{dir}/tagger.onnx")
size = info["input"]["size"]
image = Image.open("photo.jpg").convert("RGB").resize((size, size), Image.BILINEAR)
x = (np.asarray(image, dtype=np.float32) / 255.0).transpose(2, 0, 1)[None]  # (1, 3, S, S)
probs = session.run(None, {{"image": x}})[0][0]  # (C,)
print([(c, round(float(p), 3)) for c, p, t in zip(info["classes"], probs, info["thresholds"]) if p >= t])
"""


def export_run(run_dir: str | os.PathLike, fmt: str, out: str | os.PathLike) -> dict:
    """Export a run's selected checkpoint to ``out`` (a new folder) as ``fmt`` (onnx | torchscript).

    Returns:
        ``tagger.json``'s content (with ``path`` of the model file and ``max_difference`` of the check).
    """
    from cimlic.apps.calibrate import read_run_calibration
    from cimlic.apps.runner import _resolve_run, load_run

    if fmt not in FORMATS:
        raise ExportError(f"--format {fmt!r}: valid formats {list(FORMATS)}")
    run_dir = _resolve_run(Path(run_dir))
    _, model, meta = load_run(run_dir)
    classnames = list(meta["classnames"])
    cal = read_run_calibration(run_dir, classnames)
    if cal is None:
        logger.warning("%s has no calibration.json: the export gives sigmoid(logit) and thresholds 0.5", run_dir)
    if fmt == "onnx":
        _need_onnx()  # before anything is written
    size, mean, std = model.input_spec()
    scale, bias = (cal.scale, cal.bias) if cal is not None else (1.0, [0.0] * len(classnames))
    tagger = Tagger(model.cpu().eval(), mean, std, scale, bias).eval()
    out = claim_output_folder(out, f"cimlic export --format {fmt}")
    path = out / FORMATS[fmt]
    for other in set(FORMATS.values()) - {path.name}:  # an earlier export of the other format: not described any more
        (out / other).unlink(missing_ok=True)
    generator = torch.Generator().manual_seed(0)
    example = torch.rand(2, 3, int(size), int(size), generator=generator)
    with torch.no_grad():
        _write(tagger, example, path, fmt)
        check = torch.rand(3, 3, int(size), int(size), generator=generator)  # another batch size than the example
        difference = float(np.abs(run_exported(path, fmt, check.numpy()) - tagger(check).numpy()).max())
    if not difference <= TOLERANCE:
        path.unlink(missing_ok=True)  # never leave a model file that does not reproduce the run
        raise ExportError(f"{path}: the exported model differs from the run's by {difference:.3g} (> {TOLERANCE}); "
                          "not kept")  # fmt: skip
    thresholds = cal.thresholds if cal is not None else [0.5] * len(classnames)
    info = {
        "format": fmt, "file": path.name, "classes": classnames, "thresholds": thresholds,
        "input": {"name": "image", "shape": ["batch", 3, int(size), int(size)], "dtype": "float32", "size": int(size),
                  "layout": "NCHW, RGB, values in [0, 1] (the model normalises with mean/std itself)"},
        "output": {"name": "probabilities", "shape": ["batch", len(classnames)],
                   "meaning": "calibrated probability per class; a class is predicted when it is >= its threshold"},
        "preprocessing": {"resize": [int(size), int(size)], "interpolation": "bilinear, antialiased (PIL BILINEAR)",
                          "crop": None, "scale": "1/255", "mean": list(mean), "std": list(std)},
        "calibration": None if cal is None else {"scale": cal.scale, "bias": cal.bias, "rule": cal.rule,
                                                 "target_precision": cal.target_precision, "chosen_on": cal.split},
        "run": str(run_dir), "checkpoint_epoch": meta.get("epoch"), "method": meta.get("config", {}).get("model", {})
        .get("name"), "cimlic": __version__, "max_difference": difference,
    }  # fmt: skip
    atomic_write_text(out / "classes.txt", "\n".join(classnames) + "\n")
    write_json(out / "tagger.json", info)
    atomic_write_text(out / "README.md", _readme(out, fmt, info))
    logger.info("exported %s (%s, %.1f MB); checked against the run: max difference %.2g", path, fmt,
                path.stat().st_size / 2**20, difference)  # fmt: skip
    return info | {"path": str(path)}


def _need_onnx() -> None:
    """ExportError naming the missing package when the ONNX exporter or onnxruntime is not installed."""
    import importlib.util

    missing = [m for m in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(m) is None]
    if missing:
        raise ExportError(f"--format onnx needs {', '.join(missing)}: pip install 'cimlic[export]'")


def _write(tagger: Tagger, example: Tensor, path: Path, fmt: str) -> None:
    """The model file, written atomically (a temporary file renamed into place)."""
    with atomic_path(path) as tmp:
        if fmt == "onnx":
            torch.onnx.export(tagger, (example,), str(tmp), input_names=["image"], output_names=["probabilities"],
                              dynamo=True, external_data=False,
                              dynamic_shapes={"image": {0: torch.export.Dim("batch")}})  # fmt: skip
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", FutureWarning)
                torch.jit.save(torch.jit.trace(tagger, example, check_trace=False), str(tmp))


def run_exported(path: str | os.PathLike, fmt: str, images: np.ndarray) -> np.ndarray:
    """(B, C) probabilities of an exported model file on (B, 3, S, S) float32 images (onnxruntime or TorchScript)."""
    if fmt == "onnx":
        _need_onnx()
        import onnxruntime as ort

        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return session.run(None, {"image": images.astype(np.float32)})[0]
    with warnings.catch_warnings():  # torch 2.14 marks TorchScript deprecated; the format is what was asked for
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(path), map_location="cpu")
    with torch.no_grad():
        return module(torch.from_numpy(images.astype(np.float32))).numpy()


def _readme(out: Path, fmt: str, info: dict) -> str:
    lines = [
        f"# {info['method']} tagger exported by cimlic {info['cimlic']}", "",
        f"`{info['file']}` ({fmt}): {info['input']['layout']}, shape (batch, 3, {info['input']['size']}, "
        f"{info['input']['size']}) -> (batch, {len(info['classes'])}) calibrated probabilities.",
        "Classes, thresholds and preprocessing: `tagger.json`. Resize to the input size with PIL's bilinear filter;",
        "16-bit or float images: bring them to 8 bits by their range first (`convert('RGB')` clips them).",
        "",
    ]  # fmt: skip
    if fmt == "onnx":
        lines += ["```python", SNIPPET.format(dir=out).rstrip(), "```"]
    else:
        lines += ["```python", "import torch", f'model = torch.jit.load("{out}/tagger.pt")',
                  "probs = model(x)  # x: (B, 3, S, S) float32 in [0, 1]", "```"]  # fmt: skip
    return "\n".join(lines) + "\n"
