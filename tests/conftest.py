"""Shared fixtures: the real label lists in ../shared/data (skipped with a reason where absent)."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; tests that need it are skipped when the folder is not beside the checkout."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared label lists not found at {SHARED_DATA} (they live beside the checkout, not in it)")
    return SHARED_DATA
