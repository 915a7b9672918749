"""A task for executor tests that spawned worker processes can import (tests/ on the path)."""

from __future__ import annotations

import time
from pathlib import Path


def slow_touch(path: str) -> str:
    """Create ``path.started``, sleep 4 s, then create ``path`` (a result written late)."""
    Path(path + ".started").touch()
    time.sleep(4.0)
    Path(path).touch()
    return path
