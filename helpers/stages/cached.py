"""Cached per-subject tasks: finished when every output carries a completion marker for the
task's key (inputs' checksums + settings), so later runs reuse them.

The one helper of the measure and QC stages: :func:`task_key` (inputs + settings -> key),
:func:`mark_finished` (outputs), :func:`is_finished` (done) and :func:`split_finished` (what is
left to run).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from helpers import __version__
from helpers.runs import StatusRow

log = logging.getLogger(__name__)


def task_key(files: Mapping[str, str | Path | None], **values: Any) -> dict[str, Any]:
    """The completion key of a cached task: esma's version, the sha256 of every input file
    (None for an absent optional input) and the values (settings, subject) that shape the result.

    Examples
    --------
    >>> key = task_key({"levels": None}, settings={"min_dice": 0.7})
    >>> sorted(key), key["levels"]
    (['esma', 'levels', 'settings'], None)
    """
    from helpers.files import sha256_file

    hashed = {name: sha256_file(path) if path else None for name, path in files.items()}
    return {"esma": __version__, **values, **hashed}


def mark_finished(out: Path, names: tuple[str, ...], key: dict[str, Any]) -> None:
    """Give every output ``names`` in ``out`` a completion marker for ``key``."""
    from helpers.files import mark_done

    for name in names:
        mark_done(out / name, key)


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
