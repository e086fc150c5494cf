"""Shared fixtures: the real label lists in ../shared/data (skipped with a reason where absent), one-thread runs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; tests that need it are skipped when the folder is not beside the checkout."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared label lists not found at {SHARED_DATA} (they live beside the checkout, not in it)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def glyph_data(tmp_path_factory) -> dict:
    """The ``data`` config section of a small generated glyph world (120-image pool, 24 test images), built once."""
    from glyphs import build_world

    world = tmp_path_factory.mktemp("glyph_world")
    build_world(world, n_pool=120, n_test=24, n_max=40, seed=0)
    return {"classes": str(world / "classes.txt"), "train_labels": str(world / "train.txt"),
            "test_labels": str(world / "test.txt"), "image_root": str(world / "images"),
            "image_pattern": "{id}.png"}  # fmt: skip


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: as fast alone, far faster when jobs share 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
