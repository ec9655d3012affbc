"""Shared test settings: offline model loading and the location of the shared real data."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]


def shared_data_dir() -> Path:
    """Return ``$KAD_SHARED_DATA`` or the ``shared/data`` folder beside the repository."""
    return Path(os.environ.get("KAD_SHARED_DATA") or REPO_ROOT.parent / "shared" / "data")


@pytest.fixture
def shared_data() -> Path:
    """The real public data folder; tests that use it skip when it is absent."""
    path = shared_data_dir()
    if not path.is_dir():
        pytest.skip(f"real test data not found at {path} (set KAD_SHARED_DATA to use it)")
    return path
