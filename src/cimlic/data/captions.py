"""Caption files: ``image_id<TAB>caption`` lines (LMPT's class-specific embedding loss reads them)."""

from __future__ import annotations

from pathlib import Path

from cimlic.errors import ConfigError
from cimlic.io import read_text


def read_captions(path: str | Path, ids: list[str]) -> list[str]:
    """Captions (``id<TAB>caption`` lines) for ``ids``, in that order; a missing id is an error."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: captions file not found")
    table: dict[str, str] = {}
    for lineno, line in enumerate(read_text(path, ConfigError, "captions file").splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        if "\t" not in line:
            raise ConfigError(f"{path}:{lineno}: expected 'image_id<TAB>caption'")
        image_id, text = line.split("\t", 1)
        table[image_id.strip()] = text.strip()
    missing = [i for i in ids if i not in table]
    if missing:
        raise ConfigError(f"{path}: no caption for {len(missing)} training image(s), e.g. {missing[:3]}")
    return [table[i] for i in ids]
