"""Shared fixtures.  Module-specific fixtures live in their own test files."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: The real example scan, shipped with the repo (attribution in data/example/README.md).
EXAMPLE_DIR = REPO / "data" / "example"


@pytest.fixture(scope="session")
def repo_root() -> Path:
    """The repository root."""
    return REPO


@pytest.fixture(scope="session")
def example_dir() -> Path:
    """Folder holding the real example scan, its mask and labels.json."""
    return EXAMPLE_DIR
