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


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny-tensor tests: as fast alone, far faster when jobs share 2 cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
