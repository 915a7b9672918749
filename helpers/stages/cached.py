"""Cached per-subject tasks: finished when every output carries a completion marker for the
task's key (inputs' checksums + settings), so later runs reuse them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from helpers.runs import StatusRow

log = logging.getLogger(__name__)


def is_finished(out: Path, names: tuple[str, ...], key: dict[str, Any]) -> bool:
    """True when every file ``names`` in ``out`` carries a completion marker for ``key``."""
    from helpers.files import is_done

    return all(is_done(out / name, key) for name in names)


def split_finished(tasks: Mapping[str, Any], done: Any) -> tuple[list[StatusRow], dict[str, Any]]:
    """Split tasks into finished ones (status rows ``reused``) and the rest (to run).

    Checking in this process first means a re-run starts no worker pool for finished work.
    """
    rows, todo = [], {}
    for key, task in tasks.items():
        t0 = time.perf_counter()
        try:
            finished = done(task)
        except OSError:
            finished = False
        if finished:
            rows.append(StatusRow(key, "reused", time.perf_counter() - t0))
        else:
            todo[key] = task
    if rows:
        log.info("%d subject(s) already finished: reused", len(rows))
    return rows, todo
