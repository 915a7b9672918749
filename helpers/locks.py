"""Advisory file locks (``fcntl.flock``) that say who holds them.

Two ``esma run`` on one output, or two first-time ingests sharing one pseudonym key, must not
interleave.  A lock is an ``flock`` on a small file that records the holder (process id, host,
start time, command); the kernel drops it when the holder exits, even on SIGKILL, so a stale
lock file never blocks anyone.  On a platform without ``fcntl`` (Windows) the locks are no-ops
with a warning.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from helpers.errors import EsmaError, OutputError

__all__ = ["RUN_LOCK_NAME", "LockHeldError", "file_lock", "hold_output_lock", "holder_of"]

log = logging.getLogger(__name__)

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]


class LockHeldError(EsmaError):
    """Another process holds the lock; the message names it (pid, host, since, command)."""

    def __init__(self, path: Path, what: str, holder: dict[str, Any] | None) -> None:
        self.path = Path(path)
        self.holder = holder or {}
        who = _describe(self.holder)
        super().__init__(f"{self.path}: {what} is locked by {who}; wait for it or stop it")


def _describe(holder: dict[str, Any]) -> str:
    if not holder:
        return "another process"
    since = holder.get("since", "")
    return (
        f"process {holder.get('pid', '?')} on {holder.get('host', '?')}"
        + (f" since {since}" if since else "")
        + (f" ({holder['command']})" if holder.get("command") else "")
    )


def holder_of(path: str | Path) -> dict[str, Any] | None:
    """The holder recorded in a lock file, or None (no file, unreadable, empty)."""
    try:
        text = Path(path).read_text(encoding="utf-8")
        holder = json.loads(text) if text.strip() else None
    except (OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


@contextmanager
def file_lock(
    path: str | Path, what: str, *, wait_s: float = 0.0, command: str = ""
) -> Iterator[Path]:
    """Hold an exclusive lock on ``path`` (created if needed) for the ``with`` block.

    Parameters
    ----------
    path : path
        The lock file; its folder is created.
    what : str
        What the lock protects, for the message (``"the output's work folder"``).
    wait_s : float
        How long to wait for another holder to finish (0: fail at once).
    command : str
        Short description of this holder, recorded for whoever finds the lock held.

    Raises
    ------
    LockHeldError
        Another process holds it (after ``wait_s``); names that process.
    OutputError
        The lock file cannot be created.
    """
    path = Path(path)
    if fcntl is None:  # pragma: no cover - Windows
        log.warning("%s: file locks are not available on this platform; not locked", path)
        yield path
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        msg = f"{path}: cannot create the lock file ({exc.strerror})"
        raise OutputError(msg) from exc
    try:
        deadline = time.monotonic() + max(0.0, wait_s)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise LockHeldError(path, what, holder_of(path)) from None
                time.sleep(0.05)
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": command or " ".join(Path(a).name for a in sys.argv[:2]),
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(record).encode("utf-8"), 0)
        try:
            yield path
        finally:
            os.ftruncate(fd, 0)  # a later reader finds no stale holder
    finally:
        os.close(fd)  # releases the flock


# ---------------------------------------------------------------------- esma run's lock
#: Lock file of ``esma run`` inside the study's work folder.
RUN_LOCK_NAME = "esma-run.lock"


def hold_output_lock(run: Any) -> Any:
    """Decorate ``run_study(study_path, ...)`` so it holds the lock of the study's work folder.

    A second run on the same output stops at once with :class:`LockHeldError` naming the
    holder (``esma run`` exits 2).  A study file that does not load is left to ``run_study``,
    whose own validation reports it.
    """
    import functools

    @functools.wraps(run)
    def locked(study_path: str | Path, *args: Any, **kwargs: Any) -> Any:
        from helpers.config import load_study

        try:
            work_dir = load_study(study_path).work_dir
        except EsmaError:
            return run(study_path, *args, **kwargs)
        # folders the lock creates: removed again when the run wrote nothing else (a study
        # refused before its first run leaves no output folder behind)
        created = [p for p in (work_dir, *work_dir.parents) if not p.exists()]
        with file_lock(
            work_dir / RUN_LOCK_NAME, "the study's output (another esma run)", command="esma run"
        ) as lock:
            try:
                return run(study_path, *args, **kwargs)
            finally:
                if created:
                    _remove_unused(lock, created)

    return locked


def _remove_unused(lock: Path, created: list[Path]) -> None:
    """Remove ``lock`` and the folders in ``created`` (deepest first) if nothing else is there."""
    try:
        if [p.name for p in lock.parent.iterdir()] != [lock.name]:
            return
        lock.unlink()
        for folder in created:  # deepest first; stops at the first folder holding anything
            folder.rmdir()
    except OSError:
        return
